"""models.inference.volume: lesions tracked through an ABVS volume's sampled frames."""

from __future__ import annotations

import numpy as np

from models.inference.lesions import Component
from models.inference.volume import VolumeLesion, sagittal_plane, seen_on_sagittal, track_lesions


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


def test_the_three_planes_are_cut_through_the_lesion_centre() -> None:
    from models.inference.volume import lesion_planes

    frames = {}
    for number in range(1, 11):
        frame = np.full((200, 200), number, np.uint8)  # each frame's value is its number
        frame[:, 56] = 100 + number  # the column through the lesion's centre (x 50 + 12 // 2)
        frames[number] = frame
    sizes = {4: 10, 5: 12, 6: 10}  # largest on frame 5: the central frame
    lesion = track_lesions({n: [_component(50, 40, sizes[n])] if n in sizes else [] for n in frames})[0]
    assert lesion.central_frame == 5
    planes = lesion_planes(frames, lesion, margin=0.5, neighbours=1)
    assert [int(t[0, 0]) for t in planes.transverse] == [4, 5, 6]
    assert all(t.shape == (24, 24) for t in planes.transverse), "the 12 px box plus 6 px each side"
    # Sagittal: depth down, sweep across; frames 4-6 with 2 frames of margin each side (3 * 0.5 rounds to 2).
    assert planes.sagittal.shape == (24, 7) and list(planes.sagittal[0]) == [100 + n for n in range(2, 9)]
    assert planes.coronal.shape == (7, 24) and list(planes.coronal[:, 0]) == list(range(2, 9))


def _ball_volume() -> dict[int, np.ndarray]:
    """Ten sampled frames of 60x80 grey, a bright ball of radius 12 px centred on column 40, row 30, frame 5."""
    frames = {}
    rows, columns = np.mgrid[0:60, 0:80]
    for number in range(1, 11):
        # Two sampled frames are 4 rows apart: the ball's radius spans three frames either side of its centre.
        depth = (number - 5) * 4
        inside = (columns - 40) ** 2 + (rows - 30) ** 2 + depth**2 <= 12**2
        frames[number] = np.where(inside, 200, 40).astype(np.uint8)
    return frames


def test_the_sagittal_plane_is_a_column_of_every_frame_stretched_to_square_pixels() -> None:
    frames = _ball_volume()
    plane = sagittal_plane(frames, column=40, step_over_row_spacing=4.0)
    assert plane.pixels.shape == (60, 40) and plane.frames == tuple(range(1, 11)) and plane.columns_per_frame == 4.0
    bright = np.argwhere(plane.pixels > 120)
    # The ball's cross-section: rows 18-42 at its centre, across frames 2-8 (sweep columns 4-35).
    assert bright[:, 0].min() >= 18 and bright[:, 0].max() <= 42
    assert bright[:, 1].min() >= 4 and bright[:, 1].max() <= 35


def test_a_lesion_is_seen_on_the_sagittal_plane_where_a_component_covers_its_extent() -> None:
    plane = sagittal_plane(_ball_volume(), column=40, step_over_row_spacing=4.0)
    lesion = VolumeLesion(frames=(3, 4, 5, 6, 7), central_frame=5, component=_component(28, 18, 24))
    on_plane = Component(np.zeros((60, 40), bool), (8, 19, 24, 22), 400, np.zeros((0, 2), np.float32), 0.9)
    elsewhere = Component(np.zeros((60, 40), bool), (30, 0, 8, 8), 64, np.zeros((0, 2), np.float32), 0.9)
    assert seen_on_sagittal(plane, [elsewhere, on_plane], lesion)
    assert not seen_on_sagittal(plane, [elsewhere], lesion)
    assert not seen_on_sagittal(plane, [], lesion)
