"""Decision rules of the paper families, in plain Python so that serving needs no torch.

Each rule is the published one; thresholds come from the model manifest
(each model's operating point, chosen on validation data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import numpy as np
import numpy.typing as npt

#: Likelihood of malignancy of each BI-RADS final assessment category: the midpoint of the
#: range the ACR BI-RADS Atlas (5th ed., 2013) gives it. Category 4 without a subdivision spans
#: >2 % to <95 %. Categories 0 (incomplete) and 6 (known cancer) state no likelihood.
BIRADS_MALIGNANCY_LIKELIHOOD: Mapping[str, float] = {
    "1": 0.0,
    "2": 0.0,
    "3": 0.01,
    "4a": 0.06,
    "4b": 0.30,
    "4": 0.485,
    "4c": 0.725,
    "5": 0.975,
}
#: From category 4 on the Atlas recommends tissue diagnosis: the reader's own operating point.
BIRADS_BIOPSY_LIKELIHOOD = 0.02


class Recommendation(str, Enum):  # noqa: UP042 - StrEnum would change str() of a member
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


#: Where the 4A co-decision reads its BI-RADS 2/3 vs 4/5 score, first present: the LH consensus (DLR_LH with DL-U's
#: network trained on the same labels, models.training.fit_consensus) where it runs, else DLR_LH alone, as the paper.
#: Its benign/malignant score is always DLR_BM's (BM_ROLE).
LH_ROLES = ("consensus_lh", "dlr_lh")
BM_ROLE = "dlr_bm"
Score = TypeVar("Score")


def lh_score(by_family: Mapping[str, Score]) -> Score | None:
    """The LH score the BI-RADS 4A co-decision reads (:data:`LH_ROLES`) of one lesion's scores by family, or None."""
    return next((by_family[role] for role in LH_ROLES if role in by_family), None)


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


def average_frame_probabilities(probabilities: Sequence[float] | npt.NDArray[np.floating]) -> float:
    """Lesion malignancy probability: the mean of its frames' (ABVS, Liu et al. 2025, "Model development").

    "The predicted benign or malignant probabilities for each image frame
    are summed and subsequently divided by the total number of lesion
    images."

    Raises
    ------
    ValueError
        With no frames (a lesion without an analysed frame has no score), or
        a value that is not a probability.
    """
    values = np.asarray(probabilities, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("a lesion needs at least one frame probability")
    if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
        raise ValueError("frame probabilities must be finite and in [0, 1]")
    return float(values.mean())
