"""Orthanc with `breastai serve` routed to it, and reading and checking the results the service wrote there."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset

from tests.dicom_factory import dciodvfy_errors
from tests.integration.orthanc import OrthancServer

__all__ = ["dciodvfy_errors"]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RESULT_TIMEOUT_S = 120.0


def start_pacs_and_service(
    orthanc_factory: Callable[..., OrthancServer],
    service_factory: Callable[..., Any],
    free_ports: Callable[[int], list[int]],
    tmp_path: Path,
    quiet_period: float = 1.0,
) -> tuple[OrthancServer, Any, int, int]:
    """An Orthanc that knows BREASTAI, and ``breastai serve`` answering C-ECHO: (pacs, service, port, metrics port)."""
    port, metrics_port = free_ports(2)
    pacs = orthanc_factory({"BREASTAI": ("BREASTAI", "127.0.0.1", port)})
    service = service_factory("serve", serve_args(port, metrics_port, pacs, tmp_path, quiet_period))
    service.wait_for_echo(port)
    return pacs, service, port, metrics_port


def serve_args(port: int, metrics_port: int, pacs: OrthancServer, tmp_path: Path, quiet_period: float) -> list[str]:
    """``breastai serve`` arguments: listen on ``port``, send results to ``pacs``, spool under ``tmp_path``."""
    return [
        "--port",
        str(port),
        "--ae-title",
        "BREASTAI",
        "--destination",
        f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
        "--quiet-period",
        str(quiet_period),
        "--spool-dir",
        str(tmp_path / "spool"),
        "--metrics-port",
        str(metrics_port),
    ]


def instances_of_class(pacs: OrthancServer, study_uid: str, sop_class: str) -> list[dict[str, Any]]:
    return [i for i in pacs.study_instances(study_uid, tags=True) if i["Tags"].get("SOPClassUID") == sop_class]


def results_present(pacs: OrthancServer, study_uid: str, overlays: int) -> bool:
    instances = pacs.study_instances(study_uid, tags=True)
    classes = [i["Tags"].get("SOPClassUID") for i in instances]
    return classes.count(SR_CLASS) >= 1 and classes.count(SC_CLASS) >= overlays


def wait_for_results(pacs: OrthancServer, study_uid: str, overlays: int, message: str) -> None:
    """Wait (up to :data:`RESULT_TIMEOUT_S`) until the study holds an SR and ``overlays`` overlays."""
    pacs.wait_for(
        lambda: results_present(pacs, study_uid, overlays=overlays),
        timeout=RESULT_TIMEOUT_S,
        interval=0.5,
        message=message,
    )


def evidence_uids(ds: Dataset) -> set[str]:
    """The SOP Instance UIDs an SR lists in its Current Requested Procedure Evidence Sequence."""
    return {
        str(instance.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }


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
