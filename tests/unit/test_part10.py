"""service.part10: the hand-built file header equals pynetdicom's, byte for byte, and reads back."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1, generate_uid
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from service.part10 import file_header


@pytest.mark.parametrize("transfer_syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGLosslessSV1])
@pytest.mark.parametrize("sop_instance", ["1.2.3", "1.2.34", generate_uid()])  # odd and even lengths
def test_the_header_is_what_pynetdicom_writes(transfer_syntax: str, sop_instance: str) -> None:
    sop_class = "1.2.840.10008.5.1.4.1.1.6.1"
    expected = (
        b"\x00" * 128
        + b"DICM"
        + encode_file_meta(
            create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=transfer_syntax)
        )
    )
    assert file_header(sop_class, sop_instance, transfer_syntax) == expected


def test_a_file_made_of_it_reads_back() -> None:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", "X"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    pydicom.filewriter.write_dataset(buffer, ds)
    data = file_header(ds.SOPClassUID, ds.SOPInstanceUID, ImplicitVRLittleEndian) + buffer.getvalue()
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4" and back.PatientID == "X"
