"""Clinical variables that DICOM carries, for the families that fuse them with the image.

Age comes from Patient's Age (PS3.5 AS value "nnnD/W/M/Y") or, failing that,
from Patient's Birth Date and Study Date; the lesion-size variable needs a
calibrated pixel spacing (the ultrasound region's physical deltas or Pixel
Spacing, already resolved by :mod:`workers.dicom_reader`). Nothing is
guessed: a value DICOM does not give stays ``None`` and the family reports
that it ran without it.
"""

from __future__ import annotations

import datetime as dt
import re

import pydicom

from models.inference.family_scorer import ClinicalContext
from workers.dicom_reader import SourceFrame

_AGE_STRING = re.compile(r"^(\d{3})([DWMY])$")
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
# Anisotropy beyond this makes a single "mm per pixel" misleading for a lesion diameter.
ISOTROPY_TOLERANCE = 0.05


def patient_age_years(ds: pydicom.Dataset) -> float | None:
    """Age in years from (0010,1010) Patient's Age, else birth date and study date; None if neither is valid."""
    text = str(ds.get("PatientAge") or "").strip().upper()
    match = _AGE_STRING.match(text)
    if match:
        return int(match.group(1)) * _UNIT_YEARS[match.group(2)]
    birth, study = str(ds.get("PatientBirthDate") or ""), str(ds.get("StudyDate") or "")
    try:
        born = dt.datetime.strptime(birth[:8], "%Y%m%d").date()
        seen = dt.datetime.strptime(study[:8], "%Y%m%d").date()
    except ValueError:
        return None
    years = (seen - born).days / 365.25
    return years if 0 <= years < 130 else None


def clinical_context(frame: SourceFrame) -> ClinicalContext:
    """Age and isotropic pixel spacing (mm) of one analysed frame."""
    spacing = None
    rows, columns = frame.row_spacing_mm, frame.column_spacing_mm
    if rows and columns and abs(rows - columns) <= ISOTROPY_TOLERANCE * max(rows, columns):
        spacing = (rows + columns) / 2
    return ClinicalContext(age_years=patient_age_years(frame.dataset), pixel_spacing_mm=spacing)
