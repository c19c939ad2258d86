"""Mammography analysis of one full-field image: the lesion finder's candidates, each scored by DL-M.

The finder (:mod:`models.inference.mammography`) proposes regions with the
probability that each is an abnormality; every configured benign/malignant
family for MG (the manifest's ``default_pipelines.MG``, DL-M today) scores
the region's patch exactly as a US family scores a segmented lesion
(:func:`models.inference.pipeline.score_lesion`). The result is the same
:class:`~models.inference.findings.ImageAnalysis` the B-mode pipeline gives,
so the SR, the overlays and the SEG are written by the same code; each lesion
also carries the finder's probability (``detection_probability``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from models.errors import ModelRegistryError
from models.inference.backends import CPU_RUNTIME, InferenceRuntime
from models.inference.findings import ImageAnalysis, Lesion, ModelInfo
from models.inference.mammography import MammogramFinder, MammogramFinding, load_mammogram_finder
from models.inference.manifest import Task
from models.inference.pipeline import (
    ParallelMap,
    default_families_of,
    load_scorer,
    score_lesion,
    with_consensus_members,
)
from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest_and_pipelines
from models.inference.scorers import NO_CLINICAL_CONTEXT, ClinicalContext, Scorer

MG_MODALITY = "MG"
MG_FINDER_ROLE = "mg_finder"


class MammographyPipeline:
    """Find candidate lesions in a mammogram and score each with the configured MG families.

    Parameters
    ----------
    finder
        The served lesion finder.
    scorers
        Families run on each candidate, the first answering benign/malignant.
    """

    def __init__(self, finder: MammogramFinder, scorers: Sequence[Scorer]) -> None:
        primary = [s for s in scorers if s.task is Task.MALIGNANCY]
        if not primary:
            raise ModelRegistryError(
                "the mammography pipeline needs a benign/malignant family; got " + ", ".join(s.family for s in scorers)
            )
        self._finder = finder
        self._scorers = tuple(primary[:1]) + tuple(s for s in scorers if s is not primary[0])

    @property
    def model_infos(self) -> tuple[ModelInfo, ...]:
        """The finder, then the families in order (what result UIDs are derived from)."""
        return (self._finder.model_info, *(s.info for s in self._scorers))

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(s.family for s in self._scorers)

    def analyse(
        self,
        gray: npt.NDArray[np.uint8],
        pixel_spacing_mm: float | None,
        chest_wall_on_left: bool | None,
        context: ClinicalContext = NO_CLINICAL_CONTEXT,
        lesions_map: ParallelMap = map,
    ) -> ImageAnalysis:
        """Find and score the lesions of one full-field mammogram (tissue bright, any size).

        The finder's regions are scored through ``lesions_map`` (side by side with a pool's, batched by a
        batching backend), results in the finder's order.
        """
        shape = (int(gray.shape[0]), int(gray.shape[1]))
        findings = self._finder.find(gray, pixel_spacing_mm, chest_wall_on_left)
        lesions = tuple(lesions_map(lambda finding: self._score(gray, finding, context), findings))
        return ImageAnalysis(
            lesions=lesions,
            segmenter=self._finder.model_info,
            classifier=self._scorers[0].info,
            image_shape=shape,
            modality=MG_MODALITY,
        )

    def _score(self, gray: npt.NDArray[np.uint8], finding: MammogramFinding, context: ClinicalContext) -> Lesion:
        x0, y0, x1, y1 = finding.box_xyxy
        box = (int(x0), int(y0), max(1, int(x1 - x0)), max(1, int(y1 - y0)))
        mask = np.zeros(gray.shape[:2], dtype=np.uint8)
        cv2.fillPoly(mask, [np.rint(finding.outline_xy).astype(np.int32)], 1)
        area = int(mask.sum())
        lesion = score_lesion(self._scorers, gray, box, finding.outline_xy, max(area, 1), context, mask.astype(bool))
        return dataclasses.replace(lesion, detection_probability=float(finding.probability))


def load_mammography_pipeline(
    model_dir: Path | None = None, runtime: InferenceRuntime = CPU_RUNTIME
) -> MammographyPipeline | None:
    """The finder and the manifest's MG families, or ``None`` where the model folder has no finder or no MG list.

    Raises
    ------
    ModelRegistryError
        A listed family is missing, or a file fails its checksum.
    """
    entries, pipelines = read_manifest_and_pipelines(model_dir)
    if MG_FINDER_ROLE not in entries:
        return None
    chosen = default_families_of(pipelines, entries, MG_MODALITY)
    if not chosen:
        return None
    directory = model_dir or BUNDLED_MODEL_DIR
    missing = [role for role in chosen if role not in entries]
    if missing:
        raise ModelRegistryError(f"MG families {', '.join(missing)} are not in the manifest of {directory}")
    scorers = [
        load_scorer(entries[role], entries, directory, runtime) for role in with_consensus_members(chosen, entries)
    ]
    return MammographyPipeline(load_mammogram_finder(model_dir, runtime), scorers)
