"""A real StudyListener with its spool, dispatcher and embedded queue on a free port, and senders for it.

Shared by the listener tests, the bad-input corpus and the full-spool test: ``start_service``
starts one (stopped at teardown), ``send_raw_files`` makes pynetdicom send a
file's bytes undecoded, and the helpers build what the tests send.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import UltrasoundImageStorage  # type: ignore[attr-defined]

from service.dispatcher import Dispatcher
from service.listener import StudyListener
from service.queue.embedded import EmbeddedJobQueue
from service.schema import StudyJob
from service.settings import Settings
from service.spool import Spool
from tests.dicom_factory import encode  # re-exported: the listener tests import it from here

SCP_AE = "BREASTAI"


@dataclass
class Service:
    settings: Settings
    spool: Spool
    queue: EmbeddedJobQueue
    dispatcher: Dispatcher
    listener: StudyListener

    @property
    def port(self) -> int:
        return self.listener.port

    def incoming(self) -> list[Path]:
        return sorted((self.spool.root / "incoming").rglob("*.dcm"))

    def jobs(self) -> list[StudyJob]:
        return sealed_jobs(self.spool)


def sealed_jobs(spool: Spool) -> list[StudyJob]:
    """The jobs the dispatcher finished sealing in ``spool`` (job.json written), in folder order.

    Never a half-sealed one rebuilt from here (as ``Spool.sealed_jobs`` would): that would race the dispatcher.
    """
    return [
        StudyJob.from_json((p / "job.json").read_bytes())
        for p in sorted((spool.root / "studies").iterdir())
        if (p / "job.json").is_file()
    ]


@pytest.fixture
def start_service(spool_dir: Path, port: int) -> Iterator[Callable[..., Service]]:
    """``start(recover=False, **settings)``: a started service, its spool opened as the service opens it.

    ``spool_reserve_mb`` is 0 unless given (no 64 MB reserve file per test);
    ``recover`` is passed to the embedded queue.
    """
    started: list[Service] = []

    def start(*, recover: bool = False, **overrides: object) -> Service:
        values: dict[str, object] = dict(
            port=port,
            bind_address="127.0.0.1",
            quiet_period_s=0.3,
            stable_age_s=30.0,
            spool_dir=spool_dir,
            metrics_port=0,
            spool_reserve_mb=0,
        )
        values.update(overrides)
        settings = Settings(**values)  # type: ignore[arg-type]
        spool = Spool.from_settings(settings)
        queue = EmbeddedJobQueue(settings, spool, recover=recover)
        dispatcher = Dispatcher(settings, spool, queue, tick_s=0.05)
        dispatcher.recover()
        dispatcher.start()
        listener = StudyListener(settings, spool, dispatcher)
        listener.start()
        service = Service(settings, spool, queue, dispatcher, listener)
        started.append(service)
        return service

    yield start
    for service in started:
        service.listener.stop()
        service.dispatcher.stop()
        service.queue.close()


def scu(
    ae_title: str = "TESTSCU",
    *contexts: str,
    transfer_syntaxes: Sequence[str] = (ExplicitVRLittleEndian,),
    timeout_s: float = 5,
) -> AE:
    """A sender offering each of ``contexts`` (US Image Storage by default) once per transfer syntax."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for context in contexts or (UltrasoundImageStorage,):
        for transfer_syntax in transfer_syntaxes:  # one presentation context each: any one may be accepted
            ae.add_requested_context(context, transfer_syntax)
    return ae


def raw_file(path: Path, sop_class: str, sop_uid: str, body: bytes) -> Path:
    """A PS3.10 file with valid meta information and an arbitrary data set body."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + body)
    return path


def dataset_body(ds: Dataset) -> bytes:
    """The encoded data set after the file meta information."""
    return body_after_meta(encode(ds))


def body_after_meta(data: bytes) -> bytes:
    """The bytes of a PS3.10 file after its file meta information (the data set as encoded)."""
    marker = data.index(b"DICM") + 4
    # Group 0002 length is in the first element after the prefix: skip the meta group.
    group_length = int.from_bytes(data[marker + 8 : marker + 12], "little")
    return data[marker + 12 + group_length :]


@pytest.fixture
def send_raw_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``send_c_store(path)`` send the file's bytes undecoded (pynetdicom >= 2.0).

    Without it pynetdicom decodes the file first and refuses or repairs
    exactly the malformed data sets these tests need to deliver.
    """
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
