"""The Orthanc test harness itself, against a real Orthanc and real dcmtk."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

try:  # repository root on sys.path (pyproject: pythonpath = ["."]): one module for everyone
    from tests.integration.orthanc import OrthancError, free_tcp_ports
except ImportError:  # run without the root on sys.path: import the harness next to this file
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from orthanc import OrthancError, free_tcp_ports  # type: ignore[no-redef]

pytestmark = pytest.mark.integration


def make_us_dataset() -> Dataset:
    """A minimal valid single-frame US image: 32x32 MONOCHROME2, explicit VR LE."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Harness^Test"
    ds.PatientID = "HARNESS-001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "US"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "BREAST"
    ds.Laterality = "L"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 32
    ds.Columns = 32
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    pixels = (np.arange(32 * 32, dtype=np.uint16) % 256).astype(np.uint8).reshape(32, 32)
    ds.PixelData = pixels.tobytes()
    return ds


def write_us_file(path: Path) -> Dataset:
    ds = make_us_dataset()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_upload_and_read_back(orthanc_factory, tmp_path: Path) -> None:
    pacs = orthanc_factory()
    path = tmp_path / "us.dcm"
    ds = write_us_file(path)

    system = pacs.system()
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == pacs.dicom_port
    assert pacs.studies() == []

    iid = pacs.upload(path)
    assert iid

    (study_oid,) = pacs.studies()
    assert pacs.study_id(ds.StudyInstanceUID) == study_oid

    (inst,) = pacs.study_instances(ds.StudyInstanceUID)
    assert inst["ID"] == iid
    assert inst["MainDicomTags"]["SOPInstanceUID"] == ds.SOPInstanceUID
    assert inst["Tags"]["StudyInstanceUID"] == ds.StudyInstanceUID
    assert inst["Tags"]["Modality"] == "US"
    assert inst["Tags"]["Rows"] in (32, "32")

    back = pydicom.dcmread(io.BytesIO(pacs.get_file(iid)))
    assert back.StudyInstanceUID == ds.StudyInstanceUID
    assert back.SOPClassUID == UltrasoundImageStorage
    assert back.pixel_array.shape == (32, 32)
    assert back.pixel_array.tobytes() == ds.PixelData

    assert pacs.study_instances("1.2.3.4.5.6.7.8.9") == []


def test_dcmtk_echo_and_store_into_orthanc(orthanc_factory, echoscu_bin, storescu_bin, tmp_path):
    pacs = orthanc_factory()
    echo = subprocess.run(
        [echoscu_bin, "-aet", "HARNESS", "-aec", pacs.aet, "127.0.0.1", str(pacs.dicom_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stdout + echo.stderr

    # Nothing listens here: a C-ECHO must fail, so the one above proves something.
    (nobody_port,) = free_tcp_ports(1)
    dead = subprocess.run(
        [echoscu_bin, "-to", "3", "-ta", "3", "-aec", pacs.aet, "127.0.0.1", str(nobody_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dead.returncode != 0

    ds = write_us_file(tmp_path / "us.dcm")
    store = subprocess.run(
        [
            storescu_bin,
            "-aet",
            "HARNESS",
            "-aec",
            pacs.aet,
            "127.0.0.1",
            str(pacs.dicom_port),
            str(tmp_path / "us.dcm"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert store.returncode == 0, store.stdout + store.stderr
    instances = pacs.wait_for(
        lambda: pacs.study_instances(ds.StudyInstanceUID, tags=False),
        timeout=10,
        message="C-STORE'd instance in Orthanc",
    )
    assert [i["MainDicomTags"]["SOPInstanceUID"] for i in instances] == [ds.SOPInstanceUID]


def test_orthanc_c_store_to_modality(orthanc_factory, tmp_path):
    """Orthanc pushes to a declared modality: here a second private Orthanc."""
    sink = orthanc_factory(aet="SINK")
    pacs = orthanc_factory({"SINK": ("SINK", "127.0.0.1", sink.dicom_port)})
    assert pacs.echo("SINK")

    ds = make_us_dataset()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    iid = pacs.upload_bytes(buf.getvalue())

    pacs.send_to_modality("SINK", [iid], timeout=30)
    (got,) = sink.wait_for(
        lambda: sink.study_instances(ds.StudyInstanceUID), timeout=10, message="instance at the sink"
    )
    assert got["Tags"]["SOPInstanceUID"] == ds.SOPInstanceUID

    # A modality declared at runtime where nobody listens: echo and store fail.
    (nobody_port,) = free_tcp_ports(1)
    pacs.add_modality("NOBODY", "NOBODY", "127.0.0.1", nobody_port)
    assert not pacs.echo("NOBODY", timeout=3)
    with pytest.raises(OrthancError):
        pacs.send_to_modality("NOBODY", [iid], timeout=3)
