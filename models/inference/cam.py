"""Class-activation maps from a global-pooling + linear head.

For a head ``logits = W · GAP(F) + b`` the class-activation map of class
``k`` is ``sum_c W[k, c] F[c]`` (Zhou et al., CVPR 2016); for such a head it
equals Grad-CAM, which is why every classifier here ends that way and its
exported graph returns the map as an output, identical on every backend.
Maps stay raw until they are upsampled, then they are rectified and
normalised (MONAI's CAM convention).
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt


def normalise_cam(raw: npt.NDArray[np.float32], shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Upsample a raw (h, w) activation map to (rows, columns), rectify, scale to [0, 1].

    A map with no positive evidence becomes all zeros rather than noise
    stretched to full scale.
    """
    rows, cols = shape
    upsampled = cv2.resize(raw.astype(np.float32), (cols, rows), interpolation=cv2.INTER_CUBIC)
    upsampled = np.maximum(upsampled, 0.0)
    peak = float(upsampled.max())
    if peak <= 1e-8:
        return np.zeros((rows, cols), dtype=np.float32)
    return (upsampled / peak).astype(np.float32)


def paste(
    map_: npt.NDArray[np.float32], box: tuple[int, int, int, int], shape: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """Place a (h, w) map at an (x, y, w, h) box in an otherwise zero (rows, columns) canvas."""
    canvas = np.zeros(shape, dtype=np.float32)
    x, y, w, h = box
    canvas[y : y + h, x : x + w] = map_[:h, :w]
    return canvas
