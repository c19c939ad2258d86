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
