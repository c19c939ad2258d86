"""What ``breastai analyze`` makes of the sample studies, reduced to a small comparable record.

The record was taken once with the code before ``models/`` was split into its
rooms (issue 35), and ``test_golden_analysis.py`` holds every later run to it:
the SR's content tree item by item (codes, texts, UIDs and every number) and
each overlay's pixels. Overlays are kept as their SHA-256 and a block-mean
thumbnail: the hash says "same pixels" on the machine that recorded them, the
thumbnail bounds the difference where another CPU's float kernels round a
heat-map pixel the other way.

Re-record only when a change of behaviour is intended, and say so in the
commit: ``python -m tests.e2e.golden_analysis --record``.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom import Dataset

from tests.e2e.results import SC_CLASS, SEG_CLASS, SR_CLASS

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_DIR = ROOT / "tests" / "fixtures" / "golden_analysis"
RECORD_NAME = "record.json"
THUMBNAILS_NAME = "thumbnails.npz"
THUMBNAIL_BLOCK = 16  # pixels per thumbnail side: 18 overlays fit in a few tens of kB


def run_analyze(samples: Path, out: Path) -> list[Path]:
    """Run the real command line on ``samples`` and return the files it wrote."""
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "analyze", str(samples), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    # samples/README.md is skipped, which sets exit status 1; anything else failing is a real error.
    assert result.returncode in (0, 1), result.stderr
    assert "study " not in result.stderr, result.stderr
    return sorted(Path(line) for line in result.stdout.splitlines())


def _content_items(items: Any, path: str) -> list[dict[str, Any]]:
    """The SR content tree flattened depth first: one entry per content item (PS3.3 C.17.3)."""
    flat: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        names = [f"{c.CodingSchemeDesignator}:{c.CodeValue}" for c in item.get("ConceptNameCodeSequence", [])]
        here = f"{path}/{index}:{names[0] if names else '-'}"
        entry: dict[str, Any] = {
            "path": here,
            "type": str(item.get("ValueType", "")),
            "relationship": str(item.get("RelationshipType", "")),
        }
        if "TextValue" in item:
            entry["text"] = str(item.TextValue)
        if "UID" in item:
            entry["uid"] = str(item.UID)
        for code in item.get("ConceptCodeSequence", []):
            entry["code"] = f"{code.CodingSchemeDesignator}:{code.CodeValue}:{code.CodeMeaning}"
        for measured in item.get("MeasuredValueSequence", []):
            entry["number"] = float(measured.NumericValue)
            units = measured.MeasurementUnitsCodeSequence[0]
            entry["units"] = f"{units.CodingSchemeDesignator}:{units.CodeValue}"
        if "GraphicData" in item:
            entry["graphic"] = [float(v) for v in item.GraphicData]
            entry["graphic_type"] = str(item.GraphicType)
        for reference in item.get("ReferencedSOPSequence", []):
            entry["reference"] = str(reference.ReferencedSOPInstanceUID)
        flat.append(entry)
        flat.extend(_content_items(item.get("ContentSequence", []), here))
    return flat


def _thumbnail(pixels: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Block means over THUMBNAIL_BLOCK x THUMBNAIL_BLOCK tiles (edges cropped)."""
    rows = pixels.shape[0] // THUMBNAIL_BLOCK * THUMBNAIL_BLOCK
    cols = pixels.shape[1] // THUMBNAIL_BLOCK * THUMBNAIL_BLOCK
    tiles = (
        pixels[:rows, :cols]
        .astype(np.float32)
        .reshape(rows // THUMBNAIL_BLOCK, THUMBNAIL_BLOCK, cols // THUMBNAIL_BLOCK, THUMBNAIL_BLOCK, -1)
    )
    return tiles.mean(axis=(1, 3)).astype(np.float32)


def summarise(written: list[Path]) -> tuple[dict[str, Any], dict[str, npt.NDArray[np.float32]]]:
    """The comparable record of one analyze run: SR content per SR, pixel hash and thumbnail per overlay, and per SEG
    its source, segment labels and mask sizes."""
    reports: dict[str, Any] = {}
    overlays: dict[str, Any] = {}
    segments: dict[str, Any] = {}
    thumbnails: dict[str, npt.NDArray[np.float32]] = {}
    for path in written:
        dataset: Dataset = pydicom.dcmread(path)
        uid = str(dataset.SOPInstanceUID)
        if str(dataset.SOPClassUID) == SR_CLASS:
            reports[uid] = {
                "study": str(dataset.StudyInstanceUID),
                "series": str(dataset.SeriesInstanceUID),
                "content": _content_items(dataset.ContentSequence, ""),
            }
        elif str(dataset.SOPClassUID) == SC_CLASS:
            pixels = dataset.pixel_array
            overlays[uid] = {
                "study": str(dataset.StudyInstanceUID),
                "series": str(dataset.SeriesInstanceUID),
                "description": str(dataset.SeriesDescription),
                "shape": list(pixels.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest(),
            }
            thumbnails[uid] = _thumbnail(pixels)
        elif str(dataset.SOPClassUID) == SEG_CLASS:
            masks = dataset.pixel_array.reshape(-1, *dataset.pixel_array.shape[-2:])
            segments[uid] = {
                "source": str(dataset.SourceImageSequence[0].ReferencedSOPInstanceUID),
                "labels": [str(item.SegmentLabel) for item in dataset.SegmentSequence],
                "mask_pixels": [int(mask.sum()) for mask in masks],
            }
        else:
            raise AssertionError(f"unexpected result class {dataset.SOPClassUID} in {path}")
    return {"reports": reports, "overlays": overlays, "segmentations": segments}, thumbnails


def record(out: Path) -> None:
    """Write the fixture from a fresh run (only when a behaviour change is intended)."""
    import json

    summary, thumbnails = summarise(run_analyze(ROOT / "samples", out))
    FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    (FIXTURE_DIR / RECORD_NAME).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    np.savez_compressed(FIXTURE_DIR / THUMBNAILS_NAME, **thumbnails)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="overwrite tests/fixtures/golden_analysis from this run")
    parser.add_argument("--out", default="/tmp/breastai-golden", help="scratch folder for the analyze output")
    args = parser.parse_args()
    if not args.record:
        parser.error("nothing to do without --record (the comparison is tests/e2e/test_golden_analysis.py)")
    record(Path(args.out))
