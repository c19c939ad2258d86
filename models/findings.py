"""What an analysis pipeline returns: plain data, no DICOM.

Coordinates are pixel indices ``(column, row)`` = ``(x, y)`` of the array
the pipeline was given (the centre of the top-left pixel is (0, 0)). A
DICOM SCOORD writer adds the offset of any crop it made and half a pixel,
since SCOORD's origin is the top-left pixel's top-left corner (PS3.3
C.18.6.1.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ModelInfo:
    """Identity of one model as it must appear in a report (TID 4019)."""

    name: str
    version: str
    sha256: str


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
    """

    outline_xy: npt.NDArray[np.float32]
    bbox_xywh: tuple[int, int, int, int]
    area_px: int
    malignancy_probability: float
    cam: npt.NDArray[np.float32]

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
