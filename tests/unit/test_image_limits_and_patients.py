"""A study is one patient's, and an image is decoded only if its header declares a bounded size.

Issue 37's first two failures: a study holding two PatientIDs was reported
under the first patient with the second one's outlines, and a 4.5 MB RLE
instance declaring 12000 x 12000 pixels of 16 bits took a worker to 14 GB.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from service.errors import ImageTooLarge, PatientConflict, PermanentError
from service.image_limits import ImageLimits, declared_size, over_limits
from service.spool import Spool, read_patient_marker
from service.study_identity import patient_key
from tests.conftest import make_us_dataset
from tests.dicom_factory import write_dataset
from workers.dicom_reader import read_frames


def _header(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_declared_size_counts_frames_samples_and_bytes() -> None:
    size = declared_size(_header(Rows=600, Columns=800, NumberOfFrames=300, SamplesPerPixel=3, BitsAllocated=8))
    assert size is not None
    assert (size.frame_pixels, size.decoded_bytes) == (480_000, 480_000 * 300 * 3)
    single = declared_size(_header(Rows=3000, Columns=2400, BitsAllocated=16))
    assert single is not None and single.decoded_bytes == 3000 * 2400 * 2
    assert declared_size(_header(Modality="SR")) is None  # not an image: nothing to bound


def test_the_memory_bomb_is_over_the_limits_and_real_images_are_not() -> None:
    limits = ImageLimits()
    bomb = _header(Rows=12000, Columns=12000, BitsAllocated=16, SamplesPerPixel=1)
    assert "max_frame_megapixels=40" in (over_limits(bomb, limits) or "")
    mammogram = _header(Rows=5928, Columns=4728, BitsAllocated=16, SamplesPerPixel=1)  # a 50 um FFDM detector
    assert over_limits(mammogram, limits) is None
    long_cine = _header(Rows=600, Columns=800, NumberOfFrames=3000, SamplesPerPixel=3, BitsAllocated=8)
    assert "max_decoded_mb=2048" in (over_limits(long_cine, limits) or "")
    assert over_limits(long_cine, ImageLimits(max_decoded_mb=8192)) is None


@pytest.mark.parametrize("bad", [{"Rows": 0}, {"Columns": -5}, {"NumberOfFrames": 0}])
def test_a_malformed_size_is_an_error_not_a_pass(bad: dict[str, object]) -> None:
    header = _header(**{"Rows": 10, "Columns": 10, **bad})
    with pytest.raises(ValueError, match=next(iter(bad))):
        over_limits(header, ImageLimits())


def test_patient_key_is_issuer_and_id_and_holds_neither() -> None:
    first = patient_key(_header(PatientID="MRN123", IssuerOfPatientID="HOSP-A"))
    assert first == patient_key(_header(PatientID=" MRN123 ", IssuerOfPatientID="HOSP-A"))
    assert first != patient_key(_header(PatientID="MRN123", IssuerOfPatientID="HOSP-B"))
    assert first != patient_key(_header(PatientID="MRN124", IssuerOfPatientID="HOSP-A"))
    assert "MRN123" not in first and len(first) == 64


def test_a_study_stays_bound_to_its_first_patient_even_after_it_was_sealed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    study = "1.2.3.4"
    spool.store_instance(study, "1.2.3.4.1", b"first", patient_key="a" * 64)
    spool.store_instance(study, "1.2.3.4.2", b"second", patient_key="a" * 64)
    with pytest.raises(PatientConflict):
        spool.store_instance(study, "1.2.3.4.3", b"stray", patient_key="b" * 64)
    assert sorted(p.name for p in (spool.incoming_dir / study).iterdir()) == ["1.2.3.4.1.dcm", "1.2.3.4.2.dcm"]
    assert not list(spool.tmp_dir.glob("*.tmp")), "the refused instance leaves nothing behind"
    (spool.incoming_dir / study).rename(spool.studies_dir / "job-1")  # as sealing does
    with pytest.raises(PatientConflict):
        spool.store_instance(study, "1.2.3.4.4", b"later", patient_key="b" * 64)
    spool.store_instance(study, "1.2.3.4.5", b"later, same patient", patient_key="a" * 64)
    assert read_patient_marker(spool.patients_dir / study) == "a" * 64
    # Nothing about the patient but the digest is kept.
    assert all(len(read_patient_marker(p)) == 64 for p in spool.patients_dir.iterdir())


def test_the_worker_refuses_a_study_of_two_patients_without_a_report(tmp_path: Path) -> None:
    from workers.consumer import process_study
    from workers.sr_writer import ReportContext

    first = make_us_dataset(study_uid="1.2.826.0.1.3680043.10.1.1")
    second = make_us_dataset(study_uid="1.2.826.0.1.3680043.10.1.1")
    second.PatientID = "SOMEONE-ELSE"
    paths = [write_dataset(first, tmp_path / "a.dcm"), write_dataset(second, tmp_path / "b.dcm")]
    with pytest.raises(PatientConflict, match="2 patients") as refused:
        process_study(paths, pipeline=None, context=ReportContext(device_observer_uid="2.25.1"))  # type: ignore[arg-type]
    assert isinstance(refused.value, PermanentError), "dead-lettered, never retried"
    assert "SOMEONE-ELSE" not in str(refused.value) and "TEST0001" not in str(refused.value)


def test_the_reader_refuses_a_declared_bomb_before_decoding(tmp_path: Path) -> None:
    ds = make_us_dataset()
    ds.Rows, ds.Columns = 12000, 12000  # the pixel data stays tiny: only the header is read
    path = write_dataset(ds, tmp_path / "bomb.dcm")
    with pytest.raises(ImageTooLarge, match="12000 x 12000"):
        read_frames(path)
