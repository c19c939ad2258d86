"""Input conventions shared by training and serving (numpy + OpenCV only).

Training and inference must prepare pixels identically, so both call these
functions; the serving path imports no torch.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

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


def square_box(box: Box, image_shape: tuple[int, int]) -> Box:
    """Widen the short side of an (x, y, w, h) box to make it square, about the same centre, moved inside the image.

    Resizing a w x h crop to a square input stretches it: a lesion wider
    than tall and one taller than wide (the BI-RADS lexicon's orientation,
    "not parallel" being a sign of malignancy) both come out round, and the
    speckle is scaled differently along each axis. A square window keeps
    shape, orientation and speckle isotropic. Near the image's edge the
    window is moved inward rather than clipped, so it stays square; only a
    window larger than the image is cut to it.
    """
    x, y, w, h = box
    rows, cols = image_shape
    side = max(w, h)
    side_x, side_y = min(side, cols), min(side, rows)
    x0 = int(np.clip(round(x + (w - side_x) / 2), 0, cols - side_x))
    y0 = int(np.clip(round(y + (h - side_y) / 2), 0, rows - side_y))
    return x0, y0, max(1, side_x), max(1, side_y)


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
