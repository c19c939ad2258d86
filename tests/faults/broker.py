"""A private RabbitMQ node the fault suite may kill -9 and restart without touching the shared broker.

It runs Debian's ``rabbitmq-server`` with its own node name, ports, data
directory and configuration file (the system's ``/etc/rabbitmq`` files would
otherwise pin it to 5672), so a test can take the broker away under load
while other tests' queues on 127.0.0.1:5672 stay untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.integration.orthanc import free_tcp_ports

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
START_TIMEOUT_S = 90.0


class BrokerError(RuntimeError):
    """The private broker did not start."""


def rabbitmq_server_binary() -> str | None:
    return shutil.which("rabbitmq-server", path=SYSTEM_PATH)


class PrivateBroker:
    """One RabbitMQ node on free ports; :meth:`kill` is SIGKILL, :meth:`start` brings it back with its data."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port, self.dist_port = free_tcp_ports(2)
        self.node = f"breastai-faults-{uuid.uuid4().hex[:8]}@localhost"
        self.workdir = Path(tempfile.mkdtemp(prefix="breastai-rabbitmq-"))
        for sub in ("mnesia", "log"):
            (self.workdir / sub).mkdir()
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        if os.geteuid() == 0:  # the Debian wrapper runs the node as the rabbitmq user
            shutil.chown(self.workdir, "rabbitmq")
            for path in self.workdir.rglob("*"):
                shutil.chown(path, "rabbitmq")
        self._process: subprocess.Popen[bytes] | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _env(self) -> dict[str, str]:
        base = self.workdir
        return {
            **os.environ,
            "PATH": f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(base / "feature_flags"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(base / "node.pid"),
        }

    def start(self) -> PrivateBroker:
        """Start the node (again) and wait until it answers an AMQP handshake."""
        self._starts += 1
        log = (self.workdir / f"server-{self._starts}.log").open("ab")
        self._process = subprocess.Popen(
            [self.binary], env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise BrokerError(f"private RabbitMQ did not start:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                sock.settimeout(3)
                return sock.recv(3) == b"\x01\x00\x00"  # Connection.Start, a method frame on channel 0
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the Erlang VM: no clean shutdown, what the broker confirmed must survive."""
        pid_file = self.workdir / "node.pid"
        if pid_file.exists() and pid_file.read_text().strip():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=30)
            self._process = None
        deadline = time.monotonic() + 30
        while self.answers() and time.monotonic() < deadline:
            time.sleep(0.2)

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted(self.workdir.glob("server-*.log"))
        return logs[-1].read_text(errors="replace")[-chars:] if logs else ""

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)
