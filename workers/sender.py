"""Deliver result objects to their destinations: a PACS by C-STORE, or a folder.

Both kinds are idempotent: a result re-sent under the same SOP Instance
UID replaces the copy the destination already holds (a folder overwrites
the same file; a PACS de-duplicates by UID), so a redelivered job never
shows the radiologist a second report.
"""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from service import metrics
from service.durable import fsync_directory, write_durably
from service.errors import DestinationUnavailable, ResultRejected
from service.queue import retry_backoff
from service.settings import Destination

log = structlog.get_logger(__name__)

# PS3.4 Annex B.2.3 C-STORE statuses. Warnings (0xB000 coercion, 0xB006
# elements discarded, 0xB007 data set does not match SOP class) still mean
# the object was stored. 0x0111 (PS3.7 C.4: duplicate SOP Instance), which
# some archives answer to a re-send, means it is there already: our result
# UIDs are derived from the job, so the stored copy is this same object.
_STORED = {0x0000, 0xB000, 0xB006, 0xB007, 0x0111}
# 0xA7xx "Refused: out of resources", 0x0213 "resource limitation" and
# 0x0110 "processing failure" (PS3.7 C.4: a failure on the archive's side,
# as our own listener answers when its disk fails) may clear up by
# themselves; 0x0122 (SOP class not supported) and 0x0124 (not authorised)
# are configuration errors that retrying cannot fix.
_TRANSIENT_PREFIX = 0xA700
_TRANSIENT = {0x0213, 0x0110}
#: The longest wait between two attempts at one destination.
_BACKOFF_CAP_S = 30.0
# Results a PACS may refuse without failing the job: the Mammography CAD SR (workers.mammo_cad_sr) repeats the main
# report's mammography findings for the workstations that read CAD SR, and many archives take no such SOP class. A
# study's report, overlays and SEGs must not be dead-lettered for it.
OPTIONAL_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.88.50"})  # Mammography CAD SR Storage


def _is_transient(status: int) -> bool:
    return (status & 0xFF00) == _TRANSIENT_PREFIX or status in _TRANSIENT


def write_to_folder(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    """Write each object as ``folder/<study>/<series>/<sop>.dcm``, atomically.

    A temporary file in the same directory is fsynced and renamed over the
    target, so a reader never sees half a file and a re-send replaces it.
    The folders the rename and any new study or series folder changed are
    fsynced too before this returns: the job is acknowledged and its spool
    files deleted afterwards, so the results must survive a power cut.
    """
    written = []
    changed: set[Path] = set()
    for dataset in datasets:
        target = (
            folder / str(dataset.StudyInstanceUID) / str(dataset.SeriesInstanceUID) / f"{dataset.SOPInstanceUID}.dcm"
        )
        for directory in (target.parent.parent, target.parent):
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                changed.add(directory.parent)
        write_durably(
            target,
            functools.partial(dataset.save_as, enforce_file_format=True),
            target.parent,
            hidden=True,  # a hidden temporary name: whoever watches the folder passes it over
            sync_directory=False,  # once per folder, below
        )
        changed.add(target.parent)
        written.append(target)
    # The deepest first: its entry is then in place when its parent is synced.
    for directory in sorted(changed, key=lambda d: len(d.parts), reverse=True):
        fsync_directory(directory)
    return written


def store_to_pacs(
    datasets: Sequence[Dataset],
    destination: Destination,
    calling_ae_title: str,
    timeout_s: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Send every object over one association (PS3.4 Annex B, Storage SCU), over TLS where ``tls`` is given
    (PS3.15 B.1; the PACS's certificate is checked against ``destination.host``).

    Raises
    ------
    DestinationUnavailable
        The association was refused or dropped, or the PACS answered with a
        status that may clear up (out of resources).
    ResultRejected
        The PACS refused an object with a failure status that retrying
        cannot change. An object of :data:`OPTIONAL_SOP_CLASSES` that the
        PACS refuses, for its SOP class or with such a status, is logged and
        left out instead: the others are sent.
    """
    ae = AE(ae_title=calling_ae_title)
    # connection_timeout bounds the TCP connect too: without it an unreachable host holds each attempt for the OS's
    # connect timeout (about two minutes), and a job's retries could outlast the broker's delivery acknowledgement
    # timeout.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    for sop_class in sorted({str(d.SOPClassUID) for d in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = (tls, destination.host) if tls is not None else None
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    except (ssl.SSLError, OSError) as exc:  # a failed handshake: the PACS's certificate or its TLS setup
        raise DestinationUnavailable(f"{destination} refused the TLS handshake: {exc}") from exc
    if not assoc.is_established:
        raise DestinationUnavailable(f"{destination} did not accept an association")
    try:
        accepted = {str(context.abstract_syntax) for context in assoc.accepted_contexts}
        refused = sorted({str(d.SOPClassUID) for d in datasets} - accepted)
        required = [sop_class for sop_class in refused if sop_class not in OPTIONAL_SOP_CLASSES]
        if required:
            raise ResultRejected(f"{destination} accepts no presentation context for {', '.join(required)}")
        for sop_class in refused:
            log.warning("optional_result_refused", destination=str(destination), sop_class=sop_class, status=None)
        for dataset in (d for d in datasets if str(d.SOPClassUID) not in refused):
            try:
                status = assoc.send_c_store(dataset)
            except (RuntimeError, OSError) as exc:
                # pynetdicom raises RuntimeError once the peer aborted or the connection dropped.
                raise DestinationUnavailable(f"{destination} dropped the association: {exc}") from exc
            code = int(status.Status) if "Status" in status else None
            if code is None:
                raise DestinationUnavailable(f"{destination} gave no C-STORE response (connection lost or timed out)")
            if code in _STORED:
                continue
            message = f"{destination} answered C-STORE of {dataset.SOPClassUID.name} with status 0x{code:04X}"
            if _is_transient(code):
                raise DestinationUnavailable(message)
            if str(dataset.SOPClassUID) in OPTIONAL_SOP_CLASSES:
                log.warning(
                    "optional_result_refused",
                    destination=str(destination),
                    sop_class=str(dataset.SOPClassUID),
                    status=code,
                )
                continue
            raise ResultRejected(message)
    finally:
        if assoc.is_established:
            assoc.release()


class ResultSender:
    """Sends results to every configured destination, retrying transient failures with capped backoff.

    Parameters
    ----------
    destinations
        Where results go (PACS nodes and/or folders).
    calling_ae_title
        Our AE title as the Storage SCU.
    retries
        Attempts per destination before giving up with the last error
        (the job then goes back to the queue, which retries later).
    backoff_s
        First wait; doubled per attempt, capped at 30 s.
    """

    def __init__(
        self,
        destinations: Sequence[Destination],
        calling_ae_title: str,
        retries: int = 5,
        backoff_s: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._destinations = tuple(destinations)
        self._tls = tls
        self._calling_ae = calling_ae_title
        self._retries = max(1, retries)
        self._backoff_s = backoff_s
        self._sleep = sleep

    def send(self, datasets: Sequence[Dataset]) -> None:
        """Deliver all objects everywhere, or raise; returns only when every destination accepted all."""
        for destination in self._destinations:
            if destination.path is not None:
                try:
                    write_to_folder(datasets, destination.path)
                except OSError as exc:
                    # A full or unmounted disk clears up: the job goes back to the queue to retry later.
                    raise DestinationUnavailable(f"cannot write results to {destination.path}: {exc}") from exc
                continue
            for attempt in range(1, self._retries + 1):
                try:
                    store_to_pacs(datasets, destination, self._calling_ae, tls=self._tls)
                    break
                except DestinationUnavailable as exc:
                    metrics.RESULT_SEND_FAILURES.labels(destination=destination.ae_title).inc()
                    if attempt == self._retries:
                        raise
                    wait = retry_backoff(attempt, self._backoff_s, _BACKOFF_CAP_S)
                    log.warning(
                        "destination_retry", destination=str(destination), attempt=attempt, wait_s=wait, error=str(exc)
                    )
                    self._sleep(wait)
