"""Reading and checking the results the service wrote into Orthanc."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset

from tests.dicom_factory import dciodvfy_errors
from tests.integration.orthanc import OrthancServer

__all__ = ["dciodvfy_errors"]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def instances_of_class(pacs: OrthancServer, study_uid: str, sop_class: str) -> list[dict[str, Any]]:
    return [i for i in pacs.study_instances(study_uid, tags=True) if i["Tags"].get("SOPClassUID") == sop_class]


def results_present(pacs: OrthancServer, study_uid: str, overlays: int) -> bool:
    instances = pacs.study_instances(study_uid, tags=True)
    classes = [i["Tags"].get("SOPClassUID") for i in instances]
    return classes.count(SR_CLASS) >= 1 and classes.count(SC_CLASS) >= overlays


def download(pacs: OrthancServer, instance: dict[str, Any]) -> Dataset:
    return pydicom.dcmread(io.BytesIO(pacs.get_file(instance["ID"])))


def dsrdump(path: Path) -> str:
    binary = shutil.which("dsrdump", path=SYSTEM_PATH)
    assert binary, "dsrdump (dcmtk) is required"
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def content_texts(dataset: Dataset) -> list[str]:
    """Every concept-name meaning, text value and code meaning in an SR content tree, depth first."""
    found: list[str] = []
    for item in dataset.get("ContentSequence", []):
        for name in item.get("ConceptNameCodeSequence", []):
            found.append(str(name.CodeMeaning))
        if "TextValue" in item:
            found.append(str(item.TextValue))
        for code in item.get("ConceptCodeSequence", []):
            found.append(str(code.CodeMeaning))
        found.extend(content_texts(item))
    return found


def numeric_values(dataset: Dataset, meaning: str) -> list[float]:
    """Numeric values of every NUM item whose concept name has ``meaning``."""
    values: list[float] = []
    for item in dataset.get("ContentSequence", []):
        names = [str(n.CodeMeaning) for n in item.get("ConceptNameCodeSequence", [])]
        if item.get("ValueType") == "NUM" and meaning in names:
            values.extend(float(m.NumericValue) for m in item.MeasuredValueSequence)
        values.extend(numeric_values(item, meaning))
    return values
