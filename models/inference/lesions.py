"""From a lesion probability map to lesion outlines, boxes and sizes.

Threshold, connected components, bounding boxes and outlines, as the
segmentation stage of every paper family describes (docs/models.md; shared by
all): pure numpy / OpenCV.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from models.inference.preprocess import Box


@dataclass(frozen=True)
class Component:
    """One connected lesion candidate in the full-resolution image."""

    mask: npt.NDArray[np.bool_]
    box: Box
    area_px: int
    outline_xy: npt.NDArray[np.float32]
    mean_probability: float


def resize_probability(probability: npt.NDArray[np.float32], shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Bring a network-sized probability map back to the image's (rows, columns)."""
    rows, cols = shape
    return np.asarray(
        cv2.resize(probability.astype(np.float32), (cols, rows), interpolation=cv2.INTER_LINEAR), dtype=np.float32
    )


def find_components(
    probability: npt.NDArray[np.float32],
    threshold: float = 0.5,
    min_area_fraction: float = 0.002,
    max_components: int = 3,
) -> list[Component]:
    """Split a probability map into lesion components, largest first.

    Parameters
    ----------
    probability
        Lesion probability per pixel, shape (rows, columns), values in [0, 1].
    threshold
        Pixels at or above it belong to a lesion.
    min_area_fraction
        Components smaller than this fraction of the image are speckle, not lesions.
    max_components
        At most this many lesions are reported per image.
    """
    binary = (probability >= threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    min_area = max(1, int(min_area_fraction * probability.size))
    components: list[Component] = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_area:
            continue
        mask = labels == label
        components.append(
            Component(
                mask=mask,
                box=(x, y, w, h),
                area_px=area,
                outline_xy=outline_of(mask),
                mean_probability=float(probability[mask].mean()),
            )
        )
    components.sort(key=lambda c: c.area_px, reverse=True)
    return components[:max_components]


def outline_of(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float32]:
    """Closed outer outline of a binary mask as (x, y) points, first point repeated last.

    Points are at pixel centres; a one-pixel mask gives a degenerate but
    valid closed outline.
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        raise ValueError("mask has no foreground pixels")
    largest = max(contours, key=cv2.contourArea)
    points = largest.reshape(-1, 2).astype(np.float32)
    if len(points) < 3:
        x, y = points[0]
        points = np.array([[x, y], [x + 1, y], [x + 1, y + 1], [x, y + 1]], dtype=np.float32)
    return np.vstack([points, points[:1]])
