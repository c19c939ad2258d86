"""The network-free study processing core: routing, partial failures, idempotent UIDs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.inference.pipeline import load_bmode_pipeline
from service.errors import UnsupportedInput
from tests.dicom_factory import make_us_dataset, synthetic_breast_image, write_dataset
from tests.e2e.results import evidence_uids
from workers.consumer import process_study
from workers.sr_writer import ReportContext

STUDY = "1.2.826.0.1.3680043.8.498.1"


def _study(tmp_path: Path, broken: int = 0, good: int = 1) -> list[Path]:
    paths = []
    for index in range(good):
        ds = make_us_dataset(synthetic_breast_image(), study_uid=STUDY, sop_uid=f"{STUDY}.1.{index}")
        paths.append(write_dataset(ds, tmp_path / f"good{index}.dcm"))
    for index in range(broken):
        ds = make_us_dataset(np.zeros((32, 32), np.uint8), study_uid=STUDY, sop_uid=f"{STUDY}.2.{index}")
        ds.PixelData = ds.PixelData[:100]  # truncated pixel data: header fine, pixels not decodable
        paths.append(write_dataset(ds, tmp_path / f"broken{index}.dcm"))
    return paths


def test_one_undecodable_image_does_not_cost_the_study_its_report(tmp_path: Path) -> None:
    pipeline = load_bmode_pipeline()
    results = process_study(_study(tmp_path, broken=1), pipeline, ReportContext())
    # one overlay per analysed image and family
    assert results.report is not None and len(results.overlays) == len(pipeline.families)
    assert [uid for uid, _ in results.skipped] == [f"{STUDY}.2.0"]
    assert results.skipped[0][1].startswith("not readable")
    comments = [str(item.TextValue) for item in results.report.ContentSequence[-1].ContentSequence]
    assert [c for c in comments if c.startswith("Not analysed: image")] == [
        f"Not analysed: image 1 of series 1 (B-mode): {results.skipped[0][1]}."
    ], "the report names the image it could not read, and why"

    assert evidence_uids(results.report) == {f"{STUDY}.1.0", f"{STUDY}.2.0"}, (
        "the unreadable image is still listed as evidence"
    )


def test_a_study_of_only_undecodable_images_is_a_permanent_error(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedInput, match="no image of the study could be analysed"):
        process_study(_study(tmp_path, broken=1, good=0), load_bmode_pipeline(), ReportContext())


def test_reprocessing_yields_the_same_result_uids(tmp_path: Path) -> None:
    paths = _study(tmp_path, good=2)
    pipeline = load_bmode_pipeline()
    first = process_study(paths, pipeline, ReportContext())
    second = process_study(list(reversed(paths)), pipeline, ReportContext())
    assert [d.SOPInstanceUID for d in first.datasets] == [d.SOPInstanceUID for d in second.datasets]
    # A report, an overlay per image and family, and a SEG per image with lesions (issue 36).
    assert len(first.segmentations) == sum(1 for ds in first.segmentations if ds.Modality == "SEG") <= 2
    assert len({d.SOPInstanceUID for d in first.datasets}) == 1 + 2 * len(pipeline.families) + len(first.segmentations)
    # the report goes last: the overlays it refers to are in the PACS before it
    assert first.report is not None and first.datasets[-1] is first.report
    assert all(d.Modality != "SR" for d in first.datasets[:-1])
