"""Second segmentation stage: re-outline each lesion in a close-up window.

The whole-image segmenter sees a 160 px picture of a scan that is often
500-1,000 px wide, so its outlines are smooth blobs: they find the lesion
but lose the margin, and the margin (circumscribed, angular, spiculated),
the shape and the orientation are what the BI-RADS ultrasound lexicon
reads. The refiner is a second, smaller UNet (MONAI BasicUNet) that looks
only at a window around one coarse component, resized to its input size,
so a lesion of 100-300 px is outlined at about its native resolution.

Pure numpy / OpenCV around one :class:`models.inference.backend.Backend` call: the
window is the component's box grown by the refiner's ``window_expand``
(:data:`WINDOW_EXPAND` for every refiner so far) on every side (training
jitters the same rule), and of the refined components the one
that overlaps the coarse component most is kept. A refined outline that
loses the lesion (no overlap) falls back to the coarse one.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from models.inference.backend import Backend
from models.inference.preprocess import Box, expand_box, standardise

WINDOW_EXPAND = 0.25  # fraction of the box added on every side, as in training; exports record it as window_expand


def refiner_window(box: Box, image_shape: tuple[int, int], expand: float = WINDOW_EXPAND) -> Box:
    """The (x, y, w, h) close-up window the refiner sees for a lesion box, clipped to the image."""
    return expand_box(box, image_shape, expand)


def window_probability(
    refiner: Backend, size: int, gray: npt.NDArray[np.uint8], window: Box
) -> npt.NDArray[np.float32]:
    """The refiner's lesion probability over ``window`` of ``gray``, at the window's own size."""
    x, y, w, h = window
    logits = refiner.run({"image": standardise(gray[y : y + h, x : x + w], size)})["logits"][0, 0].astype(np.float32)
    probability = 1.0 / (1.0 + np.exp(-logits))
    return np.asarray(cv2.resize(probability, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.float32)


def refine_mask(
    refiner: Backend,
    size: int,
    gray: npt.NDArray[np.uint8],
    coarse: npt.NDArray[np.bool_],
    threshold: float = 0.5,
    expand: float = WINDOW_EXPAND,
) -> npt.NDArray[np.bool_]:
    """The refined full-image mask of the lesion whose coarse mask is ``coarse``.

    Parameters
    ----------
    refiner, size
        The refiner graph and its input size.
    gray
        The grayscale image (rows, columns).
    coarse
        One coarse lesion component (boolean, the image's shape, not empty).
    threshold
        Refined pixels at or above it belong to the lesion.
    expand
        Fraction of the coarse box added on every side for the window (the
        refiner's ``window_expand``).

    Returns
    -------
    numpy.ndarray
        Boolean mask, the image's shape: the refined component that overlaps
        ``coarse`` most, or ``coarse`` itself when none does.
    """
    if coarse.shape != gray.shape or not coarse.any():
        raise ValueError("the coarse mask must be a non-empty boolean image of the image's shape")
    x, y, w, h = cv2.boundingRect(coarse.astype(np.uint8))
    wx, wy, ww, wh = refiner_window((x, y, w, h), (int(gray.shape[0]), int(gray.shape[1])), expand)
    probability = window_probability(refiner, size, gray, (wx, wy, ww, wh))
    count, labels = cv2.connectedComponents((probability >= threshold).astype(np.uint8), connectivity=8)
    if count <= 1:
        return coarse
    inside = coarse[wy : wy + wh, wx : wx + ww]
    overlaps = np.bincount(labels[inside], minlength=count)
    overlaps[0] = 0
    best = int(np.argmax(overlaps))
    if overlaps[best] == 0:
        return coarse
    refined = np.zeros_like(coarse)
    refined[wy : wy + wh, wx : wx + ww] = labels == best
    return refined
