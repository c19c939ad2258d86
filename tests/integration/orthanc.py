"""A real Orthanc for integration tests: no mocks.

``OrthancServer`` starts its own ``Orthanc`` process (Debian package
``orthanc``) on two free TCP ports with a throw-away storage directory, waits
for the REST API to answer and tears everything down on exit. It never
touches a system Orthanc service on 4242/8042.

Only the standard library is used for REST (urllib), so the harness works in
any venv.

    with OrthancServer(modalities={"BREASTAI": ("BREASTAI", "127.0.0.1", 11112)}) as pacs:
        iid = pacs.upload("study/1.dcm")
        pacs.send_to_modality("BREASTAI", [iid])

Environment:
    ORTHANC_BIN   path of the Orthanc binary (default: ``Orthanc`` on PATH,
                  then /usr/sbin/Orthanc)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "OrthancError",
    "OrthancServer",
    "find_orthanc_binary",
    "free_tcp_ports",
    "wait_for",
]

DEFAULT_ORTHANC_BIN = "/usr/sbin/Orthanc"

T = TypeVar("T")

Modality = Sequence[Any]  # [AET, host, port] as Orthanc's DicomModalities wants it


class OrthancError(RuntimeError):
    """Orthanc did not start, died, or answered a REST call with an error."""


def find_orthanc_binary() -> str | None:
    """Path of the Orthanc executable, or None when it is not installed."""
    env = os.environ.get("ORTHANC_BIN")
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("Orthanc")
    if found:
        return found
    # /usr/sbin is not on PATH for every user.
    if os.access(DEFAULT_ORTHANC_BIN, os.X_OK):
        return DEFAULT_ORTHANC_BIN
    return None


def free_tcp_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago.

    All sockets are held open together so the ports are distinct; there is an
    unavoidable race between closing them and the server binding, which
    ``OrthancServer`` handles by retrying with new ports.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.1,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises ``TimeoutError`` after ``timeout`` seconds. Exceptions raised by the
    predicate propagate (they are bugs, not "not yet").
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {message}")
        time.sleep(interval)


class OrthancServer:
    """A private Orthanc process, used as a context manager.

    Parameters
    ----------
    modalities:
        ``{name: (AET, host, port)}`` written to ``DicomModalities`` so that
        Orthanc can C-ECHO / C-STORE to those peers (e.g. our listener).
        More can be added later with :meth:`add_modality`.
    aet:
        Orthanc's own AE title.
    startup_timeout:
        Seconds to wait for ``GET /system`` to answer.
    extra_config:
        Merged last into the generated configuration (overrides).
    """

    def __init__(
        self,
        modalities: Mapping[str, Modality] | None = None,
        *,
        aet: str = "ORTHANC",
        startup_timeout: float = 30.0,
        extra_config: Mapping[str, Any] | None = None,
        binary: str | None = None,
    ) -> None:
        self.aet = aet
        self.modalities: dict[str, list[Any]] = {
            name: [str(m[0]), str(m[1]), int(m[2])] for name, m in (modalities or {}).items()
        }
        self.startup_timeout = startup_timeout
        self.extra_config = dict(extra_config or {})
        self.binary = binary or find_orthanc_binary()
        self.host = "127.0.0.1"
        self.dicom_port = 0
        self.http_port = 0
        self.workdir: Path | None = None
        self.config_path: Path | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL of the REST API, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> dict[str, Any]:
        """The configuration written for the current ports and workdir."""
        assert self.workdir is not None
        cfg: dict[str, Any] = {
            "Name": f"breastai-test-{self.http_port}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "Plugins": [],  # never load the Debian system plugins
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpDescribeErrors": True,
            "HttpTimeout": 30,
            "HttpThreadsCount": 8,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": False,
            "UnknownSopClassAccepted": True,
            "DicomModalities": self.modalities,
            "DicomModalitiesInDatabase": False,
            "DicomScpTimeout": 30,
            "DicomScuTimeout": 10,
            "DicomThreadsCount": 2,
            # Release the SCU association right after a C-STORE instead of
            # keeping it open 5 s: our listener should see the release.
            "DicomAssociationCloseDelay": 0,
            "StableAge": 1,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "JobsHistorySize": 10,
            "OverwriteInstances": True,
            "ExecuteLuaEnabled": False,
        }
        cfg.update(self.extra_config)
        return cfg

    def start(self) -> OrthancServer:
        if self.running:
            return self
        if not self.binary:
            raise OrthancError("Orthanc binary not found (apt-get install orthanc, or set ORTHANC_BIN)")
        self.workdir = Path(tempfile.mkdtemp(prefix="breastai-orthanc-"))
        last_error: Exception | None = None
        try:
            for _attempt in range(3):  # new ports if someone grabbed ours meanwhile
                try:
                    self._start_once()
                    return self
                except OrthancError as exc:
                    last_error = exc
                    self._kill()
            raise OrthancError(f"Orthanc did not start after 3 attempts: {last_error}")
        except BaseException:
            self.stop()
            raise

    def _start_once(self, keep_ports: bool = False) -> None:
        assert self.workdir is not None and self.binary is not None
        if not keep_ports:
            self.dicom_port, self.http_port = free_tcp_ports(2)
        for sub in ("storage", "index"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self.log_path = self.workdir / "orthanc.log"
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _kill
        env = dict(os.environ)
        # DCMTK (inside Orthanc) otherwise waits for Nagle: ~45 ms per instance.
        env["TCP_NODELAY"] = "1"
        self._proc = subprocess.Popen(
            [self.binary, str(self.config_path)],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in pytest does not hit it twice
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with status {self._proc.returncode} during startup; log tail:\n{self.log_tail()}"
                )
            try:
                system = self.get("/system", timeout=2)
                if isinstance(system, dict) and system.get("DicomPort") == self.dicom_port:
                    return
            except (OSError, OrthancError):
                pass
            if time.monotonic() >= deadline:
                raise OrthancError(
                    f"Orthanc did not answer GET /system within {self.startup_timeout:.0f}s; "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def terminate(self) -> None:
        """Send SIGTERM without waiting (Orthanc needs ~3 s to shut down).

        Lets a caller stopping several servers overlap their shutdowns; call
        :meth:`stop` afterwards to wait and clean up.
        """
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)

    def _kill(self, grace: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self, grace: float = 10.0) -> None:
        """Terminate Orthanc (SIGTERM, then SIGKILL after ``grace`` s) and delete its files."""
        self._kill(grace)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def go_down(self) -> None:
        """Stop the Orthanc process but keep its files and ports: a PACS that is down (connections refused)."""
        self._kill()

    def come_back(self) -> None:
        """Start Orthanc again on the same ports with the same storage, after :meth:`go_down`."""
        assert self.workdir is not None and not self.running
        self._start_once(keep_ports=True)

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, max_chars: int = 4000) -> str:
        """The last characters of Orthanc's own log (stdout+stderr)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        if self._log_file is not None:
            self._log_file.flush()
        return self.log_path.read_bytes()[-max_chars:].decode("utf-8", "replace")

    # ---------------------------------------------------------------------- REST

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | Mapping[str, Any] | Sequence[Any] | None = None,
        *,
        content_type: str | None = None,
        timeout: float = 30.0,
        raw: bool = False,
    ) -> Any:
        """One REST call. JSON bodies for dicts/lists; returns parsed JSON or bytes (``raw``)."""
        data: bytes | None
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
            content_type = content_type or "application/octet-stream"
        elif isinstance(body, str):
            data = body.encode()
            content_type = content_type or "text/plain"
        else:
            data = json.dumps(body).encode()
            content_type = content_type or "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise OrthancError(f"{method} {path} -> HTTP {exc.code}: {detail}") from exc
        if raw:
            return payload
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload.decode("utf-8", "replace")

    def get(self, path: str, *, timeout: float = 30.0) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: Any = None, *, timeout: float = 30.0) -> Any:
        return self.request("POST", path, body, timeout=timeout)

    def delete(self, path: str, *, timeout: float = 30.0) -> Any:
        return self.request("DELETE", path, timeout=timeout)

    # ------------------------------------------------------------------- helpers

    def system(self) -> dict[str, Any]:
        return self.get("/system")  # type: ignore[no-any-return]

    def upload(self, path: str | os.PathLike[str]) -> str:
        """POST one DICOM file to /instances; returns Orthanc's instance id."""
        return self.upload_bytes(Path(path).read_bytes())

    def upload_bytes(self, data: bytes) -> str:
        """POST DICOM bytes (Part 10 file) to /instances; returns the instance id."""
        answer = self.request("POST", "/instances", data, content_type="application/dicom")
        if not isinstance(answer, dict) or answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"upload rejected: {answer!r}")
        return str(answer["ID"])

    def upload_dir(self, directory: str | os.PathLike[str]) -> list[str]:
        """Upload every regular file under ``directory`` (recursively); returns ids."""
        return [self.upload(p) for p in sorted(Path(directory).rglob("*")) if p.is_file()]

    def studies(self, expand: bool = False) -> list[Any]:
        """Orthanc ids of all studies (or their expanded dicts with ``expand``)."""
        return self.get("/studies?expand" if expand else "/studies")  # type: ignore[no-any-return]

    def find(self, level: str, query: Mapping[str, str], *, expand: bool = True) -> list[Any]:
        """POST /tools/find (``level``: Patient, Study, Series or Instance)."""
        return self.post(  # type: ignore[no-any-return]
            "/tools/find", {"Level": level, "Query": dict(query), "Expand": expand}
        )

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's id of the study with this StudyInstanceUID, or None."""
        hits = self.find("Study", {"StudyInstanceUID": study_uid}, expand=False)
        return str(hits[0]) if hits else None

    def study_instances(self, study_uid: str, *, tags: bool = True) -> list[dict[str, Any]]:
        """Instances of the study ``study_uid`` (a DICOM UID, not an Orthanc id).

        Each dict is Orthanc's expanded instance (``ID``, ``MainDicomTags``,
        ``ParentSeries``, ...). With ``tags`` (default) it also carries
        ``"Tags"``: the instance's full ``simplified-tags`` (keyword -> value),
        fetched with one extra request per instance.
        """
        instances: list[dict[str, Any]] = self.find("Instance", {"StudyInstanceUID": study_uid})
        if tags:
            for inst in instances:
                inst["Tags"] = self.instance_tags(inst["ID"])
        return instances

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """GET /instances/{id}/simplified-tags (keyword -> value)."""
        return self.get(f"/instances/{instance_id}/simplified-tags")  # type: ignore[no-any-return]

    def get_file(self, instance_id: str) -> bytes:
        """The stored DICOM Part 10 file of one instance."""
        return self.request("GET", f"/instances/{instance_id}/file", raw=True)  # type: ignore[no-any-return]

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or replace) a remote modality at runtime (PUT /modalities/{name})."""
        self.request("PUT", f"/modalities/{urllib.parse.quote(name)}", [aet, host, int(port)])
        self.modalities[name] = [aet, host, int(port)]

    def echo(self, modality_name: str, timeout: float = 10.0) -> bool:
        """C-ECHO from Orthanc to a declared modality; True on success."""
        try:
            self.request(
                "POST",
                f"/modalities/{urllib.parse.quote(modality_name)}/echo",
                {"Timeout": int(timeout)},
                timeout=timeout + 5,
            )
        except OrthancError:
            return False
        return True

    def send_to_modality(
        self,
        modality_name: str,
        resource_ids: str | Iterable[str],
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """C-STORE resources (instance/series/study/patient ids) to a modality.

        Synchronous: returns when Orthanc's store job has finished, with the
        job's answer. Raises ``OrthancError`` when the C-STORE fails.
        """
        ids = [resource_ids] if isinstance(resource_ids, str) else list(resource_ids)
        answer = self.request(
            "POST",
            f"/modalities/{urllib.parse.quote(modality_name)}/store",
            {"Resources": ids, "Synchronous": True, "Timeout": int(timeout)},
            timeout=timeout + 10,
        )
        return answer if isinstance(answer, dict) else {"Answer": answer}

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 10.0,
        interval: float = 0.1,
        message: str = "condition",
    ) -> T:
        """Like module-level :func:`wait_for`, but fails early if Orthanc died."""

        def checked() -> T:
            if not self.running:
                raise OrthancError(f"Orthanc is not running; log tail:\n{self.log_tail()}")
            return predicate()

        return wait_for(checked, timeout=timeout, interval=interval, message=message)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<OrthancServer {self.aet} dicom={self.dicom_port} http={self.http_port} {state}>"
