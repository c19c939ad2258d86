"""BI-RADS lexicon descriptors on drawn lesions, the logistic model's maths, its scorer, its pinning of the outlines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.inference.lexicon import (
    DESCRIPTOR_NAMES,
    LexiconScorer,
    LogisticModel,
    box_ellipse,
    contribution_map,
    describe,
    load_lexicon_scorer,
)
from models.inference.registry import BUNDLED_MODEL_DIR, ModelEntry, ModelRegistryError, read_manifest, sha256_of

INDEX = {name: k for k, name in enumerate(DESCRIPTOR_NAMES)}


def _scan(mask: np.ndarray, inside: int = 40, background: int = 140) -> np.ndarray:
    image = np.full(mask.shape, background, np.uint8)
    image[mask] = inside
    return image


def _ellipse(width: int, height: int, shape: tuple[int, int] = (200, 240)) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.ellipse(canvas, (shape[1] // 2, 80), (width // 2, height // 2), 0, 0, 360, 1, -1)
    return canvas.astype(bool)


def _star(points: int = 8, outer: int = 40, inner: int = 18, shape: tuple[int, int] = (200, 240)) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, 2 * points, endpoint=False)
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    polygon = np.stack([shape[1] // 2 + radii * np.cos(angles), 80 + radii * np.sin(angles)], 1).astype(np.int32)
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [polygon], 1)
    return canvas.astype(bool)


def test_a_circle_is_round_solid_parallel_and_smooth() -> None:
    circle = _ellipse(60, 60)
    values = describe(_scan(circle), circle)
    assert values.shape == (len(DESCRIPTOR_NAMES),)
    assert values[INDEX["circularity"]] == pytest.approx(1.0, abs=0.12)
    assert values[INDEX["solidity"]] > 0.97 and values[INDEX["convexity"]] > 0.95
    assert values[INDEX["elongation"]] == pytest.approx(1.0, abs=0.05)
    assert abs(values[INDEX["orientation"]]) < 0.05
    assert values[INDEX["lobulations"]] == 0
    assert values[INDEX["echogenicity"]] < -0.5  # hypoechoic: darker than its rim
    assert values[INDEX["relative_size"]] == pytest.approx(math.log(circle.sum() / circle.size))


def test_spiculated_and_taller_than_wide_lesions_read_as_such() -> None:
    circle, star = _ellipse(60, 60), _star()
    round_values, star_values = describe(_scan(circle), circle), describe(_scan(star), star)
    assert star_values[INDEX["solidity"]] < round_values[INDEX["solidity"]] - 0.2
    assert star_values[INDEX["radial_roughness"]] > round_values[INDEX["radial_roughness"]] + 0.1
    assert star_values[INDEX["lobulations"]] >= 6
    tall, wide = _ellipse(30, 70), _ellipse(70, 30)
    assert (
        describe(_scan(tall), tall)[INDEX["orientation"]]
        > 0.5
        > -0.5
        > describe(_scan(wide), wide)[INDEX["orientation"]]
    )
    assert describe(_scan(tall), tall)[INDEX["elongation"]] == pytest.approx(30 / 70, abs=0.06)


def test_posterior_shadowing_and_enhancement() -> None:
    lesion = _ellipse(40, 40)
    x, y, w, h = cv2.boundingRect(lesion.astype(np.uint8))
    shadowed, enhanced = _scan(lesion), _scan(lesion)
    shadowed[y + h :, x : x + w] = 30
    enhanced[y + h :, x : x + w] = 230
    assert describe(shadowed, lesion)[INDEX["posterior"]] < -0.5
    assert describe(enhanced, lesion)[INDEX["posterior"]] > 0.3
    assert describe(shadowed, lesion)[INDEX["posterior_known"]] == 1.0
    at_bottom = np.zeros((100, 100), bool)
    at_bottom[80:100, 40:60] = True  # nothing below it
    assert describe(_scan(at_bottom), at_bottom)[INDEX["posterior_known"]] == 0.0


def test_describe_refuses_an_empty_or_misshapen_mask() -> None:
    with pytest.raises(ValueError):
        describe(np.zeros((10, 10), np.uint8), np.zeros((10, 10), bool))
    with pytest.raises(ValueError):
        describe(np.zeros((10, 10), np.uint8), np.ones((5, 5), bool))
    single = np.zeros((20, 20), bool)
    single[5, 5] = True
    assert np.isfinite(describe(_scan(single), single)).all()  # a one-pixel outline still gives numbers


def _model(coefficients: list[float], intercept: float = -0.5) -> LogisticModel:
    n = len(DESCRIPTOR_NAMES)
    return LogisticModel(
        DESCRIPTOR_NAMES, np.zeros(n), np.full(n, 2.0), np.array(coefficients, dtype=np.float64), intercept
    )


def test_logistic_model_matches_the_hand_computed_probability_and_round_trips() -> None:
    coefficients = [0.0] * len(DESCRIPTOR_NAMES)
    coefficients[INDEX["orientation"]], coefficients[INDEX["solidity"]] = 1.5, -2.0
    model = _model(coefficients)
    x = np.zeros(len(DESCRIPTOR_NAMES))
    x[INDEX["orientation"]], x[INDEX["solidity"]] = 0.8, 0.9
    logit = 1.5 * 0.8 / 2 - 2.0 * 0.9 / 2 - 0.5  # -0.8
    assert model.probability(x) == pytest.approx(1 / (1 + math.exp(0.8)))
    assert model.contributions(x).sum() + model.intercept == pytest.approx(logit)
    again = LogisticModel.from_json(json.loads(json.dumps(model.to_json())))
    assert again.probability(x) == pytest.approx(model.probability(x))
    body = model.to_json()
    with pytest.raises(ValueError, match="descriptors"):
        LogisticModel.from_json({**body, "names": list(reversed(DESCRIPTOR_NAMES))})
    with pytest.raises(ValueError, match="vectors"):
        LogisticModel.from_json({**body, "mean": [0.0]})


def _entry(sha256: str = "0" * 64, **parameters: object) -> ModelEntry:
    complete = {"kind": "lexicon", "task": "malignancy", "operating_point": 0.5, **parameters}
    return ModelEntry("lexicon", "L", "1", "lexicon.json", sha256, complete)


def test_scorer_explains_its_score_and_says_when_it_had_no_outline() -> None:
    coefficients = [0.0] * len(DESCRIPTOR_NAMES)
    coefficients[INDEX["posterior"]], coefficients[INDEX["orientation"]] = -3.0, 1.0
    scorer = LexiconScorer(_entry(), _model(coefficients))
    lesion = _ellipse(30, 60)
    image = _scan(lesion)
    x, y, w, h = cv2.boundingRect(lesion.astype(np.uint8))
    image[y + h :, x : x + w] = 20  # shadowing: a malignant sign under this model
    score = scorer.score(image, (x, y, w, h), lesion)
    assert score.positive and score.probability > 0.5 and not score.notes
    assert score.cam.shape == (score.roi_box[3], score.roi_box[2]) and score.cam.max() == pytest.approx(1.0)
    assert "posterior" in str(score.details["strongest"]).split(",")[0]
    assert score.details["descriptor_posterior"] < 0
    # the map is brightest below the lesion, where the strongest descriptor was read
    rx, ry, _, _ = score.roi_box
    below = score.cam[y + h - ry + 2 : y + h - ry + 6, x - rx + 2 : x + w - rx - 2]
    centre = score.cam[y + h // 2 - ry - 2 : y + h // 2 - ry + 2, x + w // 2 - rx - 2 : x + w // 2 - rx + 2]
    assert below.mean() > 0.8 > 0.2 > centre.mean()
    boxed = scorer.score(image, (x, y, w, h), None)
    assert boxed.notes and "ellipse" in boxed.notes[0]
    assert box_ellipse((x, y, w, h), image.shape).sum() > 0.7 * w * h


def test_contribution_map_is_empty_when_nothing_contributes() -> None:
    lesion = _ellipse(30, 30)
    cam = contribution_map(lesion, np.zeros(len(DESCRIPTOR_NAMES)), DESCRIPTOR_NAMES, (50, 20, 100, 100))
    assert cam.shape == (100, 100) and float(cam.max()) == 0.0


def test_loading_refuses_a_model_fitted_on_another_segmenter(tmp_path: Path) -> None:
    model = _model([0.1] * len(DESCRIPTOR_NAMES))
    (tmp_path / "lexicon.json").write_text(json.dumps(model.to_json()))
    digest = sha256_of(tmp_path / "lexicon.json")
    segmenter = read_manifest(BUNDLED_MODEL_DIR)["us_segmenter"]
    entries = {"us_segmenter": segmenter}
    good = _entry(sha256=digest, segmentation={"us_segmenter": segmenter.sha256})
    assert load_lexicon_scorer(good, entries, tmp_path).model.probability(
        np.zeros(len(DESCRIPTOR_NAMES))
    ) == pytest.approx(model.probability(np.zeros(len(DESCRIPTOR_NAMES))))
    stale = _entry(sha256=digest, segmentation={"us_segmenter": "1" * 64})
    with pytest.raises(ModelRegistryError, match="refit"):
        load_lexicon_scorer(stale, entries, tmp_path)
    missing_refiner = _entry(sha256=digest, segmentation={"us_refiner": "2" * 64})
    with pytest.raises(ModelRegistryError, match="us_refiner"):
        load_lexicon_scorer(missing_refiner, entries, tmp_path)
    (tmp_path / "lexicon.json").write_text(json.dumps({**model.to_json(), "names": ["other"] * len(DESCRIPTOR_NAMES)}))
    changed = _entry(sha256=sha256_of(tmp_path / "lexicon.json"))
    with pytest.raises(ModelRegistryError, match="descriptors"):
        load_lexicon_scorer(changed, entries, tmp_path)
