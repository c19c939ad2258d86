"""models.inference.fusion: DL-U and DL-M of one breast, fused late by mean log-odds."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from models.inference.findings import FamilyScore, ImageAnalysis, ModelInfo
from models.inference.fusion import FUSION_NAME, fuse_breasts, mean_log_odds
from tests.dicom_factory import square_lesion_analysis


def test_mean_log_odds_is_the_probability_of_the_mean_logit() -> None:
    assert mean_log_odds([0.5, 0.5]) == pytest.approx(0.5)
    assert mean_log_odds([0.9, 0.1]) == pytest.approx(0.5)  # opposite logits cancel
    expected = 1 / (1 + math.exp(-(math.log(0.8 / 0.2) + math.log(0.6 / 0.4)) / 2))
    assert mean_log_odds([0.8, 0.6]) == pytest.approx(expected)
    assert 0.0 < mean_log_odds([0.0, 1.0]) < 1.0 and mean_log_odds([1.0, 1.0]) < 1.0
    with pytest.raises(ValueError):
        mean_log_odds([])
    with pytest.raises(ValueError):
        mean_log_odds([1.2])


def _scored(family: str, probabilities: list[float]) -> ImageAnalysis:
    analysis = square_lesion_analysis((100, 100), lesions=len(probabilities))
    lesions = []
    for lesion, probability in zip(analysis.lesions, probabilities, strict=True):
        score = FamilyScore(
            family=family,
            task="malignancy",
            model=ModelInfo(family, "1.0", ""),
            probability=probability,
            threshold=0.5,
            positive=probability >= 0.5,
            cam=np.zeros((4, 4), np.float32),
            roi_box=(0, 0, 4, 4),
        )
        lesions.append(dataclasses.replace(lesion, family_scores=(score,)))
    return dataclasses.replace(analysis, lesions=tuple(lesions))


def test_each_breast_fuses_its_own_highest_us_and_mg_scores() -> None:
    fused = fuse_breasts(
        [
            ("US", "L", _scored("dl_u", [0.2, 0.7])),
            ("MG", "L", _scored("dl_m", [0.4])),
            ("MG", "L", _scored("dl_m", [0.55])),
            ("US", "R", _scored("dl_u", [0.9])),  # right breast: no mammogram, no fusion
            ("MG", "", _scored("dl_m", [0.99])),  # side unknown: never fused with either breast
        ]
    )
    (left,) = fused
    assert (left.laterality, left.us_probability, left.mg_probability) == ("L", 0.7, 0.55)
    assert left.fused_probability == pytest.approx(mean_log_odds([0.7, 0.55]))
    assert left.fusion_model.name == FUSION_NAME and left.fusion_model.version == "dl_u 1.0 + dl_m 1.0"


def test_no_fusion_without_both_branches() -> None:
    assert fuse_breasts([("US", "L", _scored("dl_u", [0.7])), ("MG", "L", _scored("dlr_bm", [0.5]))]) == ()
