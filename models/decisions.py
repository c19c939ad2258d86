"""Decision rules of the paper families, in plain Python so that serving needs no torch.

Each rule is the published one; thresholds come from the model manifest
(each model's operating point, chosen on validation data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


class Recommendation(str, Enum):
    """What the co-decision suggests for a BI-RADS 4A lesion (advisory)."""

    DOWNGRADE = "downgrade to BI-RADS 3"
    KEEP = "keep BI-RADS 4A"
    UPGRADE = "upgrade above BI-RADS 4A"


@dataclass(frozen=True)
class CoDecision:
    """Both models' calls on one lesion and the resulting recommendation."""

    lh_high: bool
    bm_malignant: bool
    recommendation: Recommendation


def co_decision(lh_probability: float, bm_probability: float, lh_threshold: float, bm_threshold: float) -> CoDecision:
    """The paper's 4A re-stratification rule.

    LH low AND BM benign -> downgrade to 3 (biopsy may be avoided);
    LH high AND BM malignant -> upgrade; any disagreement -> keep 4A.
    Thresholds are each model's operating point, chosen on validation data.
    """
    lh_high = lh_probability >= lh_threshold
    bm_malignant = bm_probability >= bm_threshold
    if not lh_high and not bm_malignant:
        recommendation = Recommendation.DOWNGRADE
    elif lh_high and bm_malignant:
        recommendation = Recommendation.UPGRADE
    else:
        recommendation = Recommendation.KEEP
    return CoDecision(lh_high, bm_malignant, recommendation)


def average_probability(frame_probabilities: Sequence[float]) -> float:
    """Mean of per-frame malignancy probabilities (ABVS test-time rule, Liu et al. 2025).

    Raises
    ------
    ValueError
        With no frames: a lesion without any analysed frame has no score.
    """
    if not frame_probabilities:
        raise ValueError("no frame probabilities to average")
    return float(sum(frame_probabilities) / len(frame_probabilities))
