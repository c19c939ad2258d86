"""Late fusion of a breast's ultrasound and mammography scores: DL-U and DL-M, as Xu et al.'s DL-UM reports them.

The paper's fused network (DL-UM) needs a US lesion and a mammogram of the
same lesion to train; no public set pairs them, and pairing images of
different women would teach it nothing true, so it ships without weights.
Until then a study holding both gets the late fusion the paper compares it
with: the mean of the two branches' log-odds, turned back into a
probability. It is named as such wherever it is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from models.inference.findings import ImageAnalysis, ModelInfo

US_BRANCH = "dl_u"
MG_BRANCH = "dl_m"
FUSION_NAME = "DL-UM late fusion (mean log-odds)"
_EPSILON = 1e-6  # keeps log-odds finite at probabilities of exactly 0 or 1


def mean_log_odds(probabilities: Sequence[float]) -> float:
    """The probability whose log-odds is the mean of the inputs' log-odds.

    Raises
    ------
    ValueError
        No input, or an input outside [0, 1].
    """
    if not probabilities:
        raise ValueError("late fusion needs at least one probability")
    logits = []
    for value in probabilities:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"a probability must be in [0, 1], got {value!r}")
        clipped = min(max(value, _EPSILON), 1.0 - _EPSILON)
        logits.append(math.log(clipped / (1.0 - clipped)))
    return 1.0 / (1.0 + math.exp(-sum(logits) / len(logits)))


@dataclass(frozen=True)
class BreastFusion:
    """One breast's highest DL-U and DL-M lesion scores and their late fusion."""

    laterality: str  # "L" or "R"
    us_probability: float
    us_model: ModelInfo
    mg_probability: float
    mg_model: ModelInfo

    @property
    def fused_probability(self) -> float:
        return mean_log_odds([self.us_probability, self.mg_probability])

    @property
    def fusion_model(self) -> ModelInfo:
        """What made the fused value: the rule, over the two models' versions."""
        return ModelInfo(
            FUSION_NAME,
            f"{self.us_model.name} {self.us_model.version} + {self.mg_model.name} {self.mg_model.version}",
            "",
        )


def fuse_breasts(analyses: Sequence[tuple[str, str, ImageAnalysis]]) -> tuple[BreastFusion, ...]:
    """Per breast holding both a DL-U-scored US lesion and a DL-M-scored MG finding, their late fusion.

    Parameters
    ----------
    analyses
        (modality "US" or "MG", laterality "L"/"R" or "" when unknown, analysis) of every analysed image. Images
        of unknown side are left out: a fusion across breasts would mean nothing.

    Returns
    -------
    tuple of BreastFusion
        Left first, then right; each branch's highest lesion score on that side.
    """
    fused = []
    for side in ("L", "R"):
        best: dict[str, tuple[float, ModelInfo]] = {}
        for modality, laterality, analysis in analyses:
            branch = {"US": US_BRANCH, "MG": MG_BRANCH}.get(modality)
            if laterality != side or branch is None:
                continue
            for lesion in analysis.lesions:
                for score in lesion.family_scores:
                    if score.family == branch and (branch not in best or score.probability > best[branch][0]):
                        best[branch] = (score.probability, score.model)
        if US_BRANCH in best and MG_BRANCH in best:
            (us_p, us_model), (mg_p, mg_model) = best[US_BRANCH], best[MG_BRANCH]
            fused.append(BreastFusion(side, us_p, us_model, mg_p, mg_model))
    return tuple(fused)
