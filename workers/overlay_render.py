"""Burned-in heat-map overlays of AI findings (pure numpy + OpenCV).

The overlay is what a radiologist sees in an ordinary viewer, so everything
that makes the result traceable and safe is burned into the pixels: each
lesion's class-activation map in a colour map, its outline, a legend with
its malignancy probability, the model name and version, and the warning
that this is an AI result not for diagnostic use. Burned-in text is ASCII
only (Hershey fonts have no other glyphs).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import numpy.typing as npt

from models.inference.findings import ImageAnalysis
from workers.advisory import NOT_FOR_DIAGNOSTIC_USE

DISCLAIMER = NOT_FOR_DIAGNOSTIC_USE  # the banner burned in along the bottom edge
CAM_THRESHOLD = 0.2
CAM_ALPHA = 0.4

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_YELLOW = (255, 255, 0)
_RED = (255, 40, 40)  # RGB canvas: malignant prototype frame
_GREEN = (40, 220, 40)  # benign prototype frame
# Outline colours per lesion (RGB), cycled; chosen to stay visible on JET.
_OUTLINE_COLOURS = ((0, 255, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0))


def render_overlay(
    gray: npt.NDArray[np.uint8],
    analysis: ImageAnalysis,
    region_offset_xy: tuple[int, int] = (0, 0),
) -> npt.NDArray[np.uint8]:
    """Render the findings of one image over its whole frame.

    Parameters
    ----------
    gray
        The whole frame, uint8 (rows, columns).
    analysis
        Findings on the analysed array, the scan-region crop of ``gray``;
        each lesion's ``cam`` has that crop's shape.
    region_offset_xy
        (x, y) of the crop's top-left corner in ``gray``.

    Returns
    -------
    numpy.ndarray
        RGB uint8 (rows, columns, 3): the frame in gray, CAMs combined by
        maximum and blended with the JET colour map where above
        :data:`CAM_THRESHOLD`, outlines, a legend with one line per lesion
        ("Lesion N: malignancy p=0.87", or "No lesion detected"), the
        model names and versions, and :data:`DISCLAIMER`.

    Raises
    ------
    ValueError
        If ``gray`` is not 2D uint8.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"render_overlay needs a 2D uint8 frame, got {gray.dtype} {gray.shape}")
    rows, columns = gray.shape
    # The grey value in each of R, G and B (what np.repeat along a new axis gives, at a fraction of its cost).
    canvas = np.asarray(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB), dtype=np.uint8)

    cam = combined_cam(analysis, (rows, columns), region_offset_xy)
    if cam is not None:
        canvas = _blend_cam(canvas, cam)

    scale, thickness = _text_metrics(rows, columns)
    ox, oy = region_offset_xy
    footprint = np.zeros((rows, columns), dtype=bool) if cam is None else cam > CAM_THRESHOLD
    for number, lesion in enumerate(analysis.lesions, start=1):
        colour = _OUTLINE_COLOURS[(number - 1) % len(_OUTLINE_COLOURS)]
        # An array plus a tuple: numpy adds the offset to every point (RUF005 takes it for tuple concatenation).
        points = np.rint(lesion.outline_xy.astype(np.float64) + (ox, oy)).astype(np.int32).reshape(-1, 2)  # noqa: RUF005
        if len(points) == 0:
            continue
        cv2.polylines(
            canvas, [points.reshape(-1, 1, 2)], isClosed=True, color=colour, thickness=thickness, lineType=cv2.LINE_AA
        )
        x0, y0 = np.clip(points.min(axis=0), 0, (columns - 1, rows - 1))
        x1, y1 = np.clip(points.max(axis=0), 0, (columns - 1, rows - 1))
        footprint[y0 : y1 + 1, x0 : x1 + 1] = True
        _put_text(canvas, str(number), (int(x0), max(0, int(y0) - 2)), scale, thickness, colour, anchor="bottom")

    _draw_disclaimer(canvas, scale, thickness)
    _draw_prototypes(canvas, analysis, scale, thickness, footprint)
    _draw_legend(canvas, legend_lines(analysis), scale, thickness, footprint)
    return canvas


def _draw_prototypes(
    canvas: npt.NDArray[np.uint8],
    analysis: ImageAnalysis,
    scale: float,
    thickness: int,
    footprint: npt.NDArray[np.bool_],
) -> None:
    """Lesion 1's strongest prototypes (MUP-Net) as thumbnails down the right edge, each with its contribution.

    The contribution printed under a thumbnail is the prototype's signed
    share of the malignancy log-odds: positive pushes toward malignant.

    A prototype is a patch of a training image; showing it lets the reader
    judge whether "this looks like that" holds. Red frame: malignant
    prototype; green: benign. Marked in ``footprint`` so the legend avoids them.
    """
    if not analysis.lesions or not analysis.lesions[0].prototypes:
        return
    rows, columns = canvas.shape[:2]
    side = max(24, min(96, min(rows, columns) // 6))
    banner = _disclaimer_band_height(rows, columns, scale, thickness)
    x = columns - side - 2
    for rank, prototype in enumerate(analysis.lesions[0].prototypes):
        y = 2 + rank * (side + 4)
        if x < 0 or y + side > rows - banner:
            break
        thumbnail = cv2.resize(prototype.patch, (side, side), interpolation=cv2.INTER_AREA)
        canvas[y : y + side, x : x + side] = thumbnail[:, :, None]
        colour = _RED if prototype.malignant else _GREEN
        cv2.rectangle(canvas, (x, y), (x + side - 1, y + side - 1), colour, thickness=max(1, thickness))
        _put_text(
            canvas,
            f"{prototype.contribution:+.2f}",
            (x, y + side),
            scale * 0.8,
            max(1, thickness - 1),
            _WHITE,
            anchor="bottom",
        )
        footprint[y : y + side, x : x + side] = True


def legend_lines(analysis: ImageAnalysis) -> list[str]:
    """The legend's text lines, ASCII only: one per lesion, then the models."""
    lines = [
        f"Lesion {number}: "
        + (f"finder p={lesion.detection_probability:.2f}, " if lesion.detection_probability is not None else "")
        + f"{analysis.score_label} p={lesion.malignancy_probability:.2f}"
        for number, lesion in enumerate(analysis.lesions, start=1)
    ] or ["No lesion detected"]
    models = {*analysis.segmenter.stages(), (analysis.classifier.name, analysis.classifier.version)}
    lines += [f"Model: {name} {version}" for name, version in sorted(models)]
    return [_ascii(line) for line in lines]


def combined_cam(
    analysis: ImageAnalysis, frame_shape: tuple[int, int], region_offset_xy: tuple[int, int]
) -> npt.NDArray[np.float32] | None:
    """All lesions' CAMs combined by maximum, pasted into a frame-sized map.

    Returns ``None`` when there is no lesion. Parts of a CAM that would fall
    outside the frame are cut off rather than rejected, so a scan region
    touching the edge still renders.
    """
    if not analysis.lesions:
        return None
    rows, columns = frame_shape
    frame_cam = np.zeros((rows, columns), dtype=np.float32)
    ox, oy = region_offset_xy
    for lesion in analysis.lesions:
        cam = np.nan_to_num(np.asarray(lesion.cam, dtype=np.float32), nan=0.0)
        if cam.ndim != 2:
            raise ValueError(f"lesion CAM must be 2D, got shape {cam.shape}")
        y0, x0 = max(0, oy), max(0, ox)
        y1, x1 = min(rows, oy + cam.shape[0]), min(columns, ox + cam.shape[1])
        if y1 <= y0 or x1 <= x0:
            continue
        piece = np.clip(cam[y0 - oy : y1 - oy, x0 - ox : x1 - ox], 0.0, 1.0)
        np.maximum(frame_cam[y0:y1, x0:x1], piece, out=frame_cam[y0:y1, x0:x1])
    return frame_cam


def _blend_cam(canvas: npt.NDArray[np.uint8], cam: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Blend the JET-coloured CAM into ``canvas`` where it exceeds the threshold, in place; returns ``canvas``.

    Only the box around the pixels above the threshold is computed: outside
    it the weight is 0 and the float formula gives the canvas back exactly
    (``c * 1.0 + h * 0.0 == c``), so the pixels are the same as blending the
    whole frame, at the cost of the lesions' area instead of the frame's.
    """
    # Below the threshold the map is noise: leaving those pixels untouched
    # keeps the anatomy readable around the finding.
    hot = cam > CAM_THRESHOLD
    hot_rows = np.flatnonzero(hot.any(axis=1))
    if hot_rows.size == 0:
        return canvas
    hot_columns = np.flatnonzero(hot.any(axis=0))
    box = (slice(int(hot_rows[0]), int(hot_rows[-1]) + 1), slice(int(hot_columns[0]), int(hot_columns[-1]) + 1))
    heat_bgr = cv2.applyColorMap(np.rint(cam[box] * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha = np.where(hot[box], CAM_ALPHA, 0.0).astype(np.float32)[:, :, None]
    blended = canvas[box].astype(np.float32) * (1.0 - alpha) + heat * alpha
    canvas[box] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return canvas


def _text_metrics(rows: int, columns: int) -> tuple[float, int]:
    """Font scale and stroke thickness readable at the frame's size.

    Scale 1.0 of the Hershey simplex font is about 22 px tall; aiming at
    about 1/28 of the shorter side keeps text legible on small frames and
    unobtrusive on large ones.
    """
    side = min(rows, columns)
    scale = float(np.clip(side / 28.0 / 22.0, 0.35, 1.6))
    thickness = max(1, round(scale * 1.5))
    return scale, thickness


def _put_text(
    canvas: npt.NDArray[np.uint8],
    text: str,
    origin: tuple[int, int],
    scale: float,
    thickness: int,
    colour: tuple[int, int, int],
    anchor: str = "top",
) -> None:
    """Text on a black box, readable on bright tissue and on the heat map alike.

    ``origin`` is the box's top-left corner (``anchor="top"``) or its
    bottom-left corner (``anchor="bottom"``); the box is kept inside the
    image.
    """
    rows, columns = canvas.shape[:2]
    (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    # getTextSize under-reports the last glyph's overhang by a pixel or two.
    pad = thickness + 2
    box_w, box_h = text_w + 2 * pad, text_h + baseline + 2 * pad
    x = int(np.clip(origin[0], 0, max(0, columns - box_w)))
    y = origin[1] if anchor == "top" else origin[1] - box_h
    y = int(np.clip(y, 0, max(0, rows - box_h)))
    cv2.rectangle(canvas, (x, y), (x + box_w - 1, y + box_h - 1), _BLACK, thickness=cv2.FILLED)
    cv2.putText(canvas, text, (x + pad, y + pad + text_h), _FONT, scale, colour, thickness, cv2.LINE_AA)


def _draw_legend(
    canvas: npt.NDArray[np.uint8], lines: list[str], scale: float, thickness: int, footprint: npt.NDArray[np.bool_]
) -> None:
    """Legend box in the corner that hides the least of the findings."""
    rows, columns = canvas.shape[:2]
    widest = max(cv2.getTextSize(line, _FONT, scale, thickness)[0][0] for line in lines) + 2 * (thickness + 2)
    if widest > columns:
        # A narrow frame (a 274-px wide ultrasound crop) shrinks the legend's font rather than cutting its lines off.
        scale *= columns / widest
        thickness = max(1, min(thickness, round(scale * 1.5)))
        widest = max(cv2.getTextSize(line, _FONT, scale, thickness)[0][0] for line in lines) + 2 * (thickness + 2)
    (_w, text_h), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness)
    line_h = text_h + baseline + 2 * (thickness + 2)
    width = min(columns, widest)
    height = min(rows, line_h * len(lines))
    banner = _disclaimer_band_height(rows, columns, scale, thickness)
    corners = [
        (0, 0),
        (columns - width, 0),
        (0, max(0, rows - banner - height)),
        (columns - width, max(0, rows - banner - height)),
    ]
    # First corner with the least overlap wins, so an empty image keeps the
    # conventional top-left legend.
    x, y = min(corners, key=lambda c: int(footprint[c[1] : c[1] + height, c[0] : c[0] + width].sum()))
    for index, line in enumerate(lines):
        colour = _OUTLINE_COLOURS[index % len(_OUTLINE_COLOURS)] if line.startswith("Lesion ") else _WHITE
        _put_text(canvas, line, (x, y + index * line_h), scale, thickness, colour)


@functools.lru_cache(maxsize=64)
def _disclaimer_scale(columns: int, scale: float, thickness: int) -> float:
    """The banner's font scale: the common one, shrunk to fit narrow frames."""
    text_w = cv2.getTextSize(DISCLAIMER, _FONT, scale, thickness)[0][0]
    return scale if text_w <= columns - 8 else scale * (columns - 8) / text_w


@functools.lru_cache(maxsize=64)  # asked three times an overlay, six overlays an image: one text measure
def _disclaimer_band_height(rows: int, columns: int, scale: float, thickness: int) -> int:
    (_w, text_h), baseline = cv2.getTextSize(DISCLAIMER, _FONT, _disclaimer_scale(columns, scale, thickness), thickness)
    return min(rows, text_h + baseline + 2 * max(1, thickness) + 2)


def _draw_disclaimer(canvas: npt.NDArray[np.uint8], scale: float, thickness: int) -> None:
    """The not-for-diagnostic-use banner across the bottom edge, on black."""
    rows, columns = canvas.shape[:2]
    text_scale = _disclaimer_scale(columns, scale, thickness)
    band = _disclaimer_band_height(rows, columns, scale, thickness)
    canvas[rows - band : rows] = 0
    (text_w, _text_h), baseline = cv2.getTextSize(DISCLAIMER, _FONT, text_scale, thickness)
    x = max(0, (columns - text_w) // 2)
    cv2.putText(
        canvas,
        DISCLAIMER,
        (x, rows - baseline - max(1, thickness) - 1),
        _FONT,
        text_scale,
        _YELLOW,
        thickness,
        cv2.LINE_AA,
    )


def _ascii(text: str) -> str:
    """Replace what Hershey fonts cannot draw (en dashes, accents) by ASCII."""
    return text.replace("\u2013", "-").replace("\u2014", "-").encode("ascii", "replace").decode("ascii")
