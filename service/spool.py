"""The durable spool: where received instances live until results are sent.

Layout under the spool root::

    tmp/<host>-<pid>-<hex>/           one process's partial writes (``.alive`` locked while it lives)
    incoming/<study_uid>/<sop>.dcm    acknowledged instances of a study still receiving
    studies/<job_id>/<sop>.dcm        a sealed study = one job (no instance is added after sealing)
    studies/<job_id>/job.json         the StudyJob document (rebuilt from the files if missing)
    studies/<job_id>/calling_ae.json  the AE titles that sent the study
    studies/<job_id>/published        marker: the queue confirmed the job
    studies/<job_id>/attempts         deliveries so far (both queues' retry counter)
    dead/<job_id>/...  + reason.txt   dead-lettered jobs, kept for an operator
    done/<job_id>                     completed jobs, remembered for 30 days (late duplicate deliveries)
    patients/<study_uid>              the study's patient key (a digest, not the identity), 30 days
    received/<study_uid>.json         SOP Instance UID -> sha256 of every instance sealed into a job, kept 30 days
    delivered/<study_uid>/            a delivered study's instances and report.sr, kept keep_delivered_s for a revision
    audit/associations-<date>.jsonl   one line per association: who sent what, what we answered (service.audit)
    .incoming.lock                    flock'ed while renaming into or out of incoming/ (several receiver processes)
    .reserve                          space held back so that finishing work succeeds on a full disk (see below)

Who deletes what:

- ``tmp/*``: :meth:`Spool.store_instance` removes its own file on failure;
  the folder of a process that is gone (no lock on ``.alive``, untouched
  for a day) is removed when a :class:`Spool` is opened (what it held was
  never acknowledged, so the peer still owns the instance).
- ``incoming/<study>``: never deleted, only renamed by :meth:`seal_study`.
- ``studies/<job_id>``: removed by :meth:`complete` once the results were
  accepted (by the queue, on ack), or moved to ``dead/`` by
  :meth:`dead_letter`.
- ``done/<job_id>``: forgotten after :data:`COMPLETED_KEEP_S` when a spool opens.
- ``dead/``: never deleted by the service.
- ``delivered/<study_uid>``: forgotten ``keep_delivered_s`` after its last delivery.
- ``patients/<study_uid>``, ``received/<study_uid>.json``: forgotten after
  :data:`COMPLETED_KEEP_S` when a spool opens.

A full disk: the listener refuses new instances (0xA700) once free space
falls below the reserve (:meth:`Spool.below_reserve`), so the service's own
writes do not fill the disk. If something else fills it, finishing work
(done records, dead-letter reasons, job files) that fails for want of
space deletes ``.reserve`` and tries once more; :meth:`Spool.ensure_reserve`
makes it again when space returns (the dispatcher calls it periodically).
A job file that still cannot be written is rebuilt in memory from the
instances, so a process starts on a full disk and catches up later.

Durability (PS3.4 B.2.3: a C-STORE success means the SCP has taken
responsibility for the instance): an instance is written to ``tmp/``,
flushed and fsynced, renamed into place, and its study folder, ``incoming/``
(the folder's own entry) and ``patients/`` (the study's marker) fsynced
before :meth:`store_instance` returns; only then may the SCP answer 0x0000.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from service import metrics
from service.durable import fsync_directory, write_durably, write_synced
from service.errors import BreastAIError, IntegrityError, InvalidInstance, JobSchemaError, PatientConflict
from service.schema import InstanceRef, StudyJob, is_valid_uid
from service.settings import Settings

log = structlog.get_logger("service.spool")

JOB_FILE = "job.json"
PUBLISHED_MARKER = "published"
ATTEMPTS_FILE = "attempts"
REASON_FILE = "reason.txt"
CALLING_AE_FILE = "calling_ae.json"
RESERVE_FILE = ".reserve"
REPORT_FILE = "report.sr"  # the SR a job delivered (written by the worker; kept with the study for a revision)
PREDECESSOR_FILE = "predecessor.sr"  # in a revision's job: the SR it revises (PS3.3 C.17.2, Predecessor Documents)
INSTANCE_SUFFIX = ".dcm"
#: Locked (``flock``) by whichever process renames into or out of ``incoming/`` (Spool._incoming_lock).
INCOMING_LOCK = ".incoming.lock"
#: Threads of a spool's I/O pool: stagings and a new study's folder fsyncs. Sized for the most associations a
#: listener accepts by default with room to spare: a task waiting for a thread only delays its own instance.
IO_THREADS = 32
#: How long a completed job's id is remembered (``done/``), to acknowledge late duplicate deliveries of it.
COMPLETED_KEEP_S = 30 * 24 * 3600.0


@dataclass(frozen=True)
class StoredInstance:
    """An instance that is durably on disk (fsynced file and directory).

    No digest here: hashing a 1 MB image costs the listener ~0.45 ms per
    C-STORE for nothing, since sealing hashes every instance it puts in a job
    (:meth:`Spool.seal_study`), once, off the receiving thread.
    """

    path: Path


@dataclass(frozen=True)
class UnsealedStudy:
    """An ``incoming/`` study found at recovery, with its newest file mtime."""

    study_uid: str
    newest_mtime: float
    instance_count: int


#: Held locked (``flock``) by the process that owns a ``tmp/`` folder,
#: so others can tell a live idle one from a dead one.
ALIVE_LOCK = ".alive"


def _close_all(descriptors: list[int]) -> None:
    while descriptors:
        os.close(descriptors.pop())


def _locked_by_a_live_process(folder: Path) -> bool:
    """Whether some process holds the ``flock`` on ``folder/.alive``.

    A folder without one (from before the lock) is not held.
    """
    try:
        descriptor = os.open(folder / ALIVE_LOCK, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(descriptor)  # closing also releases the lock this call may have taken
    return False


def verify_instances(job: StudyJob, root: Path) -> list[Path]:
    """The paths of ``job``'s instances under the spool ``root``, each checked against its recorded sha256.

    Raises
    ------
    IntegrityError
        Naming the first missing or changed file.
    """
    paths = []
    for ref in job.instances:
        path = root / ref.path
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError as exc:
            raise IntegrityError(f"spooled instance {ref.path} of job {job.job_id} is missing") from exc
        if digest != ref.sha256:
            raise IntegrityError(
                f"spooled instance {ref.path} of job {job.job_id} changed since it was sealed (sha256 {digest})"
            )
        paths.append(path)
    return paths


class StagedInstance:
    """An instance's bytes being written and fsynced under ``tmp/`` (:meth:`Spool.stage_instance`).

    Parameters
    ----------
    path
        The temporary file.
    pending
        The write, on the spool's I/O pool.
    """

    def __init__(self, path: Path, pending: Future[None]) -> None:
        self.path = path
        self._pending = pending

    def written(self) -> None:
        """Wait until the bytes are on disk; re-raises the write's ``OSError`` (the file is then gone)."""
        self._pending.result()

    def discard(self) -> None:
        """Wait for the write to end and remove the file: the instance was refused. Idempotent."""
        with contextlib.suppress(OSError):
            self._pending.result()
        self.path.unlink(missing_ok=True)


def read_patient_marker(marker: Path) -> str:
    """The patient key of a ``patients/<study_uid>`` marker: a symbolic link's target, or a file's text.

    Raises
    ------
    FileNotFoundError
        If there is no marker.
    """
    try:
        return os.readlink(marker)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: not a link, a marker written as a file
            raise
    return marker.read_text("ascii").strip()


@dataclass(frozen=True)
class DeadJob:
    """A dead-lettered job as an operator sees it (``breastai jobs list``)."""

    job_id: str
    study_uid: str
    instances: int
    reasons: str  # every delivery's reason, one per line, the first first
    dead_since: float  # epoch seconds of the folder's last change


def new_job_id(now: datetime | None = None) -> str:
    """A sortable, unique job id: UTC timestamp plus 12 random hex digits."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:12]}"


class Spool:
    """Filesystem-only durable store shared by listener and workers.

    Thread- and process-safe: the rename of an instance into
    ``incoming/<study>`` and the sealing rename of that directory take the
    same lock (a thread lock, and an ``flock`` on ``.incoming.lock`` for the
    receiver processes of service.receivers, which store while another
    process seals), so an instance lands either in the sealed job or in a
    fresh ``incoming/<study>`` that becomes the next job, never in between.

    Parameters
    ----------
    root
        The spool directory; created with its subdirectories if missing.
    housekeeping
        Forget completions past their keeping time and make the disk reserve on opening. A receiver process
        (service.receivers) opens the spool its parent has just kept so, and again on each restart: False.
    """

    def __init__(
        self, root: Path, reserve_bytes: int = 0, keep_delivered_s: float | None = None, housekeeping: bool = True
    ) -> None:
        self.root = Path(root)
        self.reserve_bytes = reserve_bytes
        self.keep_delivered_s = keep_delivered_s
        self._reserve = self.root / RESERVE_FILE
        # Each process writes its temporary files in a folder of its own, so a
        # worker or listener that starts (and cleans up after its own crashed
        # predecessor) never deletes another live process's half-written file.
        self._tmp_root = self.root / "tmp"
        self._own_tmp = self._tmp_root / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.incoming_dir = self.root / "incoming"
        self.studies_dir = self.root / "studies"
        self.dead_dir = self.root / "dead"
        self.done_dir = self.root / "done"
        self.patients_dir = self.root / "patients"
        self.received_dir = self.root / "received"
        self.delivered_dir = self.root / "delivered"
        for directory in (
            self.incoming_dir,
            self.studies_dir,
            self.dead_dir,
            self.done_dir,
            self.patients_dir,
            self.received_dir,
            self.delivered_dir,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._flock_descriptor: list[int] = []  # .incoming.lock, opened on first use (see _incoming_lock)
        weakref.finalize(self, _close_all, self._flock_descriptor)
        self._patients: dict[str, str] = {}  # study UID -> patient key bound on disk (see _bind_patient)
        # Threads that write and fsync beside the listener's (none starts before the first task; idle ones are reused).
        self._pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="spool-io")
        self._alive_descriptor: list[int] = []  # a list, so the finaliser below sees the descriptor taken later
        weakref.finalize(self, _close_all, self._alive_descriptor)
        _ = self.tmp_dir  # made now, and its lock taken, before any other process could judge it
        self._clean_tmp()
        if housekeeping:
            self._forget_old_completions()
            self.ensure_reserve()

    # --- disk space -----------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: Settings, housekeeping: bool = True) -> Spool:
        """The spool as the service runs it (its reserve, delivered studies kept): every sub-command opens it so."""
        return cls(
            settings.spool_dir,
            reserve_bytes=settings.spool_reserve_mb * 1024 * 1024,
            keep_delivered_s=settings.keep_delivered_hours * 3600,
            housekeeping=housekeeping,
        )

    def dead_letter_count(self) -> int:
        """Jobs kept in ``dead/`` for an operator."""
        return sum(1 for entry in self.dead_dir.iterdir() if entry.is_dir())

    def free_bytes(self) -> int:
        """Bytes free to an unprivileged writer on the spool's file system."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def below_reserve(self, incoming_bytes: int = 0) -> bool:
        """Whether storing ``incoming_bytes`` more would eat into the reserve (then 0xA700 is answered)."""
        return self.free_bytes() - incoming_bytes < self.reserve_bytes

    def used_bytes(self) -> int:
        """Bytes of work not yet reported, ``incoming/``, ``studies/`` and ``dead/`` (a walk of the folders).

        Delivered studies kept for a revision (``delivered/``) are left out:
        they are bounded by ``keep_delivered_s`` and are not what a PACS is
        waiting for.
        """
        total = 0
        pending = [self.incoming_dir, self.studies_dir, self.dead_dir]
        while pending:
            try:
                entries = list(os.scandir(pending.pop()))
            except FileNotFoundError:  # sealed, completed or moved while we walked
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                    else:
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
        return total

    def ensure_reserve(self) -> bool:
        """Hold ``reserve_bytes`` in ``.reserve`` if it is missing and there is room twice over; whether it is held."""
        if self.reserve_bytes <= 0:
            return True
        try:
            if self._reserve.stat().st_size >= self.reserve_bytes:
                return True
        except FileNotFoundError:
            pass
        if self.free_bytes() < 2 * self.reserve_bytes:
            return False
        try:
            descriptor = os.open(self._reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(descriptor, 0, self.reserve_bytes)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except OSError:
            self._reserve.unlink(missing_ok=True)
            return False
        return True

    def _release_reserve(self) -> bool:
        """Give the reserve's space back to the file system; whether there was one."""
        try:
            self._reserve.unlink()
        except FileNotFoundError:
            return False
        log.warning("spool_reserve_released", reserve_mb=self.reserve_bytes // 2**20)
        return True

    def _write_finishing(self, path: Path, data: bytes) -> None:
        """:func:`write_durably` for work that must finish on a full disk: on ENOSPC, use the reserve and retry once."""
        try:
            write_durably(path, data, self.tmp_dir)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not self._release_reserve():
                raise
            write_durably(path, data, self.tmp_dir)

    def _forget_old_completions(self, keep_s: float = COMPLETED_KEEP_S) -> None:
        """Drop completion records older than ``keep_s``: no broker holds a duplicate that long."""
        cutoff = time.time() - keep_s
        for record in (*self.done_dir.iterdir(), *self.patients_dir.iterdir(), *self.received_dir.iterdir()):
            try:
                # lstat: an earlier version wrote patient markers as symbolic links, to nothing (see _bind_patient)
                if record.lstat().st_mtime < cutoff:
                    record.unlink(missing_ok=True)
            except FileNotFoundError:
                continue
        self.forget_old_deliveries()

    def forget_old_deliveries(self) -> None:
        """Remove delivered studies kept longer than ``keep_delivered_s`` (all of them when it is 0).

        ``None`` (a spool opened by a tool, not by the service) keeps and removes nothing.
        """
        if self.keep_delivered_s is None:
            return
        cutoff = time.time() - self.keep_delivered_s
        for study in self.delivered_dir.iterdir():
            try:
                if study.stat().st_mtime < cutoff or self.keep_delivered_s <= 0:
                    shutil.rmtree(study, ignore_errors=True)
            except FileNotFoundError:
                continue

    @property
    def tmp_dir(self) -> Path:
        """This process's temporary folder, made again (and locked again) if something removed it.

        Files are written here, fsynced, then renamed into place. Another
        process's clean-up, an operator or a tmp reaper may remove the
        folder while this process is idle; without remaking it every
        C-STORE would fail until a restart.
        """
        if not self._own_tmp.is_dir():
            self._own_tmp.mkdir(parents=True, exist_ok=True)
            self._hold_alive_lock()
        return self._own_tmp

    def _hold_alive_lock(self) -> None:
        """Hold an exclusive ``flock`` on ``tmp_dir/.alive`` while this spool lives (see :meth:`_clean_tmp`)."""
        _close_all(self._alive_descriptor)
        descriptor = os.open(self._own_tmp / ALIVE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._alive_descriptor.append(descriptor)

    def _clean_tmp(self, stale_after_s: float = 24 * 3600.0) -> None:
        """Remove temporary folders of processes that are gone.

        A folder goes when it is untouched for ``stale_after_s`` **and** no
        process holds the lock on its ``.alive`` file. Age alone is not
        enough: a listener that received nothing over a weekend has an old
        folder and is still alive. The lock alone is not trusted either,
        since ``flock`` across hosts depends on the shared file system.
        """
        cutoff = time.time() - stale_after_s
        for leftover in self._tmp_root.iterdir():
            if leftover == self._own_tmp:
                continue
            try:
                if leftover.stat().st_mtime >= cutoff or (leftover.is_dir() and _locked_by_a_live_process(leftover)):
                    continue
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
            except FileNotFoundError:
                continue

    # --- listener side ------------------------------------------------------------

    def stage_instance(self, data: bytes) -> StagedInstance:
        """Start writing and fsyncing ``data`` under ``tmp/`` on another thread; returns at once.

        The listener stages an instance's bytes before it parses and checks
        them, so that the disk works while the CPU does (one instance's
        write and fsync beside its parse: see bench/README.md), then passes
        the result to :meth:`store_instance`, or to
        :meth:`StagedInstance.discard` when the instance is refused.
        """
        tmp = self.tmp_dir / f"staged.{uuid.uuid4().hex}.tmp"
        return StagedInstance(tmp, self._pool.submit(write_synced, tmp, data))

    def store_instance(
        self, study_uid: str, sop_uid: str, data: bytes | StagedInstance, patient_key: str | None = None
    ) -> StoredInstance:
        """Durably store one received instance (DICOM PS3.10 file bytes, or bytes staged by :meth:`stage_instance`).

        A second instance with the same SOP Instance UID in the same
        unsealed study replaces the first (a resend is a duplicate).

        ``patient_key`` (:func:`service.study_identity.patient_key`) binds
        the study to one patient: the first instance of a study records it
        (``patients/<study_uid>``, kept for :data:`COMPLETED_KEEP_S`, so a
        study sealed or reported meanwhile stays bound), and an instance of
        the same study with another key is refused before it is stored.

        Raises
        ------
        PatientConflict
            If the study is bound to another patient; nothing is stored.
        InvalidInstance
            If either UID is not a valid DICOM UID (PS3.5 §9.1): they become
            path components, so a peer must not be able to steer them.
        OSError
            On any file system failure (``errno.ENOSPC`` for a full disk);
            nothing is then visible under ``incoming/``.
        """
        for name, uid in (("Study Instance UID", study_uid), ("SOP Instance UID", sop_uid)):
            if not is_valid_uid(uid):
                raise InvalidInstance(f"{name} is not a valid UID: {uid[:80]!r}")
        staged = data if isinstance(data, StagedInstance) else self.stage_instance(data)
        tmp = staged.path
        try:
            staged.written()
            # Under the lock only what must not interleave with sealing or with another instance of the study: the
            # patient binding and the renames. The fsyncs come after it, so that associations wait on the disk
            # side by side (their flushes merge) rather than in turn.
            with self._incoming_lock():
                marker_made = patient_key is not None and self._bind_patient(study_uid, patient_key)
                study_dir = self.incoming_dir / study_uid
                try:
                    study_dir.mkdir()
                    folder_made = True
                except FileExistsError:
                    folder_made = False
                # The folder itself, not its path: sealing may rename it to studies/<job_id> before the fsync below.
                study_fd = os.open(study_dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    final = study_dir / f"{sop_uid}{INSTANCE_SUFFIX}"
                    os.replace(tmp, final)
                except BaseException:
                    os.close(study_fd)
                    raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            self._sync_entries(study_fd, patient_key is not None, parallel=folder_made or marker_made)
        finally:
            os.close(study_fd)
        return StoredInstance(path=final)

    @contextlib.contextmanager
    def _incoming_lock(self) -> Iterator[None]:
        """Held while an instance is renamed into ``incoming/`` or a study renamed out of it, by any process."""
        with self._lock:
            if not self._flock_descriptor:
                self._flock_descriptor.append(os.open(self.root / INCOMING_LOCK, os.O_RDWR | os.O_CREAT, 0o644))
            descriptor = self._flock_descriptor[0]
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(descriptor, fcntl.LOCK_UN)

    def _sync_entries(self, study_fd: int, patient_bound: bool, parallel: bool) -> None:
        """Make an instance's directory entries durable: in its study folder, the folder's, the patient marker's.

        ``incoming/`` and ``patients/`` are fsynced for every instance, not
        only by the one that made the study's folder or marker: another
        association may be using a folder whose creator has not fsynced its
        entry yet. With nothing new in them that fsync returns at once (a
        microsecond here). ``parallel`` (this call made the folder or the
        marker, so they do hold something new): the three are fsynced side by
        side, each flush then costing about one rather than three
        (measured in bench/README.md).
        """
        folders = [self.incoming_dir, *([self.patients_dir] if patient_bound else [])]
        if not parallel:
            os.fsync(study_fd)
            for folder in folders:
                fsync_directory(folder)
            return
        pending = [self._pool.submit(fsync_directory, folder) for folder in folders]
        try:
            os.fsync(study_fd)
        finally:
            for future in pending:
                future.result()  # re-raises a failed fsync: no success status without every entry durable

    def _bind_patient(self, study_uid: str, patient_key: str) -> bool:
        """Record the study's patient key on its first instance; refuse another key later (caller holds the lock).

        The marker ``patients/<study_uid>`` is a file holding the key, written
        durably (its data and its folder entry fsynced) before the instance's
        success. Not a symbolic link whose target is the key, although that
        saves a flush per study: a 64-character target is too long for ext4 to
        keep in the inode, and POSIX does not promise that fsyncing the folder
        makes a link's target durable; after a power cut an empty or lost
        marker would refuse the study's own patient, or bind another. Markers
        written as links by an earlier version are read as before. The caller
        holds the spool's lock across processes, so no two receivers write
        the same study's marker.

        Returns
        -------
        bool
            Whether this call made the marker (its folder then holds something new to fsync).
        """
        bound = self._patients.get(study_uid)
        made = False
        if bound is None:
            # Read from disk once per study and process (a study bound before a restart, or by another listener);
            # every later instance is checked in memory: this runs on each C-STORE, under the spool's lock.
            marker = self.patients_dir / study_uid
            try:
                bound = read_patient_marker(marker)
            except FileNotFoundError:
                # Its folder entry is fsynced after the lock is let go, before the success status (_sync_entries).
                write_durably(marker, patient_key.encode("ascii"), self.tmp_dir, sync_directory=False)
                bound, made = patient_key, True
            self._patients[study_uid] = bound
        if bound != patient_key:
            raise PatientConflict("the study already holds instances of another patient")
        return made

    def seal_study(
        self,
        study_uid: str,
        calling_ae_titles: tuple[str, ...] = (),
        now: datetime | None = None,
    ) -> str | None:
        """Seal ``incoming/<study_uid>`` into ``studies/<job_id>`` and write job.json.

        An instance that an earlier job of the study already holds (same SOP
        Instance UID, same bytes: a PACS re-sending an interrupted or a
        finished transfer) adds nothing and is dropped here; one with the
        same UID and other bytes is a conflict: the first is kept, this one
        dropped, logged and counted. Only instances never sealed before make
        the new job, and a study of nothing new makes none.

        Returns
        -------
        str or None
            The new job id, or ``None`` if the study has no unsealed
            instances (already sealed by an earlier call) or only instances
            an earlier job already holds.

        Raises
        ------
        PermanentError
            If the sealed files do not make a valid StudyJob; the sealed
            directory stays for the caller to dead-letter by job id, which
            is then in ``exc.job_id``.
        """
        if not is_valid_uid(study_uid):
            raise InvalidInstance(f"Study Instance UID is not a valid UID: {study_uid[:80]!r}")
        job_id = new_job_id(now)
        target = self.studies_dir / job_id
        with self._incoming_lock():
            source = self.incoming_dir / study_uid
            if not source.is_dir():
                return None
            os.rename(source, target)
            fsync_directory(self.incoming_dir)
            fsync_directory(self.studies_dir)
        # An instance renamed in just before the seal may not have fsynced its entry yet (store_instance fsyncs
        # after the lock); the job must not be built on an entry a power cut could take back.
        fsync_directory(target)
        digests = self._keep_new_instances(study_uid, target)
        if digests is None:
            return None
        if calling_ae_titles:
            self._write_finishing(target / CALLING_AE_FILE, json.dumps(sorted(set(calling_ae_titles))).encode())
        try:
            job = self.build_job(job_id, created_at=now, digests=digests)
        except BreastAIError as exc:
            exc.job_id = job_id  # type: ignore[attr-defined]
            raise
        self.write_job(job)
        return job_id

    def _keep_new_instances(self, study_uid: str, job_dir: Path) -> dict[str, str] | None:
        """Drop from a just-sealed ``job_dir`` what earlier jobs of the study hold; record the rest.

        Returns the sha256 of every instance the job now holds, by SOP
        Instance UID (so that building the job hashes nothing again), or
        ``None`` if nothing new is left (then ``job_dir`` is removed).
        The record is written after the drops and before the job is built:
        a crash in between leaves a job that recovery rebuilds and runs.
        """
        record = self.received_dir / f"{study_uid}.json"
        try:
            sealed_before: dict[str, str] = json.loads(record.read_text("utf-8"))
        except FileNotFoundError:
            sealed_before = {}
        except ValueError:
            sealed_before = {}  # a damaged record: treat every instance as new rather than lose one
        fresh: dict[str, str] = {}
        resent = conflicts = 0
        for path in sorted(job_dir.glob(f"*{INSTANCE_SUFFIX}")):
            sop_uid = path.name[: -len(INSTANCE_SUFFIX)]
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if sop_uid in sealed_before:
                if sealed_before[sop_uid] == digest:
                    resent += 1
                else:
                    conflicts += 1
                path.unlink()
                continue
            fresh[sop_uid] = digest
        if resent or conflicts:
            fsync_directory(job_dir)
            metrics.INSTANCES_DUPLICATE.labels(outcome="same").inc(resent)
            metrics.INSTANCES_DUPLICATE.labels(outcome="conflict").inc(conflicts)
            log.info("resent_instances_dropped", study_uid=study_uid, same=resent, conflicting=conflicts)
            if conflicts:
                log.warning("resent_instance_conflict", study_uid=study_uid, conflicting=conflicts)
        if not fresh:
            shutil.rmtree(job_dir)
            fsync_directory(self.studies_dir)
            return None
        self._write_finishing(record, json.dumps({**sealed_before, **fresh}, sort_keys=True).encode())
        joined = self._join_delivered(study_uid, job_dir)
        return {**{sop: sealed_before[sop] for sop in joined if sop in sealed_before}, **fresh}

    def _join_delivered(self, study_uid: str, job_dir: Path) -> list[str]:
        """New instances of a study delivered within ``keep_delivered_s``: the job covers the whole study again.

        The delivered instances are linked into the job beside the new ones,
        and the SR that was delivered becomes the job's predecessor, so the
        worker sends one revised report over the whole study that names the
        one it replaces (PS3.3 C.17.2) instead of a second report over the
        new images alone. Overlays of the earlier images come out with the
        same UIDs as before, so the PACS keeps one copy of each.
        """
        delivered = self.delivered_dir / study_uid
        if not delivered.is_dir():
            return []
        joined = []
        for source in delivered.glob(f"*{INSTANCE_SUFFIX}"):
            target = job_dir / source.name
            if not target.exists():
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
                joined.append(source.name[: -len(INSTANCE_SUFFIX)])
        report = delivered / REPORT_FILE
        if report.is_file():
            shutil.copyfile(report, job_dir / PREDECESSOR_FILE)
        fsync_directory(job_dir)
        return joined

    def write_job(self, job: StudyJob) -> Path:
        """Write (or rewrite) ``studies/<job_id>/job.json`` durably."""
        job_dir = self._job_dir(job.job_id)
        path = job_dir / JOB_FILE
        self._write_finishing(path, job.to_json().encode("utf-8"))
        return path

    def build_job(
        self, job_id: str, created_at: datetime | None = None, digests: Mapping[str, str] | None = None
    ) -> StudyJob:
        """Build the StudyJob of a sealed directory from its files.

        Reads each instance's header only (``stop_before_pixels``) for the
        SOP Class / Instance, Series Instance UID and Modality, and hashes
        the bytes unless ``digests`` (SOP Instance UID -> sha256, from
        sealing) already holds them. Paths are relative to the spool root.

        Raises
        ------
        InvalidInstance
            A file that does not parse as DICOM or lacks a required UID.
        JobSchemaError
            A directory without instances, or UIDs that disagree.
        """
        job_dir = self._job_dir(job_id)
        refs: list[InstanceRef] = []
        study_uids: set[str] = set()
        known = digests or {}
        for path in sorted(job_dir.glob(f"*{INSTANCE_SUFFIX}")):
            digest = known.get(path.name[: -len(INSTANCE_SUFFIX)]) or hashlib.sha256(path.read_bytes()).hexdigest()
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
                raise InvalidInstance(f"{path.name}: not readable DICOM: {exc}") from exc
            try:
                refs.append(
                    InstanceRef(
                        path=path.relative_to(self.root).as_posix(),
                        sha256=digest,
                        sop_class_uid=str(ds.get("SOPClassUID", "")),
                        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                        modality=str(ds.get("Modality", "")),
                    )
                )
            except JobSchemaError as exc:
                raise InvalidInstance(f"{path.name}: {exc}") from exc
            study_uids.add(str(ds.get("StudyInstanceUID", "")))
        if not refs:
            raise JobSchemaError(f"sealed job {job_id} holds no instances")
        if len(study_uids) != 1:
            raise JobSchemaError(f"sealed job {job_id} mixes {len(study_uids)} Study Instance UIDs")
        calling: tuple[str, ...] = ()
        ae_file = job_dir / CALLING_AE_FILE
        if ae_file.is_file():
            try:
                calling = tuple(str(ae) for ae in json.loads(ae_file.read_text("utf-8")))
            except ValueError:
                calling = ()
        if created_at is None:
            # On rebuild the seal time is the directory's mtime (set by the rename).
            created_at = datetime.fromtimestamp(job_dir.stat().st_mtime, UTC)
        return StudyJob(
            job_id=job_id,
            study_instance_uid=study_uids.pop(),
            created_at=created_at.astimezone(UTC).isoformat(),
            instances=tuple(sorted(refs, key=lambda ref: ref.sop_instance_uid)),
            calling_ae_titles=calling,
        )

    # --- recovery -----------------------------------------------------------------

    def unsealed_studies(self) -> list[UnsealedStudy]:
        """``incoming/`` studies with their newest instance mtime (seconds since epoch)."""
        found: list[UnsealedStudy] = []
        for study_dir in sorted(self.incoming_dir.iterdir()):
            if not study_dir.is_dir() or not is_valid_uid(study_dir.name):
                continue
            # Receivers store and the dispatcher seals while this runs (a receiver's death is handled while the
            # others go on): a study sealed, or an instance moved, between the listing and its stat is no longer
            # unsealed, and is passed over rather than failing the whole walk.
            mtimes = []
            for instance in study_dir.glob(f"*{INSTANCE_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    mtimes.append(instance.stat().st_mtime)
            if not mtimes:
                continue
            found.append(UnsealedStudy(study_dir.name, max(mtimes), len(mtimes)))
        return found

    def sealed_jobs(self) -> list[StudyJob]:
        """Every job under ``studies/``, oldest first; job.json rebuilt if missing.

        A job whose files cannot be rebuilt into a StudyJob is moved to
        ``dead/`` with the reason (it can never succeed).
        """
        jobs: list[StudyJob] = []
        for job_dir in sorted(self.studies_dir.iterdir()):
            if not job_dir.is_dir():
                continue
            job_id = job_dir.name
            try:
                jobs.append(self.load_job(job_id))
            except BreastAIError as exc:
                self.dead_letter(job_id, f"unrecoverable sealed job: {exc}")
        return jobs

    def load_job(self, job_id: str) -> StudyJob:
        """Read ``job.json`` of a sealed job, rebuilding it from the files when absent or unreadable."""
        path = self._job_dir(job_id) / JOB_FILE
        try:
            job = StudyJob.from_json(path.read_bytes())
            if job.job_id == job_id:
                return job
        except (FileNotFoundError, JobSchemaError):
            pass
        job = self.build_job(job_id)
        try:
            self.write_job(job)
        except OSError as exc:
            # The job is its files: served from memory now, written when space returns (the next load).
            log.warning("job_file_not_written", job_id=job_id, error=errno.errorcode.get(exc.errno or 0, "EIO"))
        return job

    # --- queue bookkeeping --------------------------------------------------------

    def is_sealed(self, job_id: str) -> bool:
        """Whether ``studies/<job_id>`` exists."""
        return self._job_dir(job_id).is_dir()

    def mark_published(self, job_id: str) -> None:
        """Record that the broker confirmed the job (RabbitMQ path)."""
        self._write_finishing(self._job_dir(job_id) / PUBLISHED_MARKER, b"")

    def is_published(self, job_id: str) -> bool:
        """Whether :meth:`mark_published` was called for ``job_id``."""
        return (self._job_dir(job_id) / PUBLISHED_MARKER).is_file()

    def increment_attempts(self, job_id: str) -> int:
        """Count one more delivery of ``job_id`` durably; return the new count."""
        path = self._job_dir(job_id) / ATTEMPTS_FILE
        try:
            count = int(path.read_text("ascii").strip() or 0)
        except (FileNotFoundError, ValueError):
            count = 0
        count += 1
        self._write_finishing(path, str(count).encode("ascii"))
        return count

    def verify(self, job: StudyJob) -> list[Path]:
        """Check every referenced file still matches its sha256 (:func:`verify_instances`); return their paths."""
        return verify_instances(job, self.root)

    def is_completed(self, job_id: str) -> bool:
        """Whether :meth:`complete` ran for ``job_id`` (within the last :data:`COMPLETED_KEEP_S`).

        A message broker may deliver a job again after it was acknowledged
        and its folder removed (a publish retried after a lost confirm, a
        re-publish whose marker write failed): such a copy is a duplicate
        to acknowledge, not a job whose files went missing.
        """
        return (self.done_dir / self._job_dir(job_id).name).is_file()

    def complete(self, job_id: str) -> bool:
        """Record ``job_id`` as done (:meth:`is_completed`) and remove its directory.

        Idempotent; returns whether the directory existed.
        """
        job_dir = self._job_dir(job_id)
        if not job_dir.exists():
            return False
        # Recorded before the folder goes: a crash in between leaves a done job with its files, never a lost record.
        self._write_finishing(self.done_dir / job_id, datetime.now(UTC).isoformat().encode("ascii"))
        if self.keep_delivered_s:
            self._keep_delivered(job_dir)
        # Rename first so that a crash mid-delete never leaves a half job under studies/.
        trash = self.tmp_dir / f"done-{job_id}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(job_dir, trash)
        except FileNotFoundError:
            return False
        fsync_directory(self.studies_dir)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    # --- operator tools (breastai jobs) ----------------------------------------------

    def dead_jobs(self) -> list[DeadJob]:
        """Every dead-lettered job kept in ``dead/``, oldest first, with its study and its reasons."""
        found = []
        for folder in sorted(self.dead_dir.iterdir()):
            if not folder.is_dir():
                continue
            reason_file = folder / REASON_FILE
            reasons = reason_file.read_text("utf-8").strip() if reason_file.is_file() else ""
            study = ""
            with contextlib.suppress(OSError, JobSchemaError):  # a job dead before its job.json was written
                study = StudyJob.from_json((folder / JOB_FILE).read_bytes()).study_instance_uid
            instances = len(list(folder.glob(f"*{INSTANCE_SUFFIX}")))
            found.append(DeadJob(folder.name, study, instances, reasons, folder.stat().st_mtime))
        return found

    def retry_dead(self, job_id: str) -> None:
        """Move a dead-lettered job back to ``studies/`` as never delivered: the dispatcher publishes it again.

        Its delivery count and publish marker are reset; its reasons stay in
        ``reason.txt`` for the record. Results carry the same UIDs as any
        earlier attempt, so a PACS that got part of them de-duplicates.

        Raises
        ------
        InvalidInstance
            An unknown job, or one completed meanwhile (nothing to re-drive).
        """
        source = self.dead_dir / job_id
        if not source.is_dir() or "/" in job_id or job_id.startswith("."):
            raise InvalidInstance(f"no dead-lettered job {job_id!r}")
        if self.is_completed(job_id):
            raise InvalidInstance(f"job {job_id} was completed: re-driving it would deliver its results again")
        target = self._job_dir(job_id)
        if target.exists():
            raise InvalidInstance(f"job {job_id} is already waiting in studies/")
        for marker in (ATTEMPTS_FILE, PUBLISHED_MARKER):
            (source / marker).unlink(missing_ok=True)
        os.rename(source, target)
        fsync_directory(self.dead_dir)
        fsync_directory(self.studies_dir)

    def purge_dead(self, job_id: str) -> None:
        """Delete a dead-lettered job and its instances for good.

        Raises
        ------
        InvalidInstance
            An unknown job.
        """
        folder = self.dead_dir / job_id
        if not folder.is_dir() or "/" in job_id or job_id.startswith("."):
            raise InvalidInstance(f"no dead-lettered job {job_id!r}")
        trash = self.tmp_dir / f"purge-{job_id}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, trash)
        fsync_directory(self.dead_dir)
        shutil.rmtree(trash, ignore_errors=True)

    def _keep_delivered(self, job_dir: Path) -> None:
        """Move a completed job's instances and delivered SR to ``delivered/<study>`` (for a later revision)."""
        try:
            study_uid = StudyJob.from_json((job_dir / JOB_FILE).read_bytes()).study_instance_uid
        except (OSError, JobSchemaError):
            return  # nothing to revise from: the job is removed as before
        kept = self.delivered_dir / study_uid
        try:
            kept.mkdir(exist_ok=True)
            for source in (*job_dir.glob(f"*{INSTANCE_SUFFIX}"), job_dir / REPORT_FILE):
                if source.is_file():
                    os.replace(source, kept / source.name)
            fsync_directory(kept)
            os.utime(kept)  # the keep window runs from the last delivery
        except OSError as exc:  # keeping is a convenience: completing must not fail for it
            log.warning(
                "delivered_study_not_kept", study_uid=study_uid, error=errno.errorcode.get(exc.errno or 0, "EIO")
            )

    def dead_letter(self, job_id: str, reason: str) -> Path | None:
        """Move ``studies/<job_id>`` to ``dead/`` with ``reason.txt``.

        Idempotent: returns the dead directory, or ``None`` if the job was
        neither sealed nor already dead.
        """
        source = self._job_dir(job_id)
        target = self.dead_dir / job_id
        if source.is_dir():
            if target.exists():
                target = self.dead_dir / f"{job_id}.{int(time.time())}-{uuid.uuid4().hex[:6]}"
            os.rename(source, target)
            fsync_directory(self.studies_dir)
            fsync_directory(self.dead_dir)
        elif not target.is_dir():
            return None
        earlier = (target / REASON_FILE).read_text("utf-8") if (target / REASON_FILE).is_file() else ""
        # A later delivery of a job already dead adds its reason under the first, which says what went wrong.
        self._write_finishing(target / REASON_FILE, (earlier + reason.rstrip("\n") + "\n").encode("utf-8"))
        return target

    def _job_dir(self, job_id: str) -> Path:
        # Job ids come from messages too; keep them from naming paths outside studies/.
        if not job_id or "/" in job_id or job_id in (".", "..") or "\x00" in job_id:
            raise JobSchemaError(f"job id cannot name a spool directory: {job_id!r}")
        return self.studies_dir / job_id


class SpoolQuota:
    """``spool_quota_mb``: whether one more instance fits, from a walk of the spool redone every few seconds.

    Between walks the bytes this process stored are added, so a burst cannot
    overshoot the quota by more than what other processes (workers writing
    results) add meanwhile. Where ``sharers`` receiver processes store into
    one spool (service.receivers), each counts its own bytes ``sharers``
    times: each then admits at most its share of the headroom the last walk
    left, and together they cannot overshoot it (a single instance larger
    than a share is refused until a walk shows more room). A quota of 0
    admits everything without walking.
    """

    def __init__(
        self,
        spool: Spool,
        quota_bytes: int,
        rescan_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sharers: int = 1,
    ) -> None:
        self._spool = spool
        self.quota_bytes = quota_bytes
        self._sharers = max(1, sharers)
        self._rescan_s = rescan_s
        self._clock = clock
        self._lock = threading.Lock()
        self._used = 0
        self._scanned_at: float | None = None

    def admits(self, incoming_bytes: int) -> bool:
        if self.quota_bytes <= 0:
            return True
        with self._lock:
            now = self._clock()
            if self._scanned_at is None or now - self._scanned_at >= self._rescan_s:
                self._used = self._spool.used_bytes()
                self._scanned_at = now
            return self._used + incoming_bytes * self._sharers <= self.quota_bytes

    def stored(self, size: int) -> None:
        """Count an instance stored since the last walk (``sharers`` times: see the class)."""
        with self._lock:
            self._used += size * self._sharers
