"""A study's images analysed side by side (``image_concurrency``): the same results, and batches on the way."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import structlog
from pydicom import Dataset
from pydicom.uid import UID

from models.inference.backend import Arrays
from models.inference.backends import InferenceRuntime
from models.inference.batching import BatchingBackend
from models.inference.lesions import Component, outline_of
from models.inference.pipeline import load_bmode_pipeline
from service.logging import bind_job
from tests.dicom_factory import (
    encoded_without_run_stamps,
    make_us_dataset,
    make_us_volume_dataset,
    synthetic_breast_image,
    write_dataset,
)
from workers.consumer import _parallel_map, process_study
from workers.sr_writer import ReportContext

STUDY = "1.2.826.0.1.3680043.8.498.77"
CONTEXT = ReportContext(device_observer_uid="2.25.1")


def _mixed_study(folder: Path) -> list[Path]:
    """Three B-mode images, one whose pixels cannot be decoded, and an Enhanced US Volume of eight frames."""
    paths = []
    for index in range(3):
        image = synthetic_breast_image(seed=index, columns=320 + 16 * index)
        ds = make_us_dataset(image, study_uid=STUDY, sop_uid=f"{STUDY}.1.{index}")
        paths.append(write_dataset(ds, folder / f"bmode{index}.dcm"))
    broken = make_us_dataset(np.zeros((32, 32), np.uint8), study_uid=STUDY, sop_uid=f"{STUDY}.2.0")
    broken.PixelData = broken.PixelData[:100]
    paths.append(write_dataset(broken, folder / "broken.dcm"))
    frames = np.stack([synthetic_breast_image(seed=10 + index) for index in range(8)])
    volume = make_us_volume_dataset(frames, study_uid=STUDY)
    volume.SOPInstanceUID = volume.file_meta.MediaStorageSOPInstanceUID = UID(f"{STUDY}.3.0")
    volume.PatientID, volume.PatientName = broken.PatientID, broken.PatientName
    paths.append(write_dataset(volume, folder / "volume.dcm"))
    return paths


def test_images_analysed_side_by_side_give_the_results_they_give_one_after_the_other(tmp_path: Path) -> None:
    paths = _mixed_study(tmp_path)
    pipeline = load_bmode_pipeline()
    serial = process_study(paths, pipeline, CONTEXT)
    side_by_side = process_study(paths, pipeline, CONTEXT, image_concurrency=3)

    assert serial.skipped == side_by_side.skipped and [uid for uid, _ in serial.skipped] == [f"{STUDY}.2.0"]
    assert len(serial.overlays) >= 4 * len(pipeline.families), "three images and the volume's frame(s), per family"
    assert [(d.SeriesNumber, d.InstanceNumber) for d in side_by_side.overlays] == [
        (d.SeriesNumber, d.InstanceNumber) for d in serial.overlays
    ]
    assert [encoded_without_run_stamps(d) for d in side_by_side.datasets] == [
        encoded_without_run_stamps(d) for d in serial.datasets
    ]


def test_overlays_are_numbered_per_family_series_in_instance_order(tmp_path: Path) -> None:
    paths = _mixed_study(tmp_path)
    results = process_study(paths, load_bmode_pipeline(), CONTEXT, image_concurrency=2)
    by_series: dict[int, list[Dataset]] = {}
    for overlay in results.overlays:
        by_series.setdefault(int(overlay.SeriesNumber), []).append(overlay)
    assert sorted(by_series) == list(range(9902, 9902 + len(by_series)))
    for overlays in by_series.values():
        assert [int(o.InstanceNumber) for o in overlays] == list(range(1, len(overlays) + 1))
        assert len({str(o.SeriesInstanceUID) for o in overlays}) == 1
        assert len({str(o.SeriesDescription) for o in overlays}) == 1


def _recording(run: Callable[[Arrays], Arrays], rows: list[int], lock: threading.Lock) -> Callable[[Arrays], Arrays]:
    def wrapper(inputs: Arrays) -> Arrays:
        with lock:
            rows.append(int(next(iter(inputs.values())).shape[0]))
        return run(inputs)

    return wrapper


def test_the_images_of_one_study_reach_a_batching_backend_together(tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="batching rewrites the graphs' batch axis with the onnx package")
    paths = _mixed_study(tmp_path)
    # A generous wait: the four image tasks start within milliseconds, and a loaded test machine must not split them.
    runtime = InferenceRuntime(max_batch=8, max_wait_ms=200.0)
    pipeline = load_bmode_pipeline(runtime=runtime)
    segmenter = pipeline.backends["us_segmenter"]
    assert isinstance(segmenter, BatchingBackend)
    rows: list[int] = []
    segmenter.backend.run = _recording(segmenter.backend.run, rows, threading.Lock())  # type: ignore[method-assign,assignment]

    batched = process_study(paths, pipeline, CONTEXT, image_concurrency=4)

    # 3 images + 8 volume frames (+ a sagittal plane per tracked lesion) went through the segmenter in fewer calls.
    assert sum(rows) >= 11 and max(rows) > 1, rows
    serial = process_study(paths, load_bmode_pipeline(), CONTEXT)
    # Batched runs may differ from single ones in the last bits of a float: the same objects, the same figures.
    assert [str(d.SOPInstanceUID) for d in batched.datasets] == [str(d.SOPInstanceUID) for d in serial.datasets]
    assert batched.report is not None and serial.report is not None
    np.testing.assert_allclose(_numbers(batched.report), _numbers(serial.report), rtol=1e-4, atol=1e-4)


def _numbers(report: Dataset) -> list[float]:
    """Every numeric value of an SR's content tree, in tree order."""
    found: list[float] = []
    report.walk(lambda _ds, element: found.append(float(element.value)) if element.keyword == "NumericValue" else None)
    return found


def test_image_concurrency_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_concurrency"):
        process_study(_mixed_study(tmp_path), load_bmode_pipeline(), CONTEXT, image_concurrency=0)


def test_the_lesions_of_one_image_reach_a_batching_backend_together() -> None:
    pytest.importorskip("onnx", reason="batching rewrites the graphs' batch axis with the onnx package")
    pipeline = load_bmode_pipeline(runtime=InferenceRuntime(max_batch=8, max_wait_ms=200.0))
    gray = synthetic_breast_image(rows=240, columns=480)
    (found,) = pipeline.segment(gray)
    # A second lesion: the same outline 150 pixels to the left, on the image's own speckle.
    mask = np.roll(found.mask, -150, axis=1)
    x, y, w, h = found.box
    second = Component(mask, (x - 150, y, w, h), found.area_px, outline_of(mask), found.mean_probability)
    classifier = pipeline.backends["dlr_bm"]
    assert isinstance(classifier, BatchingBackend)
    rows: list[int] = []
    classifier.backend.run = _recording(classifier.backend.run, rows, threading.Lock())  # type: ignore[method-assign,assignment]

    with ThreadPoolExecutor(max_workers=2) as pool:
        together = pipeline.analyse_lesions(gray, [found, second], lesions_map=pool.map)
    alone = load_bmode_pipeline().analyse_lesions(gray, [found, second])

    assert rows == [2], "both lesions' crops in one call of the classifier"
    np.testing.assert_allclose(
        [s.probability for lesion in together.lesions for s in lesion.family_scores],
        [s.probability for lesion in alone.lesions for s in lesion.family_scores],
        rtol=1e-4,
        atol=1e-4,
    )


def test_what_the_image_threads_built_can_be_copied_on_the_job_thread(tmp_path: Path) -> None:
    """highdicom's SEG keeps an SQLite index only its own thread may use; the worker hands on plain data sets."""
    results = process_study(_mixed_study(tmp_path), load_bmode_pipeline(), CONTEXT, image_concurrency=2)
    assert results.segmentations, "the synthetic lesions are outlined"
    for dataset in results.datasets:
        assert copy.deepcopy(dataset).SOPInstanceUID == dataset.SOPInstanceUID


def test_tasks_on_the_pool_log_with_the_job_bindings_of_their_caller() -> None:
    structlog.contextvars.clear_contextvars()
    with bind_job(job_id="job-7", study_uid="1.2.3"), _parallel_map(2) as parallel:
        seen = list(parallel(lambda _: structlog.contextvars.get_contextvars(), range(4)))
    assert seen == [{"job_id": "job-7", "study_uid": "1.2.3"}] * 4


def test_a_mammograms_regions_scored_side_by_side_give_the_results_scored_one_by_one(tmp_path: Path) -> None:
    from models.inference.mammography_pipeline import load_mammography_pipeline
    from tests.e2e.test_mammography import vendor_mammogram

    path = vendor_mammogram(tmp_path / "cc.dcm", study_uid=STUDY, laterality="L", view="CC")
    bmode, mammography = load_bmode_pipeline(), load_mammography_pipeline()
    assert mammography is not None, "the bundled models include the mammography finder"
    serial = process_study([path], bmode, CONTEXT, mammography=mammography)
    side_by_side = process_study([path], bmode, CONTEXT, mammography=mammography, image_concurrency=3)
    assert len(serial.segmentations) == 1 and serial.report is not None
    regions = len(serial.segmentations[0].SegmentSequence)
    assert regions >= 2, "several regions, so that they were scored side by side"
    same = [encoded_without_run_stamps(d) for d in side_by_side.datasets]
    assert same == [encoded_without_run_stamps(d) for d in serial.datasets]
