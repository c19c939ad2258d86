"""models.inference.volume: lesions tracked through an ABVS volume's sampled frames."""

from __future__ import annotations

import numpy as np

from models.inference.lesions import Component
from models.inference.volume import track_lesions


def _component(x: int, y: int, size: int) -> Component:
    mask = np.zeros((200, 200), bool)
    mask[y : y + size, x : x + size] = True
    outline = np.array([[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]], np.float32)
    return Component(mask, (x, y, size, size), size * size, outline, 0.9)


def test_a_lesion_is_a_chain_of_overlapping_outlines_on_consecutive_sampled_frames() -> None:
    candidates = {
        1: [],
        4: [_component(50, 50, 10)],
        7: [_component(52, 51, 14), _component(150, 150, 8)],  # the lesion grows; a speckle blip elsewhere
        10: [_component(53, 52, 12)],
        13: [],
        16: [_component(54, 52, 12)],  # after a frame without it: a new chain, and too short to count
    }
    (lesion,) = track_lesions(candidates)
    assert lesion.frames == (4, 7, 10)
    assert lesion.central_frame == 7 and lesion.component.box == (52, 51, 14, 14), "its largest section"


def test_two_lesions_side_by_side_stay_apart_and_come_largest_first() -> None:
    candidates = {n: [_component(20, 20, 10), _component(120, 120, 20)] for n in (2, 4, 6)}
    first, second = track_lesions(candidates)
    assert first.component.box[:2] == (120, 120) and second.component.box[:2] == (20, 20)
    assert first.frames == second.frames == (2, 4, 6)


def test_nothing_found_or_single_frame_blips_give_no_lesion() -> None:
    assert track_lesions({1: [], 2: [], 3: []}) == []
    assert track_lesions({1: [_component(10, 10, 5)], 2: [_component(100, 100, 5)]}) == []
    assert track_lesions({}) == []
