"""Real vendor ultrasound files through the whole analysis with the reference models.

Complements ``tests/unit/test_vendor_files.py`` (reading and writing with a
fabricated analysis): here the real ONNX pipeline runs on each file and the
SR and overlays it yields must be dciodvfy-clean.
"""

from __future__ import annotations

import pathlib

import pydicom
import pytest
from pydicom.data import get_testdata_file

from models.inference.pipeline import BModePipeline, load_bmode_pipeline
from tests.dicom_factory import dciodvfy_errors
from tests.unit.test_vendor_files import VENDOR_FILES
from workers.consumer import process_study
from workers.routing import COLOUR_REASON, route
from workers.sr_writer import ReportContext


@pytest.fixture(scope="module")
def pipeline() -> BModePipeline:
    return load_bmode_pipeline()


@pytest.mark.parametrize("name", sorted(VENDOR_FILES))
def test_vendor_file_goes_through_the_pipeline(name: str, pipeline: BModePipeline, tmp_path: pathlib.Path) -> None:
    found = get_testdata_file(name)
    assert found is not None, f"{name} is missing: pydicom-data is part of the test extra"
    path = pathlib.Path(str(found))
    header = pydicom.dcmread(path, stop_before_pixels=True)

    results = process_study([path], pipeline, ReportContext())

    if results.report is None:
        # Not analysed: routed nowhere from its header, or a colour image its pixels showed to be Doppler.
        assert [uid for uid, _ in results.skipped] == [str(header.SOPInstanceUID)]
        assert route(header).pipeline is None or results.skipped[0][1] == COLOUR_REASON, results.skipped
        return
    assert results.report is not None and len(results.overlays) == len(pipeline.families)  # one per family
    assert results.report.StudyInstanceUID == header.StudyInstanceUID
    for number, dataset in enumerate(results.datasets):
        written = tmp_path / f"{number}.dcm"
        dataset.save_as(written, enforce_file_format=True)
        assert dciodvfy_errors(written) == [], f"{name}: result {number} ({dataset.SOPClassUID.name})"
