"""Where a frame of an enhanced multi-frame volume lies in its Frame of Reference, for SCOORD3D.

An Enhanced US Volume (PS3.3 A.59) places every frame in the patient
coordinate system of its Frame of Reference (C.7.4.1) through its
functional groups (C.7.6.16): Plane Position (Patient) (C.7.6.16.2.3),
Plane Orientation (Patient) (C.7.6.16.2.4) and Pixel Measures
(C.7.6.16.2.1), each in the frame's item of the Per-frame Functional
Groups Sequence or, for all frames alike, in the Shared one. From those a
finding's outline on the frame becomes 3D coordinates (SCOORD3D, PS3.3
C.18.9) that a viewer can place in the volume whatever plane it shows.

A US Multi-frame image or a 2D image carries no such plane: it gets
``None``, and the report keeps the image coordinates of its frame (SCOORD).

Pure: a header in, a plane or ``None`` out; the arithmetic is highdicom's
:class:`highdicom.spatial.ImageToReferenceTransformer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pydicom
from highdicom.spatial import ImageToReferenceTransformer

_ORTHONORMAL_TOLERANCE = 1e-3  # direction cosines as vendors round them to a few decimals


@dataclass(frozen=True)
class FramePlane:
    """One frame's plane in its Frame of Reference.

    Attributes
    ----------
    frame_of_reference_uid
        Frame of Reference UID (0020,0052) the coordinates belong to.
    image_position
        Image Position (Patient): the centre of the frame's first pixel, in mm.
    image_orientation
        Image Orientation (Patient): the row direction's cosines, then the column direction's.
    pixel_spacing
        Pixel Spacing: (between rows, between columns) in mm.
    """

    frame_of_reference_uid: str
    image_position: tuple[float, float, float]
    image_orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]

    def to_reference(self, points_xy: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """(N, 2) image coordinates (SCOORD's: (0, 0) the top-left corner of the top-left pixel) as (N, 3) in mm."""
        transformer = ImageToReferenceTransformer(
            image_position=self.image_position,
            image_orientation=self.image_orientation,
            pixel_spacing=self.pixel_spacing,
        )
        return np.asarray(transformer(np.asarray(points_xy, dtype=np.float64)), dtype=np.float64)


def frame_plane(ds: pydicom.Dataset, frame_number: int | None) -> FramePlane | None:
    """The plane of frame ``frame_number`` (1-based) of ``ds``, or ``None`` where the header does not place it.

    The per-frame functional group wins over the shared one (PS3.3 C.7.6.16.1). A plane needs a Frame of
    Reference UID, a position, an orthonormal orientation and a positive spacing; a header missing any of them,
    or holding values that are not numbers, is not placed rather than placed wrongly.
    """
    frame_of_reference = str(ds.get("FrameOfReferenceUID") or "").strip()
    if not frame_of_reference:
        return None
    position = _numbers(functional_group_value(ds, frame_number, "PlanePositionSequence", "ImagePositionPatient"), 3)
    cosines = functional_group_value(ds, frame_number, "PlaneOrientationSequence", "ImageOrientationPatient")
    orientation = _numbers(cosines, 6)
    spacing = _numbers(functional_group_value(ds, frame_number, "PixelMeasuresSequence", "PixelSpacing"), 2)
    if position is None or orientation is None or spacing is None or min(spacing) <= 0:
        return None
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    lengths = np.linalg.norm(row), np.linalg.norm(column)
    if (
        max(abs(length - 1) for length in lengths) > _ORTHONORMAL_TOLERANCE
        or abs(row @ column) > _ORTHONORMAL_TOLERANCE
    ):
        return None
    return FramePlane(
        frame_of_reference_uid=frame_of_reference,
        image_position=(position[0], position[1], position[2]),
        image_orientation=(*orientation[:3], *orientation[3:]),  # type: ignore[arg-type]  # six, checked above
        pixel_spacing=(spacing[0], spacing[1]),
    )


def functional_group_value(ds: pydicom.Dataset, frame_number: int | None, group: str, keyword: str) -> object:
    """``keyword`` from functional group ``group`` of the frame's per-frame item, else of the shared item."""
    items: list[pydicom.Dataset] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    index = (frame_number or 1) - 1
    if per_frame is not None and 0 <= index < len(per_frame):
        items.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        items.append(shared[0])
    for item in items:
        sequence = item.get(group)
        if sequence and keyword in sequence[0]:
            return sequence[0][keyword].value
    return None


def _numbers(value: object, count: int) -> list[float] | None:
    """``count`` finite floats from a multi-valued DS element, else ``None``."""
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        numbers = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(np.isfinite(numbers)):
        return None
    return numbers
