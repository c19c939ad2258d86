"""Whole-path fixtures: a real Orthanc (from the integration harness) and the real service process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.integration.conftest import dcmtk_tool, orthanc_binary, orthanc_factory, storescu_bin  # noqa: F401  (fixtures)
from tests.integration.orthanc import free_tcp_ports, wait_for

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"


class ServiceProcess:
    """One ``breastai`` sub-command running as its own OS process, logging to a file."""

    def __init__(self, command: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.command = command
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", self.command, *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=self.env,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_echo(self, port: int, timeout: float = 60.0) -> None:
        """Block until the listener answers C-ECHO (models loaded, server bound)."""

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"breastai {self.command} exited with {self.process.returncode}:\n{self.log()[-4000:]}"
                )
            ae = AE(ae_title="E2ETEST")
            ae.add_requested_context(Verification)
            ae.acse_timeout = ae.network_timeout = 2
            assoc = ae.associate("127.0.0.1", port, ae_title="BREASTAI")
            if not assoc.is_established:
                return False
            status = assoc.send_c_echo()
            assoc.release()
            return bool(status) and status.Status == 0

        wait_for(answers, timeout=timeout, interval=0.5, message=f"breastai {self.command} answering C-ECHO on {port}")

    def kill(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return int(self.process.returncode)


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Callable ``(command, args, env=None) -> ServiceProcess`` (started); all are stopped at teardown."""
    started: list[ServiceProcess] = []

    def make(command: str, args: list[str], env: dict[str, str] | None = None) -> ServiceProcess:
        process = ServiceProcess(command, args, tmp_path / f"{command}-{len(started)}.log", env).start()
        started.append(process)
        return process

    yield make
    for process in started:
        process.kill()


@pytest.fixture
def free_ports() -> Callable[[int], list[int]]:
    return free_tcp_ports


@pytest.fixture
def sample_study() -> Path:
    folder = SAMPLES / "study1"
    files = sorted(folder.glob("*.dcm"))
    assert files, f"no sample DICOM files in {folder} (make samples)"
    return folder
