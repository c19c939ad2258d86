"""What an analysis pipeline returns: plain data, no DICOM.

Coordinates are pixel indices ``(column, row)`` = ``(x, y)`` of the array
the pipeline was given (the centre of the top-left pixel is (0, 0)). A
DICOM SCOORD writer adds the offset of any crop it made and half a pixel,
since SCOORD's origin is the top-left pixel's top-left corner (PS3.3
C.18.6.1.2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from models.inference.decisions import CoDecision

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ModelInfo:
    """Identity of one model as it must appear in a report (TID 4019)."""

    name: str
    version: str
    sha256: str

    def stages(self) -> list[tuple[str, str]]:
        """(name, version) of each stage of a multi-stage identity ("a + b", "1 + 2"); one pair for a single model."""
        names, versions = self.name.split(" + "), self.version.split(" + ")
        return list(zip(names, versions, strict=True)) if len(names) == len(versions) else [(self.name, self.version)]


@dataclass(frozen=True)
class PrototypeEvidence:
    """A learned prototype that drove a score (MUP-Net): the training patch it was projected onto.

    Attributes
    ----------
    index
        Prototype number in the model.
    malignant
        The class the prototype belongs to.
    contribution
        The prototype's share of the malignancy log-odds: similarity x
        (malignant - benign last-layer weight); the shares of all prototypes
        sum to the log-odds. (Graphs before 0.6.0 gave similarity x
        malignant weight, a share of the malignant logit alone.)
    patch
        The prototype's source patch, uint8 grayscale (64 x 64).
    source
        ``dataset/image id`` of the training image the patch comes from.
    """

    index: int
    malignant: bool
    contribution: float
    patch: npt.NDArray[np.uint8]
    source: str


@dataclass(frozen=True)
class FamilyScore:
    """One family's advisory result for one lesion.

    Attributes
    ----------
    family
        Manifest role, e.g. ``dlr_bm``.
    task
        ``malignancy`` (benign vs malignant) or ``birads_high`` (BI-RADS 4/5 vs 2/3).
    probability
        Probability of the positive class, in [0, 1].
    positive
        ``probability >= threshold`` (the operating point chosen on validation data).
    cam
        Explanation map over the ROI box, float32 in [0, 1], shape (h, w) of ``roi_box``.
    roi_box
        The (x, y, w, h) box the model looked at.
    notes
        Plain statements about the inputs, e.g. that age was not available.
    details
        Extra named values (CLDLR's network-only probability).
    prototypes
        MUP-Net: the prototypes with the largest contributions, strongest first.
    """

    family: str
    task: str
    model: ModelInfo
    probability: float
    threshold: float
    positive: bool
    cam: npt.NDArray[np.float32]
    roi_box: Box
    notes: tuple[str, ...] = ()
    details: Mapping[str, float | str] = field(default_factory=dict)
    prototypes: tuple[PrototypeEvidence, ...] = ()


@dataclass(frozen=True)
class Lesion:
    """One lesion found by the segmenter and scored by the classifier.

    Attributes
    ----------
    outline_xy
        Closed polygon, shape (N, 2), float, (x, y) pixel coordinates; the
        first point is repeated at the end as SCOORD POLYLINE requires for a
        closed outline.
    bbox_xywh
        Bounding box (x, y, width, height) of the lesion mask in pixels.
    area_px
        Number of mask pixels.
    malignancy_probability
        Classifier output in [0, 1]; advisory, never a diagnosis.
    cam
        Class-activation map for the malignant class over the whole input
        image, float32 in [0, 1], same shape as the input.
    family_scores
        Every configured family's result, the primary one (which gave
        ``malignancy_probability`` and ``cam``) first.
    co_decision
        The BI-RADS 4A recommendation of DLR_BM with the LH score (the LH consensus, or DLR_LH) when both ran.
    detection_probability
        A lesion finder's probability that the region is an abnormality at all
        (mammography); ``None`` where a segmenter outlined it.
    seen_on_sagittal
        For a lesion tracked through a volume's transverse frames: whether the
        segmenter outlined it on the sagittal plane reconstructed through its
        centre too (models.inference.volume); ``None`` for a 2D image.
    """

    outline_xy: npt.NDArray[np.float32]
    bbox_xywh: tuple[int, int, int, int]
    area_px: int
    malignancy_probability: float
    cam: npt.NDArray[np.float32]
    family_scores: tuple[FamilyScore, ...] = ()
    co_decision: CoDecision | None = None
    prototypes: tuple[PrototypeEvidence, ...] = ()  # of the family this lesion is viewed through (overlays)
    detection_probability: float | None = None
    seen_on_sagittal: bool | None = None

    def longest_diameter_mm(self, row_spacing_mm: float, column_spacing_mm: float) -> float:
        """Longest distance in millimetres between two outline points.

        Computed in physical space, so anisotropic pixels pick the right pair.
        """
        points = self.outline_xy.astype(np.float64) * np.array([column_spacing_mm, row_spacing_mm])
        deltas = points[:, None, :] - points[None, :, :]
        return float(np.sqrt((deltas**2).sum(axis=-1)).max()) if len(points) > 1 else 0.0


@dataclass(frozen=True)
class ImageAnalysis:
    """All findings of one 2D grayscale image."""

    lesions: tuple[Lesion, ...]
    segmenter: ModelInfo
    classifier: ModelInfo
    image_shape: tuple[int, int]
    score_label: str = "malignancy"  # what the lesions' probability is of, for legends
    modality: str = "US"  # what kind of image was analysed (US, MG): the report's procedure and finding type
