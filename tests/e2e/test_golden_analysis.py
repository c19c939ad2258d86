"""The bundled models on the sample studies give the same SR content and overlay pixels as the recorded run.

The record (tests/fixtures/golden_analysis) was taken with the code before
the ``models/`` rooms were built; a refactor must leave every result
identical. See ``golden_analysis.py`` for what is kept and how to re-record.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from tests.e2e.golden_analysis import FIXTURE_DIR, RECORD_NAME, ROOT, THUMBNAILS_NAME, run_analyze, summarise

# Probabilities differ between CPUs in the seventh decimal (ONNX Runtime's kernels): relative 1e-5 is far above that
# and far below any change a reader of the SR could see (the SR rounds nothing finer than 1e-4).
NUMBER_RTOL = 1e-5
# Block means of an overlay may move where a heat-map pixel rounds the other way; a changed map, colour scale or
# outline moves whole blocks by many grey levels.
THUMBNAIL_MAX_DIFFERENCE = 0.5


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    return summarise(run_analyze(ROOT / "samples", tmp_path_factory.mktemp("golden")))


def _expected() -> tuple[dict[str, Any], dict[str, Any]]:
    summary = json.loads((FIXTURE_DIR / RECORD_NAME).read_text())
    with np.load(FIXTURE_DIR / THUMBNAILS_NAME) as thumbnails:
        return summary, {uid: thumbnails[uid].astype(np.float32) for uid in thumbnails.files}


def _same_item(expected: dict[str, Any], actual: dict[str, Any]) -> bool:
    if set(expected) != set(actual):
        return False
    for key, value in expected.items():
        if key == "number":
            if not math.isclose(value, actual[key], rel_tol=NUMBER_RTOL, abs_tol=1e-9):
                return False
        elif key == "graphic":
            if len(value) != len(actual[key]) or not np.allclose(value, actual[key], rtol=NUMBER_RTOL, atol=1e-6):
                return False
        elif value != actual[key]:
            return False
    return True


def test_the_same_results_are_written(golden_run: tuple[dict[str, Any], dict[str, Any]]) -> None:
    expected, _ = _expected()
    actual, _ = golden_run
    assert sorted(actual["reports"]) == sorted(expected["reports"]), "result UIDs of the SRs changed"
    assert sorted(actual["overlays"]) == sorted(expected["overlays"]), "result UIDs of the overlays changed"
    # Masks may move by a pixel where a probability rounds the other way on another CPU, as the outlines may.
    assert {uid: (seg["source"], seg["labels"]) for uid, seg in actual["segmentations"].items()} == {
        uid: (seg["source"], seg["labels"]) for uid, seg in expected["segmentations"].items()
    }, "the SEGs changed"
    for uid, seg in expected["segmentations"].items():
        got = actual["segmentations"][uid]["mask_pixels"]
        assert np.allclose(got, seg["mask_pixels"], rtol=0.02, atol=4), f"SEG {uid}: mask sizes {got}"


def test_sr_content_is_unchanged(golden_run: tuple[dict[str, Any], dict[str, Any]]) -> None:
    expected, _ = _expected()
    actual, _ = golden_run
    for uid, report in expected["reports"].items():
        got = actual["reports"][uid]["content"]
        assert [item["path"] for item in got] == [item["path"] for item in report["content"]], f"SR {uid}: tree"
        differing = [
            (want, have) for want, have in zip(report["content"], got, strict=True) if not _same_item(want, have)
        ]
        assert differing == [], f"SR {uid}: first differing items {differing[:3]}"
    numbers = sum("number" in item for report in expected["reports"].values() for item in report["content"])
    assert numbers > 20, "the record must hold the SR's measurements"


def test_overlay_pixels_are_unchanged(golden_run: tuple[dict[str, Any], dict[str, Any]]) -> None:
    expected, expected_thumbnails = _expected()
    actual, actual_thumbnails = golden_run
    for uid, overlay in expected["overlays"].items():
        got = actual["overlays"][uid]
        assert (got["shape"], got["description"]) == (overlay["shape"], overlay["description"]), uid
        if got["sha256"] == overlay["sha256"]:
            continue  # the same pixels, byte for byte (always so on the machine that recorded them)
        difference = np.abs(actual_thumbnails[uid] - expected_thumbnails[uid]).max()
        assert difference <= THUMBNAIL_MAX_DIFFERENCE, (
            f"overlay {overlay['description']} {uid}: block means differ by {difference:.2f}"
        )
    assert len(expected["overlays"]) >= 18
