"""The DICOM edge: a Storage SCP (pynetdicom 3) that spools before it acknowledges.

Implements the SCP role of the Storage Service Class (DICOM PS3.4 Annex B)
and of the Verification Service Class (PS3.4 Annex A) over the DICOM upper
layer (PS3.8), with the DIMSE C-STORE / C-ECHO services of PS3.7.

Every C-STORE request ends in exactly one of the ``STATUS_*`` statuses
below (PS3.4 B.2.3), chosen by :meth:`StudyListener.handle_store`; no
exception ever reaches the peer. Success
(0x0000) is sent only after :meth:`Spool.store_instance` returned, i.e. the
instance and its directory entry are fsynced.
"""

from __future__ import annotations

import errno
import io
import re
import socket
import socketserver
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Protocol, cast

import structlog
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from service import metrics
from service.audit import AuditTrail
from service.errors import InvalidInstance, PatientConflict
from service.image_limits import over_limits
from service.part10 import file_header
from service.peers import admitted
from service.schema import is_valid_uid
from service.settings import Settings
from service.spool import Spool, SpoolQuota
from service.study_identity import patient_key
from service.tls import server_context

log = structlog.get_logger("service.listener")

# PS3.4 Annex B.2.3 C-STORE statuses.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (A7xx)
STATUS_DATASET_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class (A9xx)
STATUS_CANNOT_UNDERSTAND = 0xC210  # Error: Cannot understand (Cxxx): data set not decodable
STATUS_IMAGE_TOO_LARGE = 0xC211  # Cannot understand (Cxxx): declares more pixels than we decode (image_limits)
STATUS_PATIENT_CONFLICT = 0xC212  # Cannot understand (Cxxx): the study already holds another patient's images
STATUS_PROCESSING_FAILURE = 0x0110  # PS3.7 C.4.2: Processing failure (our side; the sender may retry)

# Storage SOP classes accepted (PS3.4 Annex B.5); anything else gets no
# accepted presentation context at association negotiation (PS3.8 §9.3.3.2).
STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume Storage",
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.13.1.3": "Breast Tomosynthesis Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}

# Transfer syntaxes accepted (PS3.5 §10 and Annex A). Explicit VR Big Endian
# is retired and not offered. Compressed syntaxes are stored as received;
# decoding is the workers' concern.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
)

# How an association ended, for the audit trail (pynetdicom's event names).
_ENDINGS = {"EVT_RELEASED": "released", "EVT_ABORTED": "aborted", "EVT_CONN_CLOSE": "connection closed"}

_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQUENCE_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0
_MODALITY = re.compile(r"^[A-Z]{2,4}$")


class StoreSink(Protocol):
    """What the listener tells about received instances (the :class:`Dispatcher`)."""

    def instance_stored(self, study_uid: str, association_id: str, calling_ae: str = "") -> None: ...

    def association_released(self, association_id: str) -> None: ...


class ListenerCounters:
    """What the listener counts (service.metrics, Prometheus).

    A receiver process (service.receivers) passes one that forwards each
    count to the process that serves the metrics.
    """

    def received(self, modality: str) -> None:
        """An instance was stored and answered 0x0000."""
        metrics.INSTANCES_RECEIVED.labels(modality=modality).inc()

    def rejected(self, reason: str) -> None:
        """An instance was refused (``reason``: one of metrics.REJECT_REASONS)."""
        metrics.INSTANCES_REJECTED.labels(reason=reason).inc()

    def association_rejected(self, reason: str) -> None:
        """An association was refused before it was established."""
        metrics.ASSOCIATIONS_REJECTED.labels(reason=reason).inc()


#: The most a PDU read allocates ahead of the bytes that arrived (the PDU length is the peer's to declare).
_READ_AHEAD = 1 << 20


class _WholeReadSocket(AssociationSocket):
    """pynetdicom's association socket, reading a PDU with as few ``recv`` calls as the kernel allows.

    ``AssociationSocket.recv`` reads 4 KB per call and appends each piece:
    a 1 MB P-DATA-TF PDU took 256 Python-level calls, 0.55-0.77 ms of CPU per
    800x600 instance here (bench/README.md). This one reads straight into one
    buffer, grown (doubling) only as bytes arrive, never by the declared
    length alone, which the peer chooses. Same contract: ``nr_bytes``
    bytes, or fewer when the connection closed.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        connection = cast(socket.socket, self.socket)
        buffer = bytearray(min(nr_bytes, _READ_AHEAD))
        received = 0
        while received < nr_bytes:
            if received == len(buffer):
                buffer.extend(bytes(min(nr_bytes - received, len(buffer))))
            with memoryview(buffer) as view:
                count = connection.recv_into(view[received:])
            if not count:
                break  # the connection closed: what arrived, as pynetdicom returns it
            received += count
        del buffer[received:]
        return buffer


class _SharedSocketServer(ThreadedAssociationServer):
    """pynetdicom's threaded server accepting on a listening socket that other processes accept on too.

    Made with ``AE.make_server(..., server_class=_SharedSocketServer,
    listening=socket)`` (extra keywords go to the server class, pynetdicom
    3 ``make_server``). The socket was bound and set listening, and made
    non-blocking, by the process that started the receivers
    (service.receivers): a connection every receiver was woken for is
    accepted by one, and ``accept`` finds nothing in the others, which
    socketserver passes over as an ``OSError``.
    """

    def __init__(self, *args: Any, listening: socket.socket, **kwargs: Any) -> None:
        self._listening = listening
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        # socketserver made a socket of its own: accept on (a duplicate of) the shared one instead.
        if self.socket is not None:
            self.socket.close()
        self.socket = self._listening.dup()
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Nothing to do: the socket is listening already."""

    def server_close(self) -> None:
        # Close only this duplicate: pynetdicom's server_close also shuts the socket down, which would stop every
        # process accepting on it.
        if self.socket is not None:
            self.socket.close()

    def shutdown(self) -> None:
        """Stop serving and close this process's duplicate (the AE does not list a server it did not start)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


@dataclass(frozen=True)
class _Rejection(Exception):
    status: int
    reason: str  # one of metrics.REJECT_REASONS
    detail: str


def _check_structure(ds: Dataset, data: bytes, transfer_syntax: str) -> None:
    """Raise ``_Rejection`` if the data set was cut short.

    pydicom reads a truncated stream without complaint (it returns a short
    last value), so compare each top-level element's declared length with
    what arrived, and require the last element to end exactly at the end
    of the stream (an undefined-length one with its sequence delimiter).
    """
    last: RawDataElement | None = None
    for tag in ds.keys():  # noqa: SIM118 - iterating a pydicom Dataset yields its elements, not their tags
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement):
            continue
        if raw.length != _UNDEFINED_LENGTH and raw.value is not None and len(raw.value) != raw.length:
            raise _Rejection(
                STATUS_CANNOT_UNDERSTAND,
                "truncated",
                f"element {raw.tag} declares {raw.length} bytes, {len(raw.value)} arrived",
            )
        if last is None or raw.value_tell > last.value_tell:
            last = raw
    if last is None:
        raise _Rejection(STATUS_CANNOT_UNDERSTAND, "undecodable", "no data elements after the file meta information")
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return  # offsets refer to the inflated stream; zlib already rejects a cut stream
    value_length = len(last.value) if last.value is not None else 0
    end = last.value_tell + value_length
    if last.length == _UNDEFINED_LENGTH:
        if data[end : end + 8] != _SEQUENCE_DELIMITER_LE:
            raise _Rejection(
                STATUS_CANNOT_UNDERSTAND,
                "truncated",
                f"element {last.tag} of undefined length has no sequence delimiter",
            )
        end += 8
    if end != len(data):
        raise _Rejection(
            STATUS_CANNOT_UNDERSTAND,
            "truncated",
            f"data set ends inside an element header ({len(data) - end} stray bytes)",
        )


def _uid(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception as exc:  # a raw value pydicom cannot convert
        raise _Rejection(STATUS_CANNOT_UNDERSTAND, "undecodable", f"{keyword} cannot be decoded: {exc}") from exc
    text = "" if value is None else str(value).strip("\x00 ")
    if not is_valid_uid(text):
        raise _Rejection(STATUS_DATASET_MISMATCH, "missing_uid", f"{keyword} is missing or not a valid UID")
    return text


def _modality_label(ds: Dataset) -> str:
    # Peer-controlled text becomes a metric label only from a closed shape.
    try:
        value = str(ds.get("Modality", "") or "")
    except Exception:
        return "unknown"
    return value if _MODALITY.match(value) else "unknown"


class StudyListener:
    """Storage SCP that spools instances and reports them to the dispatcher.

    Parameters
    ----------
    settings
        AE title, bind address and port, calling-AE allow-list, size limit.
    spool
        Where instances are made durable before 0x0000 is answered.
    sink
        Told of each stored instance and each ended association
        (normally the :class:`service.dispatcher.Dispatcher`).
    counters
        What is counted where; by default this process's Prometheus metrics.
    """

    def __init__(
        self, settings: Settings, spool: Spool, sink: StoreSink, counters: ListenerCounters | None = None
    ) -> None:
        self._settings = settings
        self._spool = spool
        self._sink = sink
        self._counters = counters or ListenerCounters()
        self._max_bytes = settings.max_instance_mb * 1024 * 1024
        self._image_limits = settings.image_limits
        self._audit = AuditTrail(spool.root / "audit")
        self._peers = settings.allowed_peers  # host names resolved once, at start
        # A receiver of several (service.receivers) knows how many share the quota.
        self._quota = SpoolQuota(spool, settings.spool_quota_mb * 1024 * 1024, sharers=settings.listener_processes)
        # Built now, so that bad TLS files stop the start-up rather than the first association.
        self._tls = server_context(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file, settings.tls_require_client_cert
        )
        self._server: Any = None
        self._lock = threading.Lock()

    def build_ae(self) -> AE:
        """The Application Entity with our presentation contexts and allow-list."""
        ae = AE(ae_title=self._settings.ae_title)
        # pynetdicom rejects associations past this (rejected-transient, local limit exceeded; PS3.8 7.1.1.3).
        ae.maximum_associations = self._settings.max_associations
        # pynetdicom's default (16 KB) cuts a 1 MB image into 64 PDUs, each decoded in Python: measured 4.0-4.2 ms of
        # CPU per 800x600 instance against 3.0-3.4 ms with 1 MB PDUs (docs/operating.md).
        ae.maximum_pdu_size = self._settings.max_pdu_kb * 1024
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        return ae

    @staticmethod
    def _handle_connection(event: Event) -> None:
        """EVT_CONN_OPEN, before the association reads anything: its socket reads PDUs whole (``_WholeReadSocket``)."""
        connection = event.assoc.dul.socket
        if type(connection) is AssociationSocket:  # exactly pynetdicom's; anything else is left alone
            connection.__class__ = _WholeReadSocket

    def _handle_requested(self, event: Event) -> None:
        """EVT_REQUESTED: refuse a caller the allow-list does not admit from its host (service.peers)."""
        # The A-ASSOCIATE-RQ's own field: pynetdicom fills requestor.ae_title only during negotiation, after this.
        request = event.assoc.requestor.primitive
        calling_ae = str(request.calling_ae_title if request is not None else "").strip()
        address = str(event.assoc.requestor.address)
        if admitted(self._peers, calling_ae, address):
            return
        # PS3.8 §7.1.1.3: rejected-permanent (1), DICOM UL service-user (1), calling AE title not recognized (3).
        # As pynetdicom's own negotiation rejects: the reject, then kill() so the DUL sends it before the socket closes.
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        evt.trigger(event.assoc, evt.EVT_REJECTED, {})
        event.assoc.kill()
        self._counters.association_rejected("calling_ae_not_allowed")
        self._audit.rejected(calling_ae, f"{address}:{event.assoc.requestor.port}", "calling AE not allowed from host")
        log.warning("association_rejected", reason="calling_ae_not_allowed", calling_ae=calling_ae, peer=address)

    def start(self, listening: socket.socket | None = None) -> None:
        """Start serving on a background thread; returns at once.

        ``listening``: accept on this listening socket, which other receiver
        processes accept on too (service.receivers), instead of binding
        ``bind_address:port``.
        """
        with self._lock:
            if self._server is not None:
                return
            ae = self.build_ae()
            handlers: list[Any] = [
                (evt.EVT_CONN_OPEN, self._handle_connection),
                (evt.EVT_C_STORE, self.handle_store),
                *([(evt.EVT_REQUESTED, self._handle_requested)] if self._peers else []),
                (evt.EVT_RELEASED, self._handle_ended),
                (evt.EVT_ABORTED, self._handle_ended),
                (evt.EVT_CONN_CLOSE, self._handle_ended),
            ]
            address = (self._settings.bind_address, self._settings.port)
            if listening is None:
                self._server = ae.start_server(address, block=False, evt_handlers=handlers, ssl_context=self._tls)
            else:
                server = ae.make_server(
                    address,
                    evt_handlers=handlers,
                    ssl_context=self._tls,
                    server_class=_SharedSocketServer,
                    listening=listening,
                )
                # As AE.start_server(block=False) serves: socketserver's loop on a daemon thread.
                threading.Thread(target=server.serve_forever, name="breastai-receiver", daemon=True).start()
                self._server = server
        log.info(
            "listener_started",
            ae_title=self._settings.ae_title,
            port=self.port,
            allowed_ae=list(self._settings.allowed_ae),
            tls=self._tls is not None,
        )

    @property
    def port(self) -> int:
        """The bound TCP port (useful when configured as 0)."""
        if self._server is None:
            return self._settings.port
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop accepting associations and close the server; idempotent."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            log.info("listener_stopped")

    @staticmethod
    def _association_id(event: Event, create: bool) -> str | None:
        assoc = event.assoc
        existing = getattr(assoc, "_breastai_id", None)
        if existing is None and create:
            existing = uuid.uuid4().hex
            setattr(assoc, "_breastai_id", existing)
        return existing

    def _handle_ended(self, event: Event) -> None:
        association_id = self._association_id(event, create=False)
        if association_id is not None:
            self._audit.ended(association_id, how=_ENDINGS.get(event.event.name, event.event.name))
            try:
                self._sink.association_released(association_id)
            except Exception:
                log.exception("association_end_failed")

    def handle_store(self, event: Event) -> int:
        """EVT_C_STORE handler: every outcome is a PS3.4 B.2.3 status, never an exception."""
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        association_id = self._association_id(event, create=True)
        assert association_id is not None
        peer = f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"
        try:
            modality, study_uid = self._store(event)
        except _Rejection as rejection:
            self._audit.stored(association_id, calling_ae, peer, rejection.status, None)
            self._counters.rejected(rejection.reason)
            log.warning(
                "c_store_refused",
                status=f"0x{rejection.status:04X}",
                reason=rejection.reason,
                detail=rejection.detail,
                calling_ae=calling_ae,
            )
            return rejection.status
        except Exception:
            self._counters.rejected("internal")
            log.exception("c_store_failed", calling_ae=calling_ae)
            self._audit.stored(association_id, calling_ae, peer, STATUS_PROCESSING_FAILURE, None)
            return STATUS_PROCESSING_FAILURE
        self._counters.received(modality)
        self._audit.stored(association_id, calling_ae, peer, STATUS_SUCCESS, study_uid)
        try:
            self._sink.instance_stored(study_uid, association_id, calling_ae=calling_ae)
        except Exception:
            # The instance is durable; recovery at the next start picks the study up.
            log.exception("instance_registration_failed", study_uid=study_uid)
        return STATUS_SUCCESS

    def _store(self, event: Event) -> tuple[str, str]:
        request = cast(C_STORE, event.request)
        stream = request.DataSet
        # seek() measures the received bytes without copying them (they may be hundreds of MB).
        request_size = stream.seek(0, io.SEEK_END) if stream is not None else 0
        if request_size > self._max_bytes:
            raise _Rejection(
                STATUS_OUT_OF_RESOURCES,
                "too_large",
                f"{request_size} bytes exceed max_instance_mb={self._settings.max_instance_mb}",
            )
        if self._spool.below_reserve(request_size):
            # Refused while the disk still has room, so that the jobs already accepted can finish.
            raise _Rejection(STATUS_OUT_OF_RESOURCES, "disk_full", "spool disk is below its reserve (spool_reserve_mb)")
        if not self._quota.admits(request_size):
            # Transient like a full disk: the PACS keeps the instance and retries once the workers drained the spool.
            raise _Rejection(STATUS_OUT_OF_RESOURCES, "spool_quota", "spool holds its quota (spool_quota_mb)")
        transfer_syntax = str(event.context.transfer_syntax)
        data = file_header(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID), transfer_syntax)
        data += event.encoded_dataset(include_meta=False)
        # The disk writes and fsyncs the bytes while they are parsed and checked: the parse then no longer adds to
        # the wait for the fsync (bench/README.md). A refused instance's file is removed.
        try:
            staged = self._spool.stage_instance(data)
            try:
                study_uid, sop_instance, modality, patient = self._check(event, request, data, transfer_syntax)
                self._spool.store_instance(study_uid, sop_instance, staged, patient_key=patient)
            except BaseException:
                staged.discard()
                raise
        except PatientConflict as exc:
            # The first patient's instances stay; this one is refused, never mixed into their report.
            raise _Rejection(STATUS_PATIENT_CONFLICT, "patient_conflict", str(exc)) from exc
        except InvalidInstance as exc:
            raise _Rejection(STATUS_DATASET_MISMATCH, "missing_uid", str(exc)) from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _Rejection(STATUS_OUT_OF_RESOURCES, "disk_full", "spool disk is full") from exc
            raise _Rejection(
                STATUS_OUT_OF_RESOURCES, "io_error", f"spool write failed: {errno.errorcode.get(exc.errno or 0, 'EIO')}"
            ) from exc
        self._quota.stored(len(data))
        log.debug("instance_stored", study_uid=study_uid, sop_instance_uid=sop_instance, modality=modality)
        return modality, study_uid

    def _check(self, event: Event, request: C_STORE, data: bytes, transfer_syntax: str) -> tuple[str, str, str, str]:
        """Parse and check a received instance: its Study and SOP Instance UIDs, modality label and patient key.

        Raises
        ------
        _Rejection
            With the PS3.4 B.2.3 status that refuses the instance.
        """
        try:
            ds = dcmread(io.BytesIO(data), defer_size=None)
        except Exception as exc:  # pydicom raises many types on garbage; all mean the same here
            raise _Rejection(STATUS_CANNOT_UNDERSTAND, "undecodable", f"{type(exc).__name__}: {exc}") from exc
        _check_structure(ds, data, transfer_syntax)

        sop_class = _uid(ds, "SOPClassUID")
        if sop_class != str(event.context.abstract_syntax):
            raise _Rejection(
                STATUS_DATASET_MISMATCH,
                "sop_class_mismatch",
                f"SOP Class {sop_class} sent on a {event.context.abstract_syntax} context",
            )
        sop_instance = _uid(ds, "SOPInstanceUID")
        if sop_instance != str(request.AffectedSOPInstanceUID).strip("\x00 "):
            raise _Rejection(
                STATUS_DATASET_MISMATCH,
                "sop_instance_mismatch",
                "SOP Instance UID differs from the request's Affected SOP Instance UID",
            )
        study_uid = _uid(ds, "StudyInstanceUID")
        _uid(ds, "SeriesInstanceUID")  # every job references its series; refuse now, not at sealing
        modality = _modality_label(ds)
        # Checked on the header alone: a few compressed megabytes can declare gigabytes of pixels.
        try:
            too_large = over_limits(ds, self._image_limits)
            patient = patient_key(ds)
        except Exception as exc:  # a size attribute or patient element pydicom cannot convert
            raise _Rejection(STATUS_CANNOT_UNDERSTAND, "undecodable", f"{type(exc).__name__}: {exc}") from exc
        if too_large is not None:
            raise _Rejection(STATUS_IMAGE_TOO_LARGE, "too_large_decoded", too_large)
        return study_uid, sop_instance, modality, patient
