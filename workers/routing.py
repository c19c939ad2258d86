"""Which pipeline, if any, fits each instance of a study.

This build serves one pipeline: 2D breast ultrasound B-mode. Mammography,
tomosynthesis, ABVS volumes and secondary captures are accepted by the
listener (so nothing the PACS sends is refused) but are not analysed yet;
the route says why, and the report lists them as evidence only.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import UID

US_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.6.1")
US_MULTIFRAME_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.3.1")
BMODE_PIPELINE = "us-bmode"


@dataclass(frozen=True)
class Route:
    """The pipeline chosen for an instance, or the reason none was."""

    pipeline: str | None
    reason: str


def route(header: Dataset) -> Route:
    """Choose the pipeline for one instance from its header (PS3.3 SOP Common and General Series modules)."""
    sop_class = UID(str(header.get("SOPClassUID", "")))
    modality = str(header.get("Modality", ""))
    if sop_class in (US_IMAGE_STORAGE, US_MULTIFRAME_IMAGE_STORAGE):
        return Route(BMODE_PIPELINE, "ultrasound image")
    return Route(None, f"no pipeline yet for modality {modality or 'unknown'} / {sop_class.name or sop_class}")
