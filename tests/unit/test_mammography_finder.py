"""The mammography lesion finder as served: coordinates mapped back exactly, bounded work, real mini-MIAS images.

The mapping tests run the serving code over a stand-in graph that marks bright pixels, so that they check the
geometry (resampling, mirroring, padding, regions) whatever the trained network does; the bundled graph is then run
on real mini-MIAS images where ``shared/datasets`` is present.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from models.datasets import ListedAbnormality, MiasCase, mias_cases, read_gray
from models.errors import ManifestError, ModelRegistryError
from models.evaluation.finder import FoundImage, froc_curve, hit_of
from models.evaluation.stats import cluster_bootstrap_ci
from models.inference.backend import Arrays
from models.inference.findings import ModelInfo
from models.inference.mammography import (
    MAX_WORKING_SIDE,
    MammogramFinder,
    MammogramFinding,
    chest_wall_on_left,
    image_score,
    load_mammogram_finder,
)
from models.inference.manifest import MammogramFinderSpec, ModelKind, parse_spec
from models.inference.registry import BUNDLED_MODEL_DIR, MANIFEST_NAME, read_manifest
from tests.training_data import development_datasets

MIAS = development_datasets() / "mias"
needs_mias = pytest.mark.skipif(
    not (MIAS / "labels.csv").is_file(), reason=f"mini-MIAS is not at {MIAS} (set BREASTAI_DATASETS)"
)


class BrightPixels:
    """A stand-in graph: a high logit where the standardised input is bright (the synthetic disk), low elsewhere.

    Records every input shape, and refuses one whose sides are not multiples of 16 as the real graph would fail.
    """

    def __init__(self, level: float = 2.0) -> None:
        self.level = level
        self.shapes: list[tuple[int, ...]] = []

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("logits",)

    def run(self, inputs: Mapping[str, npt.NDArray[np.float32]]) -> Arrays:
        image = inputs["image"]
        self.shapes.append(image.shape)
        assert image.shape[2] % 16 == 0 and image.shape[3] % 16 == 0, image.shape
        return {"logits": np.where(image > self.level, 20.0, -20.0).astype(np.float32)}


SPEC = MammogramFinderSpec(
    role="mg_finder",
    kind=ModelKind.MG_FINDER,
    mm_per_pixel=0.4,
    threshold=0.5,
    min_area_mm2=4.0,
    max_findings=5,
    side_multiple=16,
)


def _finder(backend: BrightPixels) -> MammogramFinder:
    return MammogramFinder(backend, SPEC, ModelInfo("stand-in", "0", ""))


def synthetic_mammogram(
    shape: tuple[int, int], chest_wall_left: bool, disk_xy: tuple[float, float], disk_radius: float
) -> npt.NDArray[np.uint8]:
    """A grey half-ellipse of tissue against the chest wall, black background, and one bright disk."""
    rows, columns = shape
    yy, xx = np.mgrid[:rows, :columns]
    edge = 0 if chest_wall_left else columns - 1
    breast = ((xx - edge) / (0.7 * columns)) ** 2 + ((yy - rows / 2) / (0.45 * rows)) ** 2 <= 1
    image = np.where(breast, 110 + (yy % 7), 0).astype(np.uint8)  # a little texture so the tissue has a spread
    disk = (xx - disk_xy[0]) ** 2 + (yy - disk_xy[1]) ** 2 <= disk_radius**2
    image[disk] = 250
    return image


@pytest.mark.parametrize(
    ("shape", "spacing", "chest_wall_left", "disk_xy", "radius"),
    [
        ((3000, 2400), 0.1, False, (1700.0, 1100.0), 120.0),  # a detector image, chest wall right: mirrored
        ((3000, 2400), 0.1, True, (700.0, 1900.0), 100.0),
        ((1001, 777), 0.27, False, (500.0, 420.0), 60.0),  # odd sides, x and y scales differ by the rounding
        ((512, 512), None, True, (200.0, 300.0), 25.0),  # mini-MIAS-sized, spacing unknown: read as it is
    ],
)
def test_a_bright_disk_maps_back_to_the_input_pixels(
    shape: tuple[int, int],
    spacing: float | None,
    chest_wall_left: bool,
    disk_xy: tuple[float, float],
    radius: float,
) -> None:
    image = synthetic_mammogram(shape, chest_wall_left, disk_xy, radius)
    backend = BrightPixels()
    findings = _finder(backend).find(image, spacing, None)
    assert len(findings) == 1
    found = findings[0]
    working_pixel = (spacing or 0.4) / 0.4  # one working pixel, in input pixels
    assert math.dist(found.centre_xy, disk_xy) <= 2.0
    assert found.radius_px == pytest.approx(radius, abs=max(2.0, 1.0 / working_pixel))
    x0, y0, x1, y1 = found.box_xyxy
    slack = 1.5 / working_pixel + 1
    assert abs(x0 - (disk_xy[0] - radius)) <= slack and abs(x1 - (disk_xy[0] + radius + 1)) <= slack
    assert abs(y0 - (disk_xy[1] - radius)) <= slack and abs(y1 - (disk_xy[1] + radius + 1)) <= slack
    outline = found.outline_xy
    assert outline.dtype == np.float32 and outline.shape[1] == 2 and np.array_equal(outline[0], outline[-1])
    distances = np.hypot(outline[:, 0] - disk_xy[0], outline[:, 1] - disk_xy[1])
    assert np.all(np.abs(distances - radius) <= 1.5 / working_pixel + 2)
    assert found.probability == pytest.approx(1.0)
    # Told the side (rightly or wrongly), the stand-in finds the same disk: the mapping undoes what was done.
    for side in (True, False):
        (told,) = _finder(BrightPixels()).find(image, spacing, side)
        assert math.dist(told.centre_xy, found.centre_xy) <= 1.0 and told.box_xyxy == found.box_xyxy


def test_a_large_image_is_resampled_before_the_graph_and_its_work_is_bounded() -> None:
    image = synthetic_mammogram((3000, 2400), True, (800.0, 1500.0), 100.0)
    backend = BrightPixels()
    _finder(backend).find(image, 0.1, None)
    assert backend.shapes == [(1, 1, 752, 608)]  # 300 x 240 mm at 0.4 mm, padded to multiples of 16
    # Without a spacing the image is taken to be at 0.4 mm: 120 cm, no mammogram; it is read at a bounded size.
    _finder(backend).find(image, None, None)
    assert max(backend.shapes[-1][2:]) <= MAX_WORKING_SIDE + 16
    (found,) = _finder(BrightPixels()).find(image, None, True)
    assert math.dist(found.centre_xy, (800.0, 1500.0)) <= 3.0  # still mapped back to the input's pixels


def test_a_black_or_empty_image_gives_no_findings_without_running_the_graph() -> None:
    backend = BrightPixels()
    finder = _finder(backend)
    assert finder.find(np.zeros((3000, 2400), np.uint8), 0.1, None) == ()
    assert finder.find(np.zeros((0, 0), np.uint8), None, None) == ()
    assert finder.find(np.full((40, 30), 5, np.uint8), None, True) == ()
    assert backend.shapes == []
    assert image_score(()) == 0.0
    with pytest.raises(ValueError, match="2D uint8"):
        finder.find(np.zeros((10, 10, 3), np.uint8), None, None)


def test_the_regions_are_capped_sorted_and_filtered_by_size() -> None:
    image = synthetic_mammogram((512, 512), True, (100.0, 100.0), 3.0)  # 28 px of disk: over 4 mm² (25 px)
    image[300:302, 200:202] = 250  # 4 px: speckle under 4 mm²
    for k in range(8):
        yy, xx = np.mgrid[:512, :512]
        image[(xx - (40 + 25 * k)) ** 2 + (yy - 400) ** 2 <= 49] = 250
    findings = _finder(BrightPixels()).find(image, None, True)
    assert len(findings) == SPEC.max_findings
    assert all(f.box_xyxy[1] >= 90 for f in findings)  # the speckle at row 300 is not among them
    assert [f.probability for f in findings] == sorted((f.probability for f in findings), reverse=True)


def test_the_chest_wall_side_follows_the_tissue() -> None:
    assert chest_wall_on_left(synthetic_mammogram((400, 300), True, (30.0, 200.0), 10.0)) is True
    assert chest_wall_on_left(synthetic_mammogram((400, 300), False, (270.0, 200.0), 10.0)) is False
    assert chest_wall_on_left(np.zeros((10, 10), np.uint8)) is True  # a tie, deterministically


@needs_mias
def test_the_chest_wall_heuristic_agrees_with_every_mini_mias_image() -> None:
    # mini-MIAS stores the left and right breast of a woman as consecutive numbers: even ones show the chest wall
    # on the left (seen on the images), odd ones on the right.
    wrong = [
        case.image_id
        for case in mias_cases(MIAS.parent)
        if chest_wall_on_left(read_gray(case.image_path)) != (int(case.image_id.removeprefix("mdb")) % 2 == 0)
    ]
    assert wrong == []


@needs_mias
def test_mini_mias_circles_are_read_with_y_from_the_bottom() -> None:
    cases = {case.image_id: case for case in mias_cases(MIAS.parent)}
    (listed,) = cases["mdb001"].findings  # labels.csv: x 267.5, y 212.5, radius 98.5 on a 512-row image
    assert listed.centre_xy == (267.5, 512 - 212.5) and listed.radius_px == 98.5
    normal = next(case for case in cases.values() if not case.abnormal)
    assert normal.findings == () and normal.unlocated == 0
    assert {case.split for case in cases.values()} == {"train", "val", "test"}


def test_the_bundled_finder_entry_is_a_typed_finder_spec() -> None:
    entry = read_manifest()["mg_finder"]
    spec = entry.spec_as(MammogramFinderSpec)
    assert entry.kind is ModelKind.MG_FINDER and spec.mm_per_pixel == 0.4 and 0 < spec.threshold < 1
    assert spec.side_multiple == 16 and spec.max_findings >= 1 and spec.min_area_mm2 > 0
    assert spec.provenance["training"]["datasets"] == ["mias"]
    assert (BUNDLED_MODEL_DIR / entry.file).stat().st_size < 5_000_000  # small: it ships in the bundle
    with pytest.raises(ManifestError, match=r"model mg_finder: manifest field parameters\.mm_per_pixel is missing"):
        parse_spec("mg_finder", {k: v for k, v in entry.parameters.items() if k != "mm_per_pixel"})
    with pytest.raises(ManifestError, match=r"parameters\.mm_per_pixel must be greater than 0"):
        parse_spec("mg_finder", {**entry.parameters, "mm_per_pixel": 0})


def test_a_tampered_finder_file_is_refused(tmp_path: Path) -> None:
    body = json.loads((BUNDLED_MODEL_DIR / MANIFEST_NAME).read_text())
    entry = body["models"]["mg_finder"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"models": {"mg_finder": entry}}))
    data = bytearray((BUNDLED_MODEL_DIR / entry["file"]).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / entry["file"]).write_bytes(bytes(data))
    with pytest.raises(ModelRegistryError, match=r"model mg_finder: model file .* has sha256"):
        load_mammogram_finder(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"models": {}}))
    with pytest.raises(ModelRegistryError, match="lists no mg_finder"):
        load_mammogram_finder(tmp_path)


def test_the_bundled_finder_reads_a_large_and_a_black_image() -> None:
    finder = load_mammogram_finder()
    assert finder.model_info == read_manifest()["mg_finder"].info
    assert finder.find(np.zeros((3000, 2400), np.uint8), 0.1, None) == ()
    image = synthetic_mammogram((3000, 2400), False, (1700.0, 1100.0), 120.0)
    for finding in finder.find(image, 0.1, None):
        x0, y0, x1, y1 = finding.box_xyxy
        assert 0 <= x0 < x1 <= 2400 and 0 <= y0 < y1 <= 3000 and 0.0 <= finding.probability <= 1.0


def _check_findings(findings: tuple[MammogramFinding, ...], shape: tuple[int, int], most: int) -> None:
    assert len(findings) <= most
    assert [f.probability for f in findings] == sorted((f.probability for f in findings), reverse=True)
    for finding in findings:
        x0, y0, x1, y1 = finding.box_xyxy
        assert 0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]
        assert x0 - 0.5 <= finding.centre_xy[0] <= x1 and y0 - 0.5 <= finding.centre_xy[1] <= y1
        assert 0.0 <= finding.probability <= 1.0 and finding.radius_px > 0
        assert np.array_equal(finding.outline_xy[0], finding.outline_xy[-1])


@needs_mias
def test_the_bundled_finder_on_mini_mias_images_and_their_mirror_images() -> None:
    finder = load_mammogram_finder()
    # Training-split images only: a unit test has no business looking at the held-out split.
    cases = [case for case in mias_cases(MIAS.parent) if case.split == "train"][:6]
    for case in cases:
        gray = read_gray(case.image_path)
        findings = finder.find(gray, 0.4, None)
        _check_findings(findings, gray.shape, finder.spec.max_findings)
        # The mirror image is oriented back to the same graph input: its findings are the mirror of these.
        mirrored = finder.find(np.ascontiguousarray(gray[:, ::-1]), 0.4, None)
        assert len(mirrored) == len(findings)
        for a, b in zip(findings, mirrored, strict=True):
            assert b.centre_xy[0] == pytest.approx(gray.shape[1] - 1 - a.centre_xy[0], abs=1e-3)
            assert b.centre_xy[1] == pytest.approx(a.centre_xy[1], abs=1e-3)
            assert b.probability == pytest.approx(a.probability, abs=1e-5)
        # Twice the size at half the spacing resamples to the very same working image: the same regions, in the
        # larger image's pixels (pixel i here is pixels 2i and 2i + 1 there, whose centre is 2i + 0.5).
        doubled = np.repeat(np.repeat(gray, 2, axis=0), 2, axis=1)
        larger = finder.find(doubled, 0.2, None)
        assert len(larger) == len(findings)
        for a, b in zip(findings, larger, strict=True):
            assert b.centre_xy == pytest.approx((2 * a.centre_xy[0] + 0.5, 2 * a.centre_xy[1] + 0.5), abs=1e-3)
            assert b.radius_px == pytest.approx(2 * a.radius_px) and b.probability == pytest.approx(a.probability)


def _finding(x: float, y: float, probability: float) -> MammogramFinding:
    outline = np.array([[x, y], [x, y]], np.float32)
    return MammogramFinding((int(x), int(y), int(x) + 1, int(y) + 1), (x, y), 1.0, outline, probability)


def test_froc_counts_hits_false_positives_and_repeat_hits() -> None:
    cases = {case.image_id: case for case in _two_cases()}
    lesion, normal = cases["abnormal"], cases["normal"]
    images = [
        FoundImage(lesion, (_finding(100, 100, 0.9), _finding(104, 100, 0.8), _finding(300, 300, 0.7))),
        FoundImage(normal, (_finding(50, 50, 0.6),)),
    ]
    assert hit_of(images[0].findings[0], lesion) == 0 and hit_of(images[0].findings[2], lesion) is None
    curve = froc_curve(images)
    assert curve.lesions == 1 and curve.images == 2
    # 0.9 hits; 0.8 hits the same lesion again (neither hit nor false positive); 0.7 and 0.6 are false positives.
    assert curve.false_positives_per_image == (0.0, 0.0, 0.0, 0.5, 1.0)
    assert curve.sensitivity == (0.0, 1.0, 1.0, 1.0, 1.0)
    assert curve.sensitivity_at(0.5) == 1.0 and curve.end == 1.0
    missed = froc_curve([FoundImage(lesion, (_finding(300, 300, 0.9),)), images[1]])
    assert missed.sensitivity_at(2.0) == 0.0
    low, high = cluster_bootstrap_ci(lambda index: float(np.mean(index)), ["a", "a", "b"], resamples=200)
    assert 0.0 <= low <= high <= 2.0


def _two_cases() -> list[MiasCase]:
    listed = ListedAbnormality("CIRC", "B", (100.0, 100.0), 10.0)
    return [
        MiasCase("abnormal", Path("a.png"), "woman-1", "test", True, (listed,), 0),
        MiasCase("normal", Path("b.png"), "woman-2", "test", False, (), 0),
    ]
