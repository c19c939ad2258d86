"""workers.overlay_render: what is burned into the overlay pixels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models.inference.findings import ImageAnalysis, ModelInfo
from tests.dicom_factory import square_lesion_analysis, synthetic_breast_image
from workers.overlay_render import DISCLAIMER, combined_cam, legend_lines, render_overlay


def _is_colour(pixel: np.ndarray) -> bool:
    return int(pixel.max()) - int(pixel.min()) > 20


def test_shape_and_untouched_background() -> None:
    gray = synthetic_breast_image(300, 400)
    analysis = square_lesion_analysis((200, 200), size=30)
    out = render_overlay(gray, analysis, region_offset_xy=(150, 60))
    assert out.shape == (300, 400, 3) and out.dtype == np.uint8
    # Far from the lesion, the legend and the banner the frame is just gray.
    np.testing.assert_array_equal(out[200, 150], [gray[200, 150]] * 3)


def test_cam_is_pasted_at_the_region_offset() -> None:
    gray = np.full((300, 400), 100, np.uint8)
    analysis = square_lesion_analysis((200, 200), size=40)
    x0, y0, w, h = analysis.lesions[0].bbox_xywh
    out = render_overlay(gray, analysis, region_offset_xy=(150, 60))
    assert _is_colour(out[60 + y0 + h // 2, 150 + x0 + w // 2])
    # Heat-map colour (strong blue/red imbalance) lies only inside the pasted square.
    heat = np.abs(out[..., 0].astype(int) - out[..., 2].astype(int)) > 20
    heat[:60, :] = False  # legend corner, whatever colour its text has
    heat[-30:, :] = False  # disclaimer banner
    ys, xs = np.nonzero(heat)
    assert xs.min() >= 150 + x0 - 3 and xs.max() <= 150 + x0 + w + 3
    assert ys.min() >= 60 + y0 - 3 and ys.max() <= 60 + y0 + h + 3


def test_cam_below_threshold_is_not_blended() -> None:
    gray = np.full((200, 200), 90, np.uint8)
    analysis = square_lesion_analysis((200, 200), size=40)
    lesion = analysis.lesions[0]
    weak = type(lesion)(lesion.outline_xy, lesion.bbox_xywh, lesion.area_px, 0.5, lesion.cam * 0.15)
    out = render_overlay(gray, ImageAnalysis((weak,), analysis.segmenter, analysis.classifier, analysis.image_shape))
    x0, y0, w, h = lesion.bbox_xywh
    np.testing.assert_array_equal(out[y0 + h // 2, x0 + w // 2], [90, 90, 90])


def test_outline_is_drawn_with_offset() -> None:
    gray = np.full((300, 400), 100, np.uint8)
    analysis = square_lesion_analysis((200, 200), size=40)
    x0, y0, _w, h = analysis.lesions[0].bbox_xywh
    out = render_overlay(gray, analysis, region_offset_xy=(150, 60))
    # Left edge of the square, half way down: outline colour (green for lesion 1).
    edge = out[60 + y0 + h // 2, 150 + x0]
    assert edge[1] > 150 and edge[0] < 120


def test_disclaimer_banner_is_burned_in() -> None:
    gray = np.full((480, 640), 128, np.uint8)
    out = render_overlay(gray, square_lesion_analysis((480, 640)))
    banner = out[-25:]
    yellow = (banner[..., 0] > 200) & (banner[..., 1] > 200) & (banner[..., 2] < 80)
    assert yellow.sum() > 200  # a real line of text, not a few stray pixels
    assert DISCLAIMER == "AI result - not for diagnostic use"


def test_legend_text() -> None:
    analysis = square_lesion_analysis((200, 200), lesions=2, size=20, probability=0.8712)
    lines = legend_lines(analysis)
    assert lines[:2] == ["Lesion 1: malignancy p=0.87", "Lesion 2: malignancy p=0.87"]
    assert "Model: breastai-cls-resnet 3.4.1" in lines and "Model: breastai-seg-unet 1.2.0" in lines
    empty = ImageAnalysis((), analysis.segmenter, analysis.classifier, (200, 200))
    assert legend_lines(empty)[0] == "No lesion detected"
    assert all(line.isascii() for line in lines)
    two_stage = dataclasses.replace(
        analysis, segmenter=ModelInfo("seg-unet + refiner-unet", "0.1.0 + 0.4.0", "a" * 64 + " + " + "b" * 64)
    )
    assert {"Model: seg-unet 0.1.0", "Model: refiner-unet 0.4.0"} <= set(legend_lines(two_stage))  # one line per stage


def test_no_lesion_renders_gray_with_legend() -> None:
    gray = synthetic_breast_image(240, 320)
    base = square_lesion_analysis((240, 320))
    empty = ImageAnalysis((), base.segmenter, base.classifier, (240, 320))
    out = render_overlay(gray, empty)
    assert combined_cam(empty, gray.shape, (0, 0)) is None
    # Legend (top-left) darkened the corner; the middle is untouched.
    assert out[5:20, 5:60].mean() < gray[5:20, 5:60].mean()
    np.testing.assert_array_equal(out[120, 160], [gray[120, 160]] * 3)


def test_cams_combine_by_max_and_are_clipped_to_the_frame() -> None:
    analysis = square_lesion_analysis((100, 100), lesions=2, size=20)
    cam = combined_cam(analysis, (120, 130), (60, 50))
    assert cam is not None and cam.shape == (120, 130)
    assert cam.max() == 1.0
    # The crop hangs over the right/bottom edge: nothing raised, the rest cut off.
    assert cam[:50, :].max() == 0.0 and cam[:, :60].max() == 0.0


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        render_overlay(np.zeros((10, 10, 3), np.uint8), square_lesion_analysis((10, 10), size=4))


def test_prototype_thumbnails_are_drawn_with_their_class_colour() -> None:
    import dataclasses

    from models.inference.findings import PrototypeEvidence

    analysis = square_lesion_analysis((240, 320), size=40)
    gray = np.full((240, 320), 90, np.uint8)
    patch = np.full((64, 64), 250, np.uint8)
    evidence = (
        PrototypeEvidence(3, True, 0.8, patch, "busbra/x"),
        PrototypeEvidence(7, False, -0.3, patch, "busbra/y"),
    )
    with_prototypes = dataclasses.replace(
        analysis, lesions=(dataclasses.replace(analysis.lesions[0], prototypes=evidence),)
    )
    plain = render_overlay(gray, analysis)
    shown = render_overlay(gray, with_prototypes)
    side = min(96, 240 // 6)
    first = shown[2 : 2 + side, 320 - side - 2 : 318]
    assert (first[side // 2, side // 2] == 250).all(), "the patch is pasted"
    assert tuple(first[0, side // 2]) == (255, 40, 40), "malignant prototype framed red"
    assert tuple(shown[2 + side + 4, 320 - side // 2 - 2]) == (40, 220, 40), "benign prototype framed green"
    assert not np.array_equal(plain[:, 200:], shown[:, 200:])


def test_a_narrow_frame_shrinks_the_legend_instead_of_cutting_its_lines() -> None:
    # Issue 36: the US legend was clipped on a 274-px wide image. Every legend line must end inside the frame.
    gray = np.full((400, 274), 90, np.uint8)
    analysis = square_lesion_analysis((400, 274), size=20, probability=0.42)
    mammography_like = dataclasses.replace(
        analysis, lesions=tuple(dataclasses.replace(lesion, detection_probability=0.61) for lesion in analysis.lesions)
    )
    assert legend_lines(mammography_like)[0] == "Lesion 1: finder p=0.61, malignancy p=0.42"
    out = render_overlay(gray, mammography_like)
    # The legend's black box is drawn in a corner; text pixels (bright or coloured) never reach the last column.
    top = out[:60]
    text = (top.max(axis=2) > 150) & (np.abs(top.astype(int) - 90).max(axis=2) > 40)
    assert text[:, :-1].any(), "the legend is drawn"
    assert not text[:, -2:].any(), "a legend line runs off the right edge"


def test_the_heat_map_is_blended_as_over_the_whole_frame() -> None:
    """Only the box around the pixels above the threshold is computed; every pixel is what the whole frame gets."""
    import cv2

    from workers.overlay_render import CAM_ALPHA, CAM_THRESHOLD, _blend_cam

    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (300, 400), dtype=np.uint8)
    cam = np.zeros((300, 400), np.float32)
    cam[40:90, 250:330] = rng.random((50, 80), dtype=np.float32)  # values on both sides of the threshold
    cam[200:203, 10:12] = 0.9  # a second, far-away hot spot: the box spans both
    canvas = np.repeat(gray[:, :, None], 3, axis=2)
    heat = cv2.cvtColor(cv2.applyColorMap(np.rint(cam * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = np.where(cam > CAM_THRESHOLD, CAM_ALPHA, 0.0).astype(np.float32)[:, :, None]
    whole = np.clip(np.rint(canvas.astype(np.float32) * (1.0 - alpha) + heat.astype(np.float32) * alpha), 0, 255)
    np.testing.assert_array_equal(_blend_cam(canvas.copy(), cam), whole.astype(np.uint8))
    # Nothing above the threshold: the frame comes back untouched.
    np.testing.assert_array_equal(_blend_cam(canvas.copy(), np.full((300, 400), CAM_THRESHOLD, np.float32)), canvas)
