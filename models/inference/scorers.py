"""What every lesion scorer offers the pipeline.

A family graph scores the lesion's ROI (with the study's clinical context),
a lexicon model reads its outline, a consensus combines the scores of its
members. The pipeline does not ask which one it holds: each takes the same
:class:`LesionView` and the scores made so far, and names the ``members``
whose scores it needs first. :func:`models.inference.pipeline.load_scorer`
picks the loader by the entry's :class:`~models.inference.manifest.ModelKind`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from models.inference.findings import FamilyScore, ModelInfo
from models.inference.manifest import Task
from models.inference.preprocess import Box
from models.inference.registry import ModelEntry


@dataclass(frozen=True)
class ClinicalContext:
    """What the study's DICOM says about the patient and the lesion (None when it does not say)."""

    age_years: float | None = None
    pixel_spacing_mm: float | None = None  # isotropic spacing of the analysed image, if calibrated


NO_CLINICAL_CONTEXT = ClinicalContext()  # frozen, so one shared default is safe


@dataclass(frozen=True)
class LesionView:
    """One lesion as every scorer may look at it.

    Attributes
    ----------
    gray
        The grayscale image (rows, columns).
    box
        The lesion's (x, y, w, h) box.
    mask
        Its outline as a boolean image of ``gray``'s shape, when there is one.
    context
        The study's clinical variables.
    """

    gray: npt.NDArray[np.uint8]
    box: Box
    mask: npt.NDArray[np.bool_] | None = None
    context: ClinicalContext = NO_CLINICAL_CONTEXT

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the image."""
        return (int(self.gray.shape[0]), int(self.gray.shape[1]))


class Scorer(Protocol):
    """A served model that turns one lesion into a :class:`~models.inference.findings.FamilyScore`."""

    @property
    def entry(self) -> ModelEntry:
        """The model's manifest entry."""

    @property
    def family(self) -> str:
        """Its name in reports."""

    @property
    def task(self) -> Task:
        """What its positive class is."""

    @property
    def threshold(self) -> float:
        """Its operating point."""

    @property
    def members(self) -> tuple[str, ...]:
        """Roles whose scores of the same lesion it needs (a consensus); empty for a model that reads pixels."""

    @property
    def info(self) -> ModelInfo:
        """Its identity for reports."""

    def score_lesion(self, lesion: LesionView, scored: Mapping[str, FamilyScore]) -> FamilyScore:
        """Score ``lesion``; ``scored`` holds, by role, at least the scores of :attr:`members`."""
