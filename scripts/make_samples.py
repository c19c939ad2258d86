"""Build the small sample studies shipped in ``samples/``.

Each sample wraps one public, already de-identified breast ultrasound image
as a US Image Storage instance (PS3.3 A.59) with obviously synthetic
patient data, an ultrasound region (PS3.3 C.8.5.5) calibrated where the
source dataset knows the pixel spacing, and UIDs derived from the source
file name so that re-running the script rewrites identical files.

- ``samples/study1``: BUS-BRA case 4, two images (benign, fibroadenoma),
  patient ``ANON^SAMPLE1`` (BUS-BRA licence allows redistribution).
- ``samples/study2``: BrEaST-Lesions-USG case 7 (malignant, BI-RADS 5,
  pixel spacing known), patient ``ANON^SAMPLE2`` (CC BY 4.0).

Run from the repository root::

    .venv/bin/python scripts/make_samples.py [--datasets /work/shared/datasets] [--out samples]

The datasets are development data, not part of the product; the script is
how the shipped samples were made, not something the service runs.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import pydicom

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.dicom_factory import make_us_dataset, write_dataset  # noqa: E402
from workers.uids import derive_uid  # noqa: E402

MAX_FILE_BYTES = 300_000


@dataclass(frozen=True)
class Sample:
    """One source image and where it goes."""

    dataset: str
    image_id: str
    study: str
    patient_name: str
    patient_id: str


SAMPLES = (
    Sample("busbra", "busbra_0004-l", "study1", "ANON^SAMPLE1", "SAMPLE1"),
    Sample("busbra", "busbra_0004-r", "study1", "ANON^SAMPLE1", "SAMPLE1"),
    Sample("breast_lesions", "breast_case007", "study2", "ANON^SAMPLE2", "SAMPLE2"),
)


def load_labels(datasets: pathlib.Path, dataset: str) -> dict[str, dict[str, str]]:
    """The dataset's labels.csv keyed by id."""
    with (datasets / dataset / "labels.csv").open(newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def load_image(datasets: pathlib.Path, dataset: str, image_id: str) -> npt.NDArray[np.uint8]:
    """The 8-bit grayscale image of ``image_id`` (.png or .jpg)."""
    for suffix in (".png", ".jpg"):
        path = datasets / dataset / "images" / f"{image_id}{suffix}"
        if path.exists():
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise RuntimeError(f"cannot decode {path}")
            return np.asarray(image, dtype=np.uint8)
    raise FileNotFoundError(f"no image for {dataset}/{image_id}")


def build_sample(sample: Sample, image: npt.NDArray[np.uint8], label: dict[str, str], index: int) -> pydicom.Dataset:
    """Wrap one image as a de-identified US instance."""
    study_uid = derive_uid("breastai-sample", sample.study)
    series_uid = derive_uid("breastai-sample", sample.study, "series")
    sop_uid = derive_uid("breastai-sample", sample.dataset, sample.image_id)
    spacing = _spacing_mm(label)
    age = label.get("age", "")
    ds = make_us_dataset(
        image,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        spacing_mm=spacing,
        patient_age=f"{int(age):03d}Y" if age.isdigit() else None,
    )
    if spacing is None:
        # The region still bounds the scan; units "none" (0) say the
        # source has no calibration (PS3.3 C.8.5.5.1.15).
        region = _uncalibrated_region(image.shape)
        ds.SequenceOfUltrasoundRegions = [region]
    ds.PatientName = sample.patient_name
    ds.PatientID = sample.patient_id
    ds.StudyID = sample.study.upper()
    ds.AccessionNumber = sample.patient_id
    ds.StudyDescription = "US BREAST (BreastAI sample)"
    ds.SeriesDescription = f"B-mode from {sample.dataset}"
    ds.InstanceNumber = index
    ds.Manufacturer = "BreastAI sample builder"
    ds.ImageComments = f"Public dataset image {sample.dataset}/{sample.image_id}; see samples/README.md"
    side = label.get("side", "").lower()
    if side in ("left", "right"):
        ds.ImageLaterality = side[0].upper()
    else:
        # Side unknown: General Series Laterality is then Type 2C required
        # (breast is a paired part), present and empty.
        del ds.ImageLaterality
        ds.Laterality = ""
    ds.BurnedInAnnotation = "NO"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Public dataset image; synthetic patient/study data"
    return ds


def _spacing_mm(label: dict[str, str]) -> float | None:
    value = label.get("pixel_spacing_mm", "")
    try:
        spacing = float(value)
    except ValueError:
        return None
    return spacing if spacing > 0 else None


def _uncalibrated_region(shape: tuple[int, ...]) -> pydicom.Dataset:
    from pydicom import Dataset

    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0 = 0
    region.RegionLocationMinY0 = 0
    region.RegionLocationMaxX1 = int(shape[1]) - 1
    region.RegionLocationMaxY1 = int(shape[0]) - 1
    region.PhysicalUnitsXDirection = 0
    region.PhysicalUnitsYDirection = 0
    region.PhysicalDeltaX = 0.0
    region.PhysicalDeltaY = 0.0
    return region


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=pathlib.Path, default=pathlib.Path("/work/shared/datasets"))
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "samples")
    args = parser.parse_args(argv)

    counters: dict[str, int] = {}
    labels_cache: dict[str, dict[str, dict[str, str]]] = {}
    for sample in SAMPLES:
        labels = labels_cache.setdefault(sample.dataset, load_labels(args.datasets, sample.dataset))
        counters[sample.study] = counters.get(sample.study, 0) + 1
        image = load_image(args.datasets, sample.dataset, sample.image_id)
        ds = build_sample(sample, image, labels[sample.image_id], counters[sample.study])
        path = write_dataset(ds, args.out / sample.study / f"{sample.image_id}.dcm")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SystemExit(f"{path} is {size} bytes, over the {MAX_FILE_BYTES} byte budget")
        print(f"{path.relative_to(args.out.parent)}  {image.shape[1]}x{image.shape[0]}  {size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
