"""The result sender against a real Storage SCP on a free port.

Which C-STORE statuses count as stored, retried or refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage as SCStorage  # type: ignore[attr-defined]

from service.errors import DestinationUnavailable, ResultRejected
from service.settings import Destination
from workers.sender import ResultSender, store_to_pacs

pytestmark = pytest.mark.integration


def _dataset(sop_class: str = SecondaryCaptureImageStorage) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


class _AnsweringScp:
    """A Storage SCP of ``classes`` that answers every C-STORE with ``status`` (or ``status_of[class]``) and counts
    what it received."""

    def __init__(self, classes: tuple[str, ...] = (SCStorage,)) -> None:
        self.status = 0x0000
        self.status_of: dict[str, int] = {}
        self.received = 0
        self.received_classes: list[str] = []
        ae = AE(ae_title="ARCHIVE")
        for sop_class in classes:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian])
        self._server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._answer)])
        self.port = int(self._server.server_address[1])

    def _answer(self, event: evt.Event) -> int:
        sop_class = str(event.request.AffectedSOPClassUID)
        self.received += 1
        self.received_classes.append(sop_class)
        return self.status_of.get(sop_class, self.status)

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture
def archive() -> Iterator[_AnsweringScp]:
    scp = _AnsweringScp()
    yield scp
    scp.stop()


def _destination(archive: _AnsweringScp) -> Destination:
    return Destination.parse(f"ARCHIVE@127.0.0.1:{archive.port}")


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xB007, 0x0111])
def test_success_warnings_and_duplicate_instance_count_as_stored(archive: _AnsweringScp, status: int) -> None:
    archive.status = status
    store_to_pacs([_dataset(), _dataset()], _destination(archive), "BREASTAI", timeout_s=5)
    assert archive.received == 2


@pytest.mark.parametrize("status", [0xA700, 0xA7FF, 0x0213, 0x0110])
def test_resource_and_processing_failures_are_retried(archive: _AnsweringScp, status: int) -> None:
    archive.status = status
    waits: list[float] = []
    sender = ResultSender([_destination(archive)], "BREASTAI", retries=3, backoff_s=0.01, sleep=waits.append)
    with pytest.raises(DestinationUnavailable, match=f"0x{status:04X}"):
        sender.send([_dataset()])
    assert archive.received == 3 and waits == [0.01, 0.02]


@pytest.mark.parametrize("status", [0xA900, 0xC000, 0x0122, 0x0124])
def test_refusals_that_retrying_cannot_change_are_not_retried(archive: _AnsweringScp, status: int) -> None:
    archive.status = status
    sender = ResultSender([_destination(archive)], "BREASTAI", retries=3, backoff_s=0.01, sleep=lambda _: None)
    with pytest.raises(ResultRejected, match=f"0x{status:04X}"):
        sender.send([_dataset()])
    assert archive.received == 1


def test_a_folder_that_cannot_be_written_is_a_transient_failure(tmp_path: Path) -> None:
    blocked = tmp_path / "results"
    blocked.write_text("a file where the results folder should be")
    sender = ResultSender([Destination.parse(str(blocked))], "BREASTAI")
    with pytest.raises(DestinationUnavailable, match="cannot write results"):
        sender.send([_dataset()])
    writable = ResultSender([Destination.parse(str(tmp_path / "ok"))], "BREASTAI")
    writable.send([ds := _dataset()])
    assert (tmp_path / "ok" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm").is_file()


CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"  # Mammography CAD SR Storage: an optional result


def test_a_pacs_without_the_optional_cad_sr_class_gets_every_other_result() -> None:
    archive = _AnsweringScp()  # Secondary Capture only, as many archives take no CAD SR
    try:
        store_to_pacs([_dataset(), _dataset(CAD_SR), _dataset()], _destination(archive), "BREASTAI", timeout_s=5)
        assert archive.received_classes == [SCStorage, SCStorage]
    finally:
        archive.stop()


def test_a_cad_sr_refused_for_good_is_left_out_and_the_rest_still_sent() -> None:
    archive = _AnsweringScp((SCStorage, CAD_SR))
    archive.status_of[CAD_SR] = 0xC000
    try:
        store_to_pacs([_dataset(), _dataset(CAD_SR), _dataset()], _destination(archive), "BREASTAI", timeout_s=5)
        assert archive.received_classes == [SCStorage, CAD_SR, SCStorage]
        archive.status_of[CAD_SR] = 0xA700  # out of resources clears up: retried like any result
        with pytest.raises(DestinationUnavailable, match="0xA700"):
            store_to_pacs([_dataset(CAD_SR)], _destination(archive), "BREASTAI", timeout_s=5)
    finally:
        archive.stop()
