"""Thirty kinds of bad input, each sent over a real association and, where the listener accepts it, read by the
worker's reader: a DICOM failure status or a typed permanent error with a reason, never a crash, a hang or an
unbounded allocation, and the listener keeps serving (issue 37, "A bad-input corpus").

Each case is built here from a valid ultrasound instance; ``raw`` cases are sent as bytes, undecoded, so that the
sender cannot repair them. Accepted instances must be read into frames or refused by the reader with one of the
errors that dead-letter a job (``service.errors.PermanentError``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import UltrasoundImageStorage  # type: ignore[attr-defined]

from service.errors import PermanentError
from tests.integration.listener_harness import SCP_AE, Service, dataset_body, raw_file, scu
from workers.dicom_reader import read_frames

pytestmark = pytest.mark.integration

FAILURE_STATUSES = {0xA700, 0xA900, 0xC210, 0xC211, 0xC212, 0x0110}
CASE_SECONDS = 10.0  # a bound far above what any case takes; a hang or a runaway decode breaks it


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Dataset, Path], Path]  # from a valid data set to the file that is sent


def _as_is(mutate: Callable[[Dataset], None]) -> Callable[[Dataset, Path], Path]:
    def build(ds: Dataset, path: Path) -> Path:
        sop_uid = str(ds.SOPInstanceUID)  # the request's, whatever the case does to the data set
        mutate(ds)
        return raw_file(path, UltrasoundImageStorage, sop_uid, dataset_body(ds))

    return build


def _bytes(make: Callable[[bytes], bytes]) -> Callable[[Dataset, Path], Path]:
    def build(ds: Dataset, path: Path) -> Path:
        return raw_file(path, UltrasoundImageStorage, str(ds.SOPInstanceUID), make(dataset_body(ds)))

    return build


def _set(**values: object) -> Callable[[Dataset, Path], Path]:
    def mutate(ds: Dataset) -> None:
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return _as_is(mutate)


def _nested(depth: int) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        inner = Dataset()
        inner.CodeMeaning = "deep"
        for _ in range(depth):
            outer = Dataset()
            outer.ContentSequence = Sequence([inner])
            inner = outer
        ds.ContentSequence = inner.ContentSequence

    return mutate


def _private_tag(size: int) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        block = ds.private_block(0x0011, "BREASTAI TEST", create=True)
        block.add_new(0x01, "OB", b"\xab" * size)

    return mutate


def _compressed_garbage(transfer_syntax: str) -> Callable[[Dataset, Path], Path]:
    def build(ds: Dataset, path: Path) -> Path:
        from pydicom.encaps import encapsulate

        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = encapsulate([b"\xff\xd8 not a real codestream \xff\xd9" * 10])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
        return path

    return build


CASES = [
    Case("empty body", _bytes(lambda body: b"")),
    Case("garbage after the DICM preamble", _bytes(lambda body: b"\x00\x11garbage" * 64)),
    Case("cut in the middle of the header", _bytes(lambda body: body[:40])),
    Case("cut inside the pixel data", _bytes(lambda body: body[:-500])),
    Case("stray bytes after the last element", _bytes(lambda body: body + b"\x01\x02\x03")),
    Case("no SOP Instance UID", _set(SOPInstanceUID=None)),
    Case("no Study Instance UID", _set(StudyInstanceUID=None)),
    Case("no Series Instance UID", _set(SeriesInstanceUID=None)),
    Case("UID with letters", _set(StudyInstanceUID="1.2.abc.4")),
    Case("UID longer than 64 characters", _set(StudyInstanceUID="1." + "2" * 70)),
    Case("UID with a path", _set(StudyInstanceUID="1.2.3/../../etc")),
    Case("SOP Class of another object", _set(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.33")),
    Case("pixel data shorter than declared", _as_is(lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]))),
    Case("pixel data longer than declared", _as_is(lambda ds: setattr(ds, "PixelData", ds.PixelData * 3))),
    Case("empty pixel data", _as_is(lambda ds: setattr(ds, "PixelData", b""))),
    Case("no pixel data", _set(PixelData=None)),
    Case("65535 x 65535 declared", _set(Rows=65535, Columns=65535)),
    Case("a million frames declared", _set(NumberOfFrames=1_000_000)),
    Case("zero rows", _set(Rows=0)),
    Case("32 bits allocated", _set(BitsAllocated=32, BitsStored=32, HighBit=31)),
    Case("1 bit allocated", _set(BitsAllocated=1, BitsStored=1, HighBit=0)),
    Case("three samples but MONOCHROME2", _set(SamplesPerPixel=3)),
    Case("unknown photometric interpretation", _set(PhotometricInterpretation="YBR_FOO")),
    Case("no photometric interpretation", _set(PhotometricInterpretation=None)),
    Case("JPEG transfer syntax, garbage fragments", _compressed_garbage(JPEGBaseline8Bit)),
    Case("RLE transfer syntax, garbage fragments", _compressed_garbage(RLELossless)),
    Case("an 8 MB private tag", _as_is(_private_tag(8 * 1024 * 1024))),
    Case("sequences nested 120 deep", _as_is(_nested(120))),
    Case("negative pixel spacing", _set(PixelSpacing=[-0.1, -0.1])),
    Case("a study of another patient", _set(PatientID="SOMEONE-ELSE")),  # same study as the first case's
]


def corpus_scu() -> AE:
    """A sender that offers the compressed syntaxes too, as a PACS does."""
    return scu("CORPUS", transfer_syntaxes=(ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless), timeout_s=10)


@pytest.mark.usefixtures("send_raw_files")
def test_every_bad_input_gets_a_failure_status_or_a_typed_refusal_and_the_listener_keeps_serving(
    start_service: Callable[..., Service],
    us_dataset: Callable[..., Dataset],
    tmp_path: Path,
) -> None:
    service = start_service(max_instance_mb=64)
    study = str(generate_uid())
    first = us_dataset(study_uid=study)
    first_path = tmp_path / "first.dcm"
    first.save_as(first_path, enforce_file_format=True)
    assoc = corpus_scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert assoc.send_c_store(first_path).Status == 0x0000  # binds the study to its patient
    outcomes: dict[str, str] = {}
    for index, case in enumerate(CASES):
        ds = us_dataset(study_uid=study)
        ds.PixelData = np.arange(64 * 64, dtype=np.uint8).tobytes()
        path = case.build(ds, tmp_path / f"case{index}.dcm")
        started = time.monotonic()
        if not assoc.is_established:  # a case may end the association; the next one gets a new one
            assoc = corpus_scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
        status = assoc.send_c_store(path)
        code = int(status.Status) if "Status" in status else -1
        if code == 0x0000:
            stored = service.spool.root / "incoming" / study / f"{ds.SOPInstanceUID}.dcm"
            try:
                frames = read_frames(stored)
                outcome = f"accepted, read into {len(frames)} frame(s)"
            except PermanentError as exc:
                outcome = f"accepted, refused by the reader: {type(exc).__name__}"
        else:
            assert code in FAILURE_STATUSES, f"{case.name}: status 0x{code:04X}"
            outcome = f"refused 0x{code:04X}"
        assert time.monotonic() - started < CASE_SECONDS, f"{case.name} took too long"
        outcomes[case.name] = outcome
    assoc.release()
    assert len(outcomes) >= 25, f"the corpus has at least 25 kinds of bad input: {sorted(outcomes)}"
    # Read as images only where what is odd does not touch the pixels (a big private tag, deep sequences, a spacing
    # the reader drops as insane): everything else is refused at the door or by the reader, with its reason.
    read = {name for name, outcome in outcomes.items() if "read into" in outcome}
    assert read == {"an 8 MB private tag", "sequences nested 120 deep", "negative pixel spacing"}, outcomes
    # The ones a reader could be fooled by are refused at the door.
    for refused_at_the_door in (
        "empty body",
        "cut inside the pixel data",
        "no Study Instance UID",
        "UID with a path",
        "65535 x 65535 declared",
        "a million frames declared",
        "a study of another patient",
    ):
        assert outcomes[refused_at_the_door].startswith("refused"), (refused_at_the_door, outcomes)
    good = tmp_path / "good.dcm"
    us_dataset().save_as(good, enforce_file_format=True)
    again = corpus_scu().associate("127.0.0.1", service.port, ae_title=SCP_AE)
    assert again.send_c_store(good).Status == 0x0000, "the listener keeps serving"
    again.release()
