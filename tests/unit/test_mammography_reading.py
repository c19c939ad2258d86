"""Reading full-field mammograms as vendors write them: 12-16 bits, MONOCHROME1, sigmoid VOI, imager spacing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from workers.dicom_reader import read_frames, sigmoid_window_to_uint8

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


def _mammogram(pixels: np.ndarray, **attributes: object) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "MG"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _read(ds: pydicom.Dataset, tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "mg.dcm"
    ds.save_as(path, enforce_file_format=True)
    (frame,) = read_frames(path)
    return frame


def test_monochrome1_is_inverted_so_dense_tissue_is_bright(tmp_path: Path) -> None:
    pixels = np.full((64, 48), 4000, dtype=np.uint16)
    pixels[20:30, 10:20] = 500  # low values are bright in MONOCHROME1
    frame = _read(_mammogram(pixels, PhotometricInterpretation="MONOCHROME1"), tmp_path)
    assert frame.pixels[25, 15] > 200 and frame.pixels[5, 5] < 50


def test_a_sigmoid_voi_function_is_applied_as_ps3_3_defines_it(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 4095, 64), (16, 1))
    frame = _read(_mammogram(ramp, WindowCenter=2048, WindowWidth=1024, VOILUTFunction="SIGMOID"), tmp_path)
    values = ramp.astype(np.uint16).astype(np.float64)  # what was stored
    expected = 255.0 / (1.0 + np.exp(-4.0 * (values - 2048.0) / 1024.0))
    assert np.abs(frame.pixels.astype(float) - expected).max() <= 1.0
    assert frame.pixels[0, 0] == 0 and frame.pixels[0, -1] == 255 and 120 <= frame.pixels[0, 32] <= 135
    assert sigmoid_window_to_uint8(np.array([2048.0]), 2048.0, 1.0)[0] == 128


def test_sizes_come_from_imager_pixel_spacing_over_the_magnification(tmp_path: Path) -> None:
    pixels = np.zeros((32, 32), dtype=np.uint16)
    frame = _read(
        _mammogram(pixels, ImagerPixelSpacing=[0.1, 0.1], EstimatedRadiographicMagnificationFactor=1.25), tmp_path
    )
    assert frame.row_spacing_mm == frame.column_spacing_mm == 0.08
    plain = _read(_mammogram(pixels, ImagerPixelSpacing=[0.07, 0.07]), tmp_path)
    assert plain.row_spacing_mm == plain.column_spacing_mm == 0.07
    # Pixel Spacing, where a vendor gives it, is already in the patient.
    both = _read(_mammogram(pixels, PixelSpacing=[0.065, 0.065], ImagerPixelSpacing=[0.1, 0.1]), tmp_path)
    assert both.row_spacing_mm == 0.065


def test_the_chest_wall_side_comes_from_patient_orientation() -> None:
    from workers.dicom_reader import chest_wall_on_left

    def header(orientation: object) -> pydicom.Dataset:
        ds = pydicom.Dataset()
        if orientation is not None:
            ds.PatientOrientation = orientation
        return ds

    assert chest_wall_on_left(header(["A", "R"])) is True  # rows run towards the nipple
    assert chest_wall_on_left(header(["P", "L"])) is False
    assert chest_wall_on_left(header(["AL", "F"])) is True
    assert chest_wall_on_left(header(None)) is None
    assert chest_wall_on_left(header(["F", "R"])) is None
