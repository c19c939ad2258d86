"""Several listener processes on one port, one study tracker (``listener_processes``, issue 38).

A Python process receives DICOM no faster than one core lets it: pynetdicom
decodes every PDU and DIMSE message in Python under the GIL, so four
associations in one process went no faster than one (bench/README.md).
:class:`ReceiverPool` spreads associations over processes while keeping
the one thing that must stay single, the decision that a study is complete:

- this process (the one running the :class:`~service.dispatcher.Dispatcher`)
  binds the listening socket and starts ``listener_processes`` receiver
  processes, which inherit it and all accept on it (the kernel gives each
  connection to one);
- a receiver is a :class:`~service.listener.StudyListener` like the
  single-process one: it checks, spools (fsync before 0x0000, PS3.4 B.2.3)
  and answers, and tells this process what it stored and when each
  association ended, over a pipe; its counts go the same way, to the
  Prometheus metrics served here;
- the spool takes an ``flock`` around the renames into and out of
  ``incoming/`` (:class:`~service.spool.Spool`), so a receiver storing
  while this process seals is as safe as two threads were.

Nothing acknowledged depends on the pipe: an instance is on disk before its
message is sent. A receiver that dies takes its associations with it (the
senders see the connection drop and re-send): their studies are held open
as interrupted, as a restart holds the studies it finds
(:meth:`StudyTracker.association_interrupted`), the unsealed studies no
message announced are adopted from the spool the same way
(:meth:`Dispatcher.adopt_unsealed`), and the receiver is started again.
When this process stops or dies, the receivers see their channel close and
stop too; they ignore SIGTERM and SIGINT, which a service manager or a
terminal sends to the whole group: this process stops them in order.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from service.errors import ConfigurationError
from service.listener import ListenerCounters, StoreSink, StudyListener
from service.settings import Settings
from service.spool import Spool

log = structlog.get_logger("service.receivers")

#: How long :meth:`ReceiverPool.start` waits for every receiver to accept (a new interpreter importing pydicom).
START_TIMEOUT_S = 120.0
#: How long a stopping receiver may take before it is terminated.
STOP_TIMEOUT_S = 10.0
#: How long binding the port is retried while it is in use (receivers of a killed predecessor still closing).
BIND_RETRY_S = 10.0
#: Delay before a receiver that died is started again, doubled while it keeps dying, up to the cap.
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_CAP_S = 30.0
#: A receiver that lived this long before dying starts again after the first delay.
STABLE_AFTER_S = 60.0

_STOP = "stop"
_LENGTH = struct.Struct("!I")


#: The most receivers ``listener_processes = 0`` chooses (each holds its own interpreter, 130-180 MB measured).
AUTO_MAX_PROCESSES = 4


def receiver_processes(setting: int, with_worker: bool, cpus: int) -> int:
    """How many processes receive: ``setting`` (``listener_processes``) unless it is 0, which chooses.

    Chosen: 1 (in the tracking process) beside a worker in the same
    process (``breastai serve``), which needs the cores for analysis;
    otherwise one per core, at most :data:`AUTO_MAX_PROCESSES`. On the
    2-core bench machine two receivers took 4 associations at 1.3-1.5
    times one process's rate and one association at the same
    (bench/README.md).
    """
    if setting > 0:
        return setting
    return 1 if with_worker else max(1, min(cpus, AUTO_MAX_PROCESSES))


def usable_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota where one is set.

    ``os.sched_getaffinity`` alone sees every core of a Kubernetes node, where a container limited to a quarter
    of a core would then start four receivers. ``cpu.max`` holds ``"<quota> <period>"`` or ``"max <period>"``.
    """
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    try:
        return max(1, min(cpus, math.ceil(int(quota) / int(period))))
    except (ValueError, ZeroDivisionError):
        return cpus


class TrackingSink(StoreSink, Protocol):
    """What the pool reports to (the :class:`~service.dispatcher.Dispatcher`): a listener's sink, and more."""

    def association_interrupted(self, association_id: str) -> None: ...

    def adopt_unsealed(self) -> list[str]: ...


class Channel:
    """Messages between the pool and one receiver: pickled, length-prefixed, over a socket pair.

    Both ends belong to this service (the pair is made by the pool and
    handed to the receiver it starts), so pickle reads only what we wrote.
    Sends are serialised by a lock: association threads send concurrently.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock
        self._lock = threading.Lock()

    def send(self, message: object) -> None:
        data = pickle.dumps(message)
        with self._lock:
            self._socket.sendall(_LENGTH.pack(len(data)) + data)

    def recv(self) -> Any:
        """The next message; ``EOFError`` once the other end is closed."""
        (length,) = _LENGTH.unpack(self._read(_LENGTH.size))
        return pickle.loads(self._read(length))

    def _read(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = self._socket.recv(size - len(chunks))
            if not chunk:
                raise EOFError("the other end of the channel closed")
            chunks += chunk
        return bytes(chunks)

    def close(self) -> None:
        self._socket.close()


# ---------------------------------------------------------------------------------------------- receiver side


class _Forwarder(ListenerCounters):
    """In a receiver: the listener's sink and counters, each call one message to the pool."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def instance_stored(self, study_uid: str, association_id: str, calling_ae: str = "") -> None:
        self._channel.send(("stored", study_uid, association_id, calling_ae))

    def association_released(self, association_id: str) -> None:
        self._channel.send(("ended", association_id))

    def received(self, modality: str) -> None:
        self._count("received", modality)

    def rejected(self, reason: str) -> None:
        self._count("rejected", reason)

    def association_rejected(self, reason: str) -> None:
        self._count("association_rejected", reason)

    def _count(self, counter: str, label: str) -> None:
        # A count must not turn a stored instance's 0x0000 into a failure: with the pool gone (and this receiver
        # about to go), it is dropped.
        try:
            self._channel.send(("count", counter, label))
        except OSError:
            log.warning("count_not_forwarded", counter=counter)


def receive(settings: Settings, listening: socket.socket, channel: Channel) -> None:
    """A receiver: a StudyListener accepting on ``listening`` until told to stop, or until the pool is gone."""
    forwarder = _Forwarder(channel)
    try:
        # The parent opened the spool and kept it (completions, reserve) before starting the receivers.
        listener = StudyListener(
            settings, Spool.from_settings(settings, housekeeping=False), forwarder, counters=forwarder
        )
        listener.start(listening)
    except Exception as exc:
        channel.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise
    channel.send(("ready",))
    try:
        while channel.recv() != _STOP:
            pass
    except (EOFError, OSError):
        # The pool's process is gone (killed): nothing tracks what we would receive, and its successor needs the
        # port. Stop accepting and go now, as that process went; a sender cut off re-sends.
        listening.close()
        listener.stop()
        log.warning("receiver_orphaned")
        sys.stderr.flush()
        os._exit(0)
    listening.close()
    listener.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a receiver process: ``python -m service.receivers CHANNEL_FD LISTENING_FD``.

    Started by :class:`ReceiverPool` only; the settings arrive as the first
    message of the channel.
    """
    channel_fd, listening_fd = (int(value) for value in (argv if argv is not None else sys.argv[1:]))
    channel = Channel(socket.socket(fileno=channel_fd))
    listening = socket.socket(fileno=listening_fd)
    settings: Settings = channel.recv()
    from service.logging import configure_logging

    configure_logging(settings)
    # Ctrl-C reaches the whole process group, systemd's SIGTERM the whole unit: the pool's process stops its
    # receivers itself, in order (a receiver killed first would look like one that died).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    receive(settings, listening, channel)
    return 0


# ---------------------------------------------------------------------------------------------- pool side


@dataclass
class _Slot:
    """One receiver process and what the pool knows of it."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    channel: Channel | None = None
    started_at: float = 0.0
    ready: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None
    associations: set[str] = field(default_factory=set)  # stored something, not ended yet
    backoff_s: float = RESTART_BACKOFF_S


def _listening_socket(host: str, port: int, backlog: int, retry_s: float = BIND_RETRY_S) -> socket.socket:
    """A bound, listening, non-blocking TCP socket; IPv4 first where the name has both, as pynetdicom binds.

    A port in use is retried for ``retry_s``: the receivers of a
    predecessor that was killed close it within a second or so.
    """
    entries = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = next((entry for entry in entries if entry[0] == socket.AF_INET), entries[0])
    deadline = time.monotonic() + retry_s
    while True:
        try:
            listening = socket.create_server(address[:2], family=family, backlog=backlog)
            break
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    # Non-blocking for every process (the flag belongs to the shared socket): a connection every receiver was
    # woken for is accepted by one; the others' accept() then fails at once instead of waiting for the next.
    listening.setblocking(False)
    return listening


class ReceiverPool:
    """Receiver processes on one port, reporting to one tracker.

    Stands in for a :class:`~service.listener.StudyListener` (``start``,
    ``stop``, ``port``) where more than one process receives. Each
    receiver is ``python -m service.receivers`` with the listening socket and
    its end of a socket pair passed as file descriptors: a fresh interpreter
    that inherits neither this process's threads nor its ``__main__``.

    Parameters
    ----------
    settings
        As for the listener.
    processes
        How many receivers to start (:func:`receiver_processes`).
    sink
        Told of every stored instance and ended association (the dispatcher).
    counters
        Where the receivers' counts go; by default this process's metrics.
    """

    def __init__(
        self, settings: Settings, processes: int, sink: TrackingSink, counters: ListenerCounters | None = None
    ) -> None:
        # The receivers are told how many they are (listener_processes resolved): each then keeps its share of the
        # spool quota's headroom (service.spool.SpoolQuota).
        self._settings = dataclasses.replace(settings, listener_processes=processes)
        self._sink = sink
        self._counters = counters or ListenerCounters()
        self._socket: socket.socket | None = None
        self._slots = [_Slot(index) for index in range(processes)]
        self._started = False  # until start() returns, a receiver that dies fails the start instead of restarting
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the slots' fields
        self._spawn_lock = threading.Lock()
        self._followers: list[threading.Thread] = []

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return int(self._socket.getsockname()[1]) if self._socket is not None else self._settings.port

    def alive(self) -> int:
        """How many receivers are running and accepting."""
        with self._lock:
            return sum(
                1
                for slot in self._slots
                if slot.process is not None and slot.process.poll() is None and slot.ready.is_set()
            )

    def open_associations(self) -> list[int]:
        """Per receiver: its associations that stored something and have not ended (for tests and operators)."""
        with self._lock:
            return [len(slot.associations) for slot in self._slots]

    def pids(self) -> list[int]:
        """The receivers' process ids (for tests and operators)."""
        with self._lock:
            return [slot.process.pid for slot in self._slots if slot.process is not None]

    def start(self) -> None:
        """Bind the port and start every receiver; returns once each accepts.

        Raises
        ------
        ConfigurationError
            A receiver could not start (its reason, e.g. unreadable TLS files),
            or not within :data:`START_TIMEOUT_S`; none is left running.
        """
        backlog = max(5, self._settings.max_associations)
        self._socket = _listening_socket(self._settings.bind_address, self._settings.port, backlog)
        for slot in self._slots:
            self._spawn(slot)
        deadline = time.monotonic() + START_TIMEOUT_S
        for slot in self._slots:
            started = slot.ready.wait(max(0.0, deadline - time.monotonic()))
            if not started or slot.failure is not None:
                reason = slot.failure or f"not accepting within {START_TIMEOUT_S:.0f} s"
                self.stop()
                raise ConfigurationError(f"receiver process {slot.index} could not start: {reason}")
        self._started = True
        # One that was ready and died while a later one was awaited is not restarted (its follower saw a start
        # in progress): found here instead of leaving the pool a receiver short.
        for slot in self._slots:
            if slot.failure is not None or slot.process is None or slot.process.poll() is not None:
                self.stop()
                raise ConfigurationError(f"receiver process {slot.index} exited during start-up: {slot.failure}")
        log.info("receivers_started", processes=len(self._slots), port=self.port, pids=self.pids())

    def _spawn(self, slot: _Slot) -> None:
        # Under the spawn lock: stop() sets _stopping under it too, so no receiver starts after stop() looked.
        with self._spawn_lock:
            if self._stopping.is_set() or self._socket is None:
                return
            ours, theirs = socket.socketpair()
            channel = Channel(ours)
            fds = (theirs.fileno(), self._socket.fileno())
            process = None
            try:
                process = subprocess.Popen([sys.executable, "-m", "service.receivers", *map(str, fds)], pass_fds=fds)
                theirs.close()  # the receiver holds its end: EOF here once it is gone
                channel.send(self._settings)
            except OSError:
                theirs.close()
                channel.close()
                if process is not None:  # started, but it cannot be told its settings: not left as a zombie
                    process.kill()
                    process.wait()
                raise
            with self._lock:
                slot.ready.clear()
                slot.failure = None
                slot.process, slot.channel, slot.started_at = process, channel, time.monotonic()
            follower = threading.Thread(
                target=self._follow,
                args=(slot, process, channel),
                name=f"breastai-receiver-{slot.index}",
                daemon=True,
            )
            self._followers.append(follower)
            follower.start()

    def _follow(self, slot: _Slot, process: subprocess.Popen[bytes], channel: Channel) -> None:
        """Relay one receiver's messages until it is gone, then end its associations and start it again."""
        while True:
            try:
                message = channel.recv()
            except (EOFError, OSError):
                break
            except Exception:
                # Unreadable: nothing further from this receiver can be trusted, and an unread pair fills until
                # its associations hang before their success status. It is stopped, and started again below.
                log.exception("receiver_channel_broken", receiver=slot.index)
                process.kill()
                break
            try:
                self._handle(slot, message)
            except Exception:  # one message the tracker or the metrics refused: the next ones still count
                log.exception("receiver_message_failed", receiver=slot.index, kind=str(message[0])[:16])
        channel.close()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # its end of the pair closed, yet it lives: it cannot report any more
            process.kill()
            process.wait()
        with self._lock:
            orphaned, slot.associations = slot.associations, set()
        # Its associations were cut off with it: their studies wait for the re-send, as after a restart.
        for association_id in orphaned:
            self._sink.association_interrupted(association_id)
        if not self._started:  # start() is waiting for this one: it fails the start
            slot.failure = slot.failure or f"exited with code {process.returncode}"
            slot.ready.set()
            return
        if self._stopping.is_set():
            return
        log.error(
            "receiver_process_died", receiver=slot.index, exit_code=process.returncode, associations=len(orphaned)
        )
        try:
            self._sink.adopt_unsealed()
        except Exception:  # the next death or restart tries again; the dispatcher's recover() at start covers the rest
            log.exception("unsealed_adoption_failed")
        lived_s = time.monotonic() - slot.started_at
        delay = RESTART_BACKOFF_S if lived_s >= STABLE_AFTER_S else slot.backoff_s
        slot.backoff_s = min(delay * 2, RESTART_BACKOFF_CAP_S)
        while not self._stopping.wait(delay):
            try:
                self._spawn(slot)
                return
            except OSError:  # no memory, processes or descriptors to start it with (likely what killed it)
                log.exception("receiver_restart_failed", receiver=slot.index)
                delay = slot.backoff_s
                slot.backoff_s = min(delay * 2, RESTART_BACKOFF_CAP_S)

    def _handle(self, slot: _Slot, message: Any) -> None:
        kind = message[0]
        if kind == "stored":
            _, study_uid, association_id, calling_ae = message
            with self._lock:
                slot.associations.add(association_id)
            self._sink.instance_stored(study_uid, association_id, calling_ae=calling_ae)
        elif kind == "ended":
            with self._lock:
                slot.associations.discard(message[1])
            self._sink.association_released(message[1])
        elif kind == "count":
            _, counter, label = message
            getattr(self._counters, counter)(label)
        elif kind == "ready":
            slot.ready.set()
        elif kind == "failed":
            slot.failure = message[1]

    def stop(self) -> None:
        """Stop every receiver and close the port; idempotent."""
        with self._spawn_lock, self._lock:
            self._stopping.set()
            running = [(slot.process, slot.channel) for slot in self._slots if slot.process is not None]
        for _, channel in running:
            try:
                if channel is not None:
                    channel.send(_STOP)
            except OSError:
                pass  # already gone
        for process, _ in running:
            if process is None:
                continue
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:  # associations still going at the stop: cut them, as one process would
                log.warning("receiver_process_killed", pid=process.pid)
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        for follower in self._followers:
            follower.join(STOP_TIMEOUT_S)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        log.info("receivers_stopped")


if __name__ == "__main__":
    sys.exit(main())
