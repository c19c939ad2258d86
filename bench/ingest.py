"""Ingest: the same instances C-STOREd to dcmtk's storescp, a private Orthanc and ``breastai listen``.

One cell is (instance set, concurrent associations). For each cell the bench
builds fresh studies (new UIDs, one patient each: ``copies_of`` of
``tests/faults/traffic.py``), writes them once, and sends the very same
files to every receiver in turn, all on this machine:

``sink``
    ``storescp --fork --ignore``: receives and answers, stores nothing. The
    ceiling of the sender and the loopback transport, not a reference.
``storescp``
    ``storescp --fork -od DIR``: dcmtk writing each instance to a folder,
    without fsync.
``orthanc``
    A private Orthanc from ``tests/integration/orthanc.py`` (its own config:
    storage fsynced, ``SyncStorageArea`` is on by default since 1.7.4), with
    ``DicomThreadsCount`` 4 (Orthanc's default; the test harness uses 2).
``breastai``
    ``breastai listen --queue rabbitmq``: the listener alone, as deployed
    with a separate worker. Every instance is fsynced to a real spool before
    its 0x0000; complete studies are published to RabbitMQ (a queue of the
    bench's own, deleted afterwards). No worker runs, so nothing else
    competes for the CPU. ``serve`` would load the models and start
    analysing studies as they complete.

dcmtk tools run with ``TCP_NODELAY=1`` (without it DCMTK waits for Nagle,
about 45 ms per instance). One sender for every receiver: dcmtk's
``storescu`` by default (one process per association, each sending its
share of the studies, dealt round-robin like ``send_concurrently``), or
pynetdicom (``tests/faults/traffic.py``'s ``send_concurrently``). Only
instances answered 0x0000 are counted; anything else stops the bench.

A cell's clock runs from the start of the first association to the end of
the last; the receiver then settles (our listener: every study published)
before the next one is measured, and ``sync`` is called before each run so
that one receiver's unwritten pages do not slow the next.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from tests import dicom_factory
from tests.e2e.conftest import ServiceProcess
from tests.faults.traffic import Sent, Study, copies_of, send_concurrently
from tests.integration.orthanc import OrthancServer, free_tcp_ports

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
OUR_AE = "BREASTAI"
SENDER_AE = "BENCHSCU"
SUCCESS_LINE = "Received Store Response (Success)"
SETTLE_TIMEOUT_S = 180.0
RECEIVERS = ("sink", "storescp", "orthanc", "breastai")
SENDERS = ("storescu", "pynetdicom")

T = TypeVar("T")


class IngestFailure(RuntimeError):
    """An instance was not answered 0x0000, a receiver did not start, or a sender failed."""


def system_tool(name: str) -> str:
    """A dcmtk tool from the system directories (``.venv/bin`` holds pynetdicom apps of the same names)."""
    path = shutil.which(name, path=SYSTEM_PATH)
    if path is None:
        raise IngestFailure(f"{name} not found in {SYSTEM_PATH} (make deps-system)")
    return path


def _dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


# ----------------------------------------------------------------------------------------- instances


@dataclass(frozen=True)
class InstanceSet:
    """What one cell sends: studies holding one copy of each template."""

    name: str
    label: str
    templates: tuple[Path, ...]
    studies: int

    @property
    def instances(self) -> int:
        return self.studies * len(self.templates)


def make_templates(folder: Path, us_studies: int, mg_images: int) -> list[InstanceSet]:
    """The two instance sets: US (800x600 8-bit MONOCHROME2 + 800x600 RGB per study) and MG (3000x2400 16-bit)."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = dicom_factory.synthetic_breast_image(rows=600, columns=800, seed=38)
    mono = dicom_factory.write_dataset(dicom_factory.make_us_dataset(grey), folder / "us-mono.dcm")
    rgb = dicom_factory.write_dataset(dicom_factory.make_us_dataset(grey, photometric="RGB"), folder / "us-rgb.dcm")
    rng = np.random.default_rng(38)
    views = []
    for view in ("CC", "MLO"):
        # Smooth tissue plus noise within 12 bits stored; uncompressed, so only the size matters.
        rows, columns = 3000, 2400
        ramp = np.linspace(400, 3200, columns, dtype=np.float32)[None, :].repeat(rows, axis=0)
        pixels = np.clip(ramp + rng.normal(0, 120, size=(rows, columns)), 0, 4095).astype(np.uint16)
        views.append(
            dicom_factory.write_dataset(dicom_factory.make_mg_dataset(pixels, view=view), folder / f"mg-{view}.dcm")
        )
    sets = [InstanceSet("us", "US 800x600 mono+RGB", (mono, rgb), max(1, us_studies))]
    if mg_images > 0:
        sets.append(InstanceSet("mg", "MG 3000x2400 16-bit", tuple(views), max(1, (mg_images + 1) // 2)))
    return sets


@dataclass(frozen=True)
class Cell:
    """One set's fresh studies dealt over ``associations`` associations, written once for every receiver."""

    instance_set: InstanceSet
    associations: int
    studies: tuple[Study, ...]
    folders: tuple[Path, ...]  # one per association, holding its share
    instances: int
    megabytes: float  # the Part 10 files' sizes, 10^6 bytes

    @property
    def label(self) -> str:
        return f"{self.instance_set.label}, {self.instances} instances over {self.associations} association(s)"


def make_cell(instance_set: InstanceSet, associations: int, folder: Path, tag: str) -> Cell:
    """Fresh copies (new UIDs, a patient per study) of the set's templates, written share by share."""
    studies = copies_of(list(instance_set.templates), instance_set.studies, prefix=f"BENCH{tag}")
    shares = deal(studies, associations)
    folders = []
    size = 0
    for index, share in enumerate(shares):
        target = folder / f"association-{index}"
        for study in share:
            for ds in study.instances:
                path = dicom_factory.write_dataset(ds, target / f"{ds.SOPInstanceUID}.dcm")
                size += path.stat().st_size
        folders.append(target)
    instances = sum(len(study.instances) for study in studies)
    return Cell(instance_set, associations, tuple(studies), tuple(folders), instances, size / 1e6)


def deal(items: Sequence[T], hands: int) -> list[list[T]]:
    """``items`` dealt round-robin into ``hands`` non-empty hands (as ``send_concurrently`` deals studies)."""
    return [list(items[i::hands]) for i in range(max(1, hands)) if items[i::hands]]


# ----------------------------------------------------------------------------------------- senders


def send_with_storescu(port: int, called_ae: str, cell: Cell, logs: Path) -> float:
    """One dcmtk ``storescu`` per association, all started together; seconds from the first start to the last end.

    Raises
    ------
    IngestFailure
        A storescu failed, or fewer of its instances than it sent were answered Success (0x0000).
    """
    storescu = system_tool("storescu")
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    started = time.perf_counter()
    for index, folder in enumerate(cell.folders):
        log = (logs / f"storescu-{index}.log").open("wb")
        command = [storescu, "-v", "-aet", SENDER_AE, "-aec", called_ae, "+sd", "127.0.0.1", str(port), str(folder)]
        processes.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_dcmtk_env()), log))
    for process, log in processes:
        process.wait(timeout=3600)
        log.close()
    elapsed = time.perf_counter() - started
    problems = []
    for index, ((process, _), folder) in enumerate(zip(processes, cell.folders, strict=True)):
        text = (logs / f"storescu-{index}.log").read_text(errors="replace")
        problem = storescu_problem(text, sum(1 for _ in folder.glob("*.dcm")), process.returncode)
        if problem is not None:
            problems.append(f"association {index}: {problem}")
    if problems:
        raise IngestFailure("not every instance was answered 0x0000:\n  " + "\n  ".join(problems))
    return elapsed


def storescu_problem(log: str, sent: int, returncode: int) -> str | None:
    """What went wrong in one ``storescu -v`` run, or None when it exited 0 and each file was answered Success.

    dcmtk logs one ``Received Store Response (...)`` per instance; only ``Success`` is status 0x0000 (warnings,
    e.g. 0xB000, are named ``Warning``), so anything else, or fewer Success lines than files, is a failure.
    """
    lines = log.splitlines()
    answered = sum(1 for line in lines if SUCCESS_LINE in line)
    if returncode == 0 and answered == sent:
        return None
    other = [line.strip() for line in lines if "Store Response" in line and SUCCESS_LINE not in line]
    errors = [line.strip() for line in lines if line.startswith(("E:", "F:"))]
    detail = "; ".join((other + errors)[:5])
    return f"{answered} of {sent} answered 0x0000, exit {returncode}" + (f"; {detail}" if detail else "")


def send_with_pynetdicom(port: int, called_ae: str, cell: Cell, logs: Path) -> float:
    """``send_concurrently`` of ``tests/faults/traffic.py`` (pynetdicom, one thread per association).

    Raises
    ------
    IngestFailure
        An instance was answered anything but 0x0000 (or not at all).
    """
    sent = Sent()
    started = time.perf_counter()
    send_concurrently(port, list(cell.studies), cell.associations, sent)
    elapsed = time.perf_counter() - started
    failures = sent.failures()
    acknowledged = len(sent.acknowledged())
    if failures or acknowledged != cell.instances:
        statuses = ", ".join(f"0x{status & 0xFFFF:04X} x{count}" for status, count in failures.items())
        raise IngestFailure(f"{acknowledged} of {cell.instances} answered 0x0000; other statuses: {statuses or 'none'}")
    return elapsed


SENDER_FUNCTIONS: dict[str, Callable[[int, str, Cell, Path], float]] = {
    "storescu": send_with_storescu,
    "pynetdicom": send_with_pynetdicom,
}


# ----------------------------------------------------------------------------------------- receivers


class Receiver(Protocol):
    name: str
    port: int
    called_ae: str

    def start(self) -> None: ...

    def settle(self, cell: Cell) -> dict[str, Any]:
        """Wait until what was just sent is fully handled; returns what was checked."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def stop(self) -> None: ...


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise IngestFailure(f"{what} exited with {process.returncode} at start")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise IngestFailure(f"{what} did not listen on {port} within {timeout:.0f} s")


class StorescpReceiver:
    """dcmtk ``storescp --fork`` (one process per association), storing into a folder, or ``--ignore`` (the sink)."""

    called_ae = "STORESCP"

    def __init__(self, workdir: Path, ignore: bool = False) -> None:
        self.name = "sink" if ignore else "storescp"
        self.ignore = ignore
        self.folder = workdir / self.name
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        storage = ["--ignore"] if self.ignore else ["-od", str(self.folder)]
        for _attempt in range(3):
            (self.port,) = free_tcp_ports(1)
            log = (self.folder.parent / f"{self.name}.log").open("ab")
            self._process = subprocess.Popen(
                [system_tool("storescp"), "--fork", *storage, str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_dcmtk_env(),
                start_new_session=True,  # its forked children are in its process group, stopped with it
            )
            log.close()
            try:
                _wait_for_port(self.port, self._process, self.name)
                return
            except IngestFailure:
                self.stop()
        raise IngestFailure(f"{self.name} did not start")

    def settle(self, cell: Cell) -> dict[str, Any]:
        if self.ignore:
            return {"stored": None}
        stored = [p for p in self.folder.iterdir() if p.is_file()]
        for path in stored:  # counted, then removed: the next cell starts from an empty folder
            path.unlink()
        return {"stored": len(stored), "expected": cell.instances, "ok": len(stored) == cell.instances}

    def describe(self) -> dict[str, Any]:
        storage = "receives and answers, stores nothing" if self.ignore else "writes each instance to a folder"
        return {"command": f"storescp --fork {'--ignore' if self.ignore else '-od DIR'} PORT", "what": storage}

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


class OrthancReceiver:
    """A private Orthanc (the integration tests' harness) with Orthanc's default 4 DICOM threads."""

    name = "orthanc"
    called_ae = "ORTHANC"

    def __init__(self, threads: int = 4) -> None:
        self.threads = threads
        self.server = OrthancServer(aet=self.called_ae, extra_config={"DicomThreadsCount": threads})
        self.port = 0
        self._expected = 0
        self._described: dict[str, Any] = {}

    def start(self) -> None:
        self.server.start()
        self.port = self.server.dicom_port
        config = self.server.config()
        self._described = {
            "version": self.server.system().get("Version"),
            "what": "tests/integration/orthanc.py harness; storage fsynced (SyncStorageArea default true)",
            "DicomThreadsCount": config["DicomThreadsCount"],
            "StorageCompression": config["StorageCompression"],
        }

    def settle(self, cell: Cell) -> dict[str, Any]:
        self._expected += cell.instances
        stored = int(self.server.get("/statistics")["CountInstances"])
        return {"stored": stored, "expected": self._expected, "ok": stored == self._expected}

    def describe(self) -> dict[str, Any]:
        return dict(self._described)

    def stop(self) -> None:
        self.server.stop()


def _vm_hwm_mib(pid: int) -> float | None:
    """A live process's peak resident memory (``VmHWM`` of ``/proc/<pid>/status``), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _tree_vm_hwm_mib(pid: int) -> float | None:
    """``_vm_hwm_mib`` of a live process plus its children's: the listener and its receiver processes, if any.

    Each process's own peak, summed: an upper bound of what they held together (their peaks need not coincide).
    """
    own = _vm_hwm_mib(pid)
    if own is None:
        return None
    children: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children += [int(child) for child in (task / "children").read_text().split()]
    except OSError:
        return own
    return round(own + sum(_vm_hwm_mib(child) or 0.0 for child in children), 1)


class ListenerReceiver:
    """``breastai listen --queue rabbitmq`` on a fresh spool, as a process (``tests/e2e/conftest.py``'s ServiceProcess).

    Its queue is the bench's own (``BREASTAI_QUEUE_NAME``), deleted at :meth:`stop`.
    """

    name = "breastai"
    called_ae = OUR_AE

    def __init__(self, workdir: Path, amqp_url: str = AMQP_URL) -> None:
        self.workdir = workdir / "breastai"
        self.spool = self.workdir / "spool"
        self.amqp_url = amqp_url
        self.queue_name = f"breastai.bench.{uuid.uuid4().hex[:10]}"
        self.port = 0
        self.process: ServiceProcess | None = None
        self._expected_jobs = 0
        self.peak_rss_mib: float | None = None

    def start(self) -> None:
        import pika  # a dependency of the service; checked here so a missing broker fails before any sending

        try:
            pika.BlockingConnection(pika.URLParameters(self.amqp_url)).close()
        except Exception as exc:
            raise IngestFailure(f"RabbitMQ does not answer at {self.amqp_url} (make rabbitmq): {exc}") from exc
        self.spool.mkdir(parents=True, exist_ok=True)
        (self.port,) = free_tcp_ports(1)
        args = [
            "--port", str(self.port), "--bind-address", "127.0.0.1", "--ae-title", OUR_AE,
            "--spool-dir", str(self.spool), "--destination", str(self.workdir / "results"),
            "--queue", "rabbitmq", "--amqp-url", self.amqp_url, "--metrics-port", "0", "--log-format", "json",
        ]  # fmt: skip
        self.process = ServiceProcess(
            "listen", args, self.workdir / "listen.log", env={"BREASTAI_QUEUE_NAME": self.queue_name}
        ).start()
        self.process.wait_for_echo(self.port)

    def _published(self) -> int:
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            frame = connection.channel().queue_declare(self.queue_name, passive=True)
            return int(frame.method.message_count)
        except Exception:  # not declared yet: nothing published
            return 0
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    def settle(self, cell: Cell) -> dict[str, Any]:
        """Wait until every study sent so far was sealed and published (the listener is idle again)."""
        self._expected_jobs += len(cell.studies)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        published = self._published()
        while published < self._expected_jobs and time.monotonic() < deadline:
            time.sleep(0.5)
            published = self._published()
        return {"jobs_published": published, "expected": self._expected_jobs, "ok": published == self._expected_jobs}

    def describe(self) -> dict[str, Any]:
        return {
            "command": "breastai listen --queue rabbitmq (defaults otherwise: quiet period 5 s, INFO json log)",
            "what": "each instance fsynced to the spool before 0x0000; studies published to RabbitMQ; no worker",
            # The listener takes its settings from this environment too: receiver processes, if set there.
            "listener_processes": os.environ.get("BREASTAI_LISTENER_PROCESSES", "default"),
            "peak_rss_mib": self.peak_rss_mib,
        }

    def stop(self) -> None:
        if self.process is not None and self.process.process is not None:
            self.peak_rss_mib = _tree_vm_hwm_mib(self.process.process.pid)
            self.process.kill()
            self.process = None
        with contextlib.suppress(Exception):
            import pika

            connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
            channel = connection.channel()
            for queue in (self.queue_name, f"{self.queue_name}.dead"):
                channel.queue_delete(queue)
            channel.exchange_delete(f"{self.queue_name}.dlx")
            connection.close()

    def log_tail(self, chars: int = 3000) -> str:
        path = self.workdir / "listen.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def make_receiver(name: str, workdir: Path) -> Receiver:
    if name == "sink":
        return StorescpReceiver(workdir, ignore=True)
    if name == "storescp":
        return StorescpReceiver(workdir)
    if name == "orthanc":
        return OrthancReceiver()
    if name == "breastai":
        return ListenerReceiver(workdir)
    raise ValueError(f"unknown receiver {name!r} (one of {', '.join(RECEIVERS)})")


# ----------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Measurement:
    """One receiver's time for one cell (one repeat)."""

    instance_set: str
    associations: int
    receiver: str
    repeat: int
    instances: int  # answered 0x0000 (all of them, or the bench stopped)
    megabytes: float
    seconds: float
    settled: dict[str, Any] = field(default_factory=dict)

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "set": self.instance_set,
            "associations": self.associations,
            "receiver": self.receiver,
            "repeat": self.repeat,
            "instances": self.instances,
            "megabytes": round(self.megabytes, 3),
            "seconds": round(self.seconds, 4),
            "instances_per_s": round(self.instances_per_s, 2),
            "mb_per_s": round(self.mb_per_s, 2),
            "settled": self.settled,
        }


@dataclass(frozen=True)
class IngestOptions:
    us_studies: int = 60
    mg_images: int = 10
    associations: tuple[int, ...] = (1, 4)
    repeats: int = 1
    sender: str = "storescu"
    receivers: tuple[str, ...] = RECEIVERS
    workdir: Path | None = None
    keep: bool = False


@contextlib.contextmanager
def _workdir(options: IngestOptions) -> Iterator[Path]:
    base = options.workdir
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="breastai-bench-", dir=base))
    previous = tempfile.tempdir
    tempfile.tempdir = str(folder)  # the Orthanc harness makes its storage with mkdtemp: on the same file system
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        if not options.keep:
            shutil.rmtree(folder, ignore_errors=True)


def run_ingest(options: IngestOptions, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every cell on every receiver; returns the JSON-ready results (measurements, sets, receivers).

    Raises
    ------
    IngestFailure
        An instance was not answered 0x0000, or a receiver or the sender failed: nothing is reported then.
    """
    if options.sender not in SENDER_FUNCTIONS:
        raise ValueError(f"unknown sender {options.sender!r} (one of {', '.join(SENDERS)})")
    send = SENDER_FUNCTIONS[options.sender]
    measurements: list[Measurement] = []
    with _workdir(options) as workdir, contextlib.ExitStack() as running:
        sets = make_templates(workdir / "templates", options.us_studies, options.mg_images)
        receivers: list[Receiver] = []
        for name in options.receivers:
            receiver = make_receiver(name, workdir / "receivers")
            progress(f"ingest: starting {name}")
            receiver.start()
            running.callback(receiver.stop)
            receivers.append(receiver)
        for repeat in range(options.repeats):
            for instance_set in sets:
                for associations in options.associations:
                    tag = f"{instance_set.name.upper()}{associations}R{repeat}"
                    cell = make_cell(instance_set, associations, workdir / "send" / tag, tag)
                    progress(f"ingest: {cell.label} ({cell.megabytes:.0f} MB)")
                    # Each repeat starts with another receiver, so no one always runs first (or after another).
                    for receiver in receivers[repeat % len(receivers) :] + receivers[: repeat % len(receivers)]:
                        os.sync()
                        logs = workdir / "logs" / tag / receiver.name
                        try:
                            seconds = send(receiver.port, receiver.called_ae, cell, logs)
                        except IngestFailure as exc:
                            raise IngestFailure(f"{receiver.name}, {cell.label}: {exc}") from exc
                        settled = receiver.settle(cell)
                        if settled.get("ok") is False:
                            progress(f"ingest: WARNING {receiver.name} after {cell.label}: {settled}")
                        measurement = Measurement(
                            instance_set.name, associations, receiver.name, repeat,
                            cell.instances, cell.megabytes, seconds, settled,
                        )  # fmt: skip
                        measurements.append(measurement)
                        progress(
                            f"  {receiver.name:<9} {seconds:7.2f} s  {measurement.instances_per_s:7.1f} inst/s  "
                            f"{measurement.mb_per_s:6.1f} MB/s"
                        )
                    shutil.rmtree(workdir / "send" / tag, ignore_errors=True)
        running.close()  # stop the receivers now: the listener's peak RSS is read as it stops
        described = {receiver.name: receiver.describe() for receiver in receivers}
    return {
        "sender": _sender_description(options.sender),
        "receivers": described,
        "sets": {
            s.name: {
                "label": s.label,
                "studies_per_cell": s.studies,
                "instances_per_study": len(s.templates),
                "instances_per_cell": s.instances,
            }
            for s in sets
        },
        "associations": list(options.associations),
        "repeats": options.repeats,
        "measurements": [m.to_json() for m in measurements],
    }


def _sender_description(sender: str) -> str:
    if sender == "storescu":
        return "dcmtk storescu -v +sd DIR, one process per association (TCP_NODELAY=1), studies dealt round-robin"
    return "pynetdicom send_concurrently (tests/faults/traffic.py), one thread per association"
