"""Input conventions shared by training and serving (numpy + OpenCV only).

Training and inference must prepare pixels identically, so both call these
functions; the serving path imports no torch. A paper family's ROI rule is
:func:`roi_box` (how the lesion box grows) and :func:`roi_tensor` (how the cut
pixels become the network's input): training cuts with them through
:class:`models.families.spec.RoiStyle`, serving through
:class:`models.inference.family_scorer.FamilyScorer`, so the two cannot drift.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from models.inference.manifest import Normalisation

Box = tuple[int, int, int, int]


def standardise(gray: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.float32]:
    """Resize a grayscale image to ``size`` x ``size`` and z-score it.

    Per-image standardisation rather than fixed statistics, because gain and
    dynamic range differ widely between ultrasound scanners.

    Returns
    -------
    numpy.ndarray
        float32 array of shape (1, 1, size, size), ready for a network.
    """
    if gray.ndim != 2 or gray.size == 0:
        raise ValueError(f"expected a non-empty 2D grayscale array, got shape {gray.shape}")
    interpolation = cv2.INTER_AREA if min(gray.shape) >= size else cv2.INTER_LINEAR
    resized = cv2.resize(gray, (size, size), interpolation=interpolation).astype(np.float32)
    standardised: npt.NDArray[np.float32] = ((resized - resized.mean()) / (resized.std() + 1e-6)).astype(np.float32)
    return standardised[None, None, :, :]


def expand_box(box: Box, image_shape: tuple[int, int], fraction: float) -> Box:
    """Grow an (x, y, w, h) box by ``fraction`` of its size on every side, clipped to the image.

    The classifier sees some tissue around the lesion, as the papers' ROI
    crops do (DL-UM expands by 30 % of the shortest side).
    """
    x, y, w, h = box
    rows, cols = image_shape
    pad_x = int(round(w * fraction))  # noqa: RUF046 - w may be a numpy integer, whose product rounds to a numpy float
    pad_y = int(round(h * fraction))  # noqa: RUF046
    x0, y0 = max(0, x - pad_x), max(0, y - pad_y)
    x1, y1 = min(cols, x + w + pad_x), min(rows, y + h + pad_y)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def crop(gray: npt.NDArray[np.uint8], box: Box) -> npt.NDArray[np.uint8]:
    """Cut an (x, y, w, h) box out of a 2D array."""
    x, y, w, h = box
    return gray[y : y + h, x : x + w]


def expand_box_by_shortest_side(box: Box, image_shape: tuple[int, int], fraction: float) -> Box:
    """Grow a box by ``fraction`` of its *shortest* side on every side (DL-UM uses 30 %), clipped."""
    x, y, w, h = box
    pad = int(round(min(w, h) * fraction))  # noqa: RUF046 - as in expand_box
    rows, cols = image_shape
    x0, y0 = max(0, x - pad), max(0, y - pad)
    x1, y1 = min(cols, x + w + pad), min(rows, y + h + pad)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def min_max(gray: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.float32]:
    """Resize to ``size`` x ``size`` and scale to [0, 1] by the patch's own min and max (DL-UM).

    Returns
    -------
    numpy.ndarray
        float32 array of shape (1, 1, size, size).
    """
    if gray.ndim != 2 or gray.size == 0:
        raise ValueError(f"expected a non-empty 2D grayscale array, got shape {gray.shape}")
    interpolation = cv2.INTER_AREA if min(gray.shape) >= size else cv2.INTER_LINEAR
    resized = cv2.resize(gray, (size, size), interpolation=interpolation).astype(np.float32)
    low, high = float(resized.min()), float(resized.max())
    scaled: npt.NDArray[np.float32] = ((resized - low) / max(high - low, 1e-6)).astype(np.float32)
    return scaled[None, None, :, :]


def roi_box(box: Box, image_shape: tuple[int, int], padding: float, shortest_side: bool) -> Box:
    """The ROI a family cuts around an (x, y, w, h) lesion box, clipped to the image.

    Parameters
    ----------
    box
        The lesion box.
    image_shape
        (rows, cols) of the image it lies in.
    padding
        Growth on every side, as a fraction of the box's own width and height, or of its shortest side.
    shortest_side
        Grow every side by ``padding`` x the box's shortest side (DL-UM) instead.
    """
    if shortest_side:
        return expand_box_by_shortest_side(box, image_shape, padding)
    return expand_box(box, image_shape, padding)


def roi_tensor(roi: npt.NDArray[np.uint8], normalisation: Normalisation, size: int) -> npt.NDArray[np.float32]:
    """The network input of one cut ROI, resized to ``size`` and scaled as ``normalisation`` says: (1, 1, size, size).

    Raises
    ------
    ValueError
        ``normalisation`` is not a :class:`~models.inference.manifest.Normalisation` value (a plain string naming one
        is accepted), or the ROI is empty.
    """
    if Normalisation(normalisation) is Normalisation.MINMAX:
        return min_max(roi, size)
    return standardise(roi, size)


def roi_input(
    gray: npt.NDArray[np.uint8],
    box: Box,
    *,
    normalisation: Normalisation,
    padding: float,
    shortest_side: bool,
    size: int,
) -> tuple[Box, npt.NDArray[np.float32]]:
    """Cut and scale a lesion's ROI as the family's rule says: (the ROI box, the network input).

    :func:`roi_box` of ``box`` in ``gray``, cut out and passed through :func:`roi_tensor`.
    """
    cut = roi_box(box, (int(gray.shape[0]), int(gray.shape[1])), padding, shortest_side)
    return cut, roi_tensor(crop(gray, cut), normalisation, size)
