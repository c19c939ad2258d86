"""Lesions of an automated breast ultrasound (ABVS) volume, tracked across its transverse frames.

The B-mode segmenter outlines lesion candidates on each sampled transverse
frame; a lesion is a chain of candidates on consecutive sampled frames whose
boxes overlap, so that speckle which the segmenter takes for a lesion on one
frame, and not on its neighbours, is dropped. Each lesion is then analysed
on its largest cross-section (the frame where its outline has the most
pixels), the frame a radiologist would measure it on, with the 2D B-mode
families, which were validated on 2D images.

Pure: candidates in, tracked lesions out; no DICOM, no graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from models.inference.lesions import Component
from models.inference.preprocess import Box

MIN_OVERLAP = 0.3  # intersection over the smaller box: the same lesion seen one sampled frame further
MIN_FRAMES = 2  # sampled frames a lesion must span; one-frame candidates are speckle more often than not


@dataclass(frozen=True)
class VolumeLesion:
    """One lesion tracked through the volume.

    Attributes
    ----------
    frames
        1-based frame numbers of the sampled frames it was outlined on, in order.
    central_frame
        The frame of its largest cross-section.
    component
        Its outline on that frame.
    """

    frames: tuple[int, ...]
    central_frame: int
    component: Component


def _overlap(a: Box, b: Box) -> float:
    """Intersection area over the smaller box's area."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    width = min(ax + aw, bx + bw) - max(ax, bx)
    height = min(ay + ah, by + bh) - max(ay, by)
    if width <= 0 or height <= 0:
        return 0.0
    return float(width * height) / float(max(1, min(aw * ah, bw * bh)))


def track_lesions(
    candidates: Mapping[int, Sequence[Component]], min_overlap: float = MIN_OVERLAP, min_frames: int = MIN_FRAMES
) -> list[VolumeLesion]:
    """Chain per-frame candidates into lesions.

    Parameters
    ----------
    candidates
        Frame number -> the segmenter's components on that frame, for every
        sampled frame (a frame with none maps to an empty sequence: it breaks
        the chains running through it).
    min_overlap, min_frames
        A candidate continues a chain when its box overlaps the chain's last
        box by at least ``min_overlap`` on the next sampled frame; chains
        shorter than ``min_frames`` are dropped.

    Returns
    -------
    list of VolumeLesion
        Largest cross-section first.
    """
    order = sorted(candidates)
    next_frame = {frame: order[i + 1] for i, frame in enumerate(order[:-1])}
    chains: list[list[tuple[int, Component]]] = []
    open_chains: list[list[tuple[int, Component]]] = []
    for frame in order:
        continuing: list[list[tuple[int, Component]]] = []
        for component in sorted(candidates[frame], key=lambda c: c.area_px, reverse=True):
            best = max(
                (c for c in open_chains if c not in continuing and next_frame.get(c[-1][0]) == frame),
                key=lambda c: _overlap(c[-1][1].box, component.box),
                default=None,
            )
            if best is not None and _overlap(best[-1][1].box, component.box) >= min_overlap:
                best.append((frame, component))
                continuing.append(best)
            else:
                chain = [(frame, component)]
                chains.append(chain)
                continuing.append(chain)
        open_chains = continuing
    lesions = []
    for chain in chains:
        if len(chain) < min_frames:
            continue
        central, component = max(chain, key=lambda item: item[1].area_px)
        lesions.append(VolumeLesion(tuple(frame for frame, _ in chain), central, component))
    lesions.sort(key=lambda lesion: lesion.component.area_px, reverse=True)
    return lesions


@dataclass(frozen=True)
class LesionPlanes:
    """The three orthogonal planes through one tracked lesion, cut from the sampled frames (uint8 grey).

    ``transverse`` holds the lesion's box on its central frame and on the sampled frames either side of it where the
    lesion was outlined; ``sagittal`` is the column through the box's centre across the lesion's frames (depth down,
    sweep across), ``coronal`` the row through it (sweep down, width across). Each is cut with ``margin`` of the
    lesion's extent around it, as the 2D families cut their ROI.
    """

    transverse: tuple[npt.NDArray[np.uint8], ...]
    sagittal: npt.NDArray[np.uint8]
    coronal: npt.NDArray[np.uint8]


def lesion_planes(
    frames: Mapping[int, npt.NDArray[np.uint8]], lesion: VolumeLesion, margin: float = 0.5, neighbours: int = 1
) -> LesionPlanes:
    """Cut the three planes of ``lesion`` from ``frames`` (frame number -> the analysed grey crop, one shape).

    Raises
    ------
    ValueError
        The frames differ in shape, or the lesion's central frame is not among them.
    """
    order = sorted(frames)
    shapes = {frames[n].shape for n in order}
    if len(shapes) != 1:
        raise ValueError(f"the volume's frames differ in shape: {sorted(shapes)}")
    if lesion.central_frame not in frames:
        raise ValueError(f"frame {lesion.central_frame} is not among the sampled frames")
    rows, columns = next(iter(shapes))
    x, y, w, h = lesion.component.box
    pad_x, pad_y = round(w * margin), round(h * margin)
    x0, x1 = max(0, x - pad_x), min(columns, x + w + pad_x)
    y0, y1 = max(0, y - pad_y), min(rows, y + h + pad_y)
    centre = order.index(lesion.central_frame)
    on_lesion = [order.index(n) for n in lesion.frames]
    span = max(on_lesion) - min(on_lesion) + 1
    pad_f = max(1, round(span * margin))
    f0, f1 = max(0, min(on_lesion) - pad_f), min(len(order), max(on_lesion) + 1 + pad_f)
    near = [order[i] for i in range(centre - neighbours, centre + neighbours + 1) if 0 <= i < len(order)]
    transverse = tuple(frames[n][y0:y1, x0:x1] for n in near if n in lesion.frames or n == lesion.central_frame)
    sweep = [frames[order[i]] for i in range(f0, f1)]
    middle_x, middle_y = x + w // 2, y + h // 2
    sagittal = np.stack([frame[y0:y1, middle_x] for frame in sweep], axis=1)
    coronal = np.stack([frame[middle_y, x0:x1] for frame in sweep], axis=0)
    return LesionPlanes(transverse, np.ascontiguousarray(sagittal), np.ascontiguousarray(coronal))


@dataclass(frozen=True)
class SagittalPlane:
    """A plane reconstructed across the sweep: one column of every sampled frame, resampled along the sweep.

    Attributes
    ----------
    pixels
        (rows of a frame, sweep positions) uint8 grey: depth down, the sweep across.
    frames
        The sampled frame numbers in sweep order; column ``j`` of ``pixels`` lies at fractional index
        ``j / columns_per_frame`` into them.
    columns_per_frame
        How many plane columns one sampled frame step became (the resampling that gives the plane roughly square
        pixels).
    """

    pixels: npt.NDArray[np.uint8]
    frames: tuple[int, ...]
    columns_per_frame: float


def sagittal_plane(
    frames: Mapping[int, npt.NDArray[np.uint8]], column: int, step_over_row_spacing: float
) -> SagittalPlane:
    """The sagittal plane through ``column`` of the sampled ``frames`` (frame number -> grey crop, one shape).

    ``step_over_row_spacing`` is the distance between two sampled frames over the distance between two rows; the
    plane is stretched by it along the sweep, so that a round lesion looks round to the segmenter, which was
    trained on images with square pixels.
    """
    order = sorted(frames)
    plane = np.stack([frames[n][:, column] for n in order], axis=1)
    scale = max(1.0, float(step_over_row_spacing))
    width = max(1, round(len(order) * scale))
    stretched = cv2.resize(plane, (width, plane.shape[0]), interpolation=cv2.INTER_LINEAR)
    return SagittalPlane(np.ascontiguousarray(stretched, dtype=np.uint8), tuple(order), width / len(order))


def seen_on_sagittal(
    plane: SagittalPlane, components: Sequence[Component], lesion: VolumeLesion, min_overlap: float = MIN_OVERLAP
) -> bool:
    """Whether the segmenter outlined ``lesion`` on ``plane`` too: a component on the plane overlapping the lesion's
    extent there (its rows on the central frame, across the sampled frames it was tracked on) by ``min_overlap``."""
    indices = [plane.frames.index(n) for n in lesion.frames if n in plane.frames]
    if not indices:
        return False
    _x, y, _w, h = lesion.component.box
    x0 = int(np.floor(min(indices) * plane.columns_per_frame))
    x1 = int(np.ceil((max(indices) + 1) * plane.columns_per_frame))
    extent: Box = (x0, y, max(1, x1 - x0), h)
    return any(_overlap(extent, component.box) >= min_overlap for component in components)
