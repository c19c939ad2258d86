"""workers.dicom_reader on synthetic files from tests.dicom_factory."""

from __future__ import annotations

import pathlib

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from service.errors import InvalidInstance, UnsupportedInput
from tests.dicom_factory import make_us_dataset, synthetic_breast_image, write_dataset
from workers.dicom_reader import SourceFrame, read_frames, window_to_uint8


def _write(tmp_path: pathlib.Path, ds: pydicom.Dataset, name: str = "a.dcm") -> pathlib.Path:
    return write_dataset(ds, tmp_path / name)


def test_monochrome2_round_trip(tmp_path: pathlib.Path) -> None:
    pixels = synthetic_breast_image()
    ds = make_us_dataset(pixels, study_uid="1.2.3", sop_uid="1.2.3.4")
    [frame] = read_frames(_write(tmp_path, ds))
    assert isinstance(frame, SourceFrame)
    assert frame.frame_number is None
    assert frame.pixels.dtype == np.uint8
    np.testing.assert_array_equal(frame.pixels, pixels)
    assert frame.scan_region_xywh == (0, 0, 320, 240)
    assert frame.row_spacing_mm == pytest.approx(0.1)
    assert frame.column_spacing_mm == pytest.approx(0.1)
    assert frame.sop_instance_uid == "1.2.3.4"
    assert frame.study_instance_uid == "1.2.3"
    assert frame.sop_class_uid == "1.2.840.10008.5.1.4.1.1.6.1"
    assert "PixelData" not in frame.dataset
    assert frame.scan_region_pixels.shape == (240, 320)


def test_monochrome1_is_inverted(tmp_path: pathlib.Path) -> None:
    pixels = synthetic_breast_image()
    [frame] = read_frames(_write(tmp_path, make_us_dataset(pixels, photometric="MONOCHROME1")))
    np.testing.assert_array_equal(frame.pixels, 255 - pixels)


def test_rgb_becomes_luma(tmp_path: pathlib.Path) -> None:
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    [frame] = read_frames(_write(tmp_path, make_us_dataset(rgb, photometric="RGB")))
    expected = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert frame.pixels.shape == (40, 60)
    assert np.all(frame.pixels == expected)


def test_multi_frame_middle_and_evenly_spaced(tmp_path: pathlib.Path) -> None:
    # Each frame is filled with its own index so that we can tell which came back.
    stack = np.stack([np.full((30, 40), 10 * i, np.uint8) for i in range(9)])
    path = _write(tmp_path, make_us_dataset(stack))
    [middle] = read_frames(path)
    assert middle.frame_number == 5
    assert np.all(middle.pixels == 40)
    frames = read_frames(path, max_frames=3)
    assert [f.frame_number for f in frames] == [1, 5, 9]
    assert [int(f.pixels[0, 0]) for f in frames] == [0, 40, 80]
    assert len(read_frames(path, max_frames=50)) == 9
    with pytest.raises(ValueError):
        read_frames(path, max_frames=0)


def test_pixel_spacing_fallback_and_estimated_region(tmp_path: pathlib.Path) -> None:
    pixels = np.zeros((200, 300), np.uint8)
    pixels[40:180, 60:260] = synthetic_breast_image(140, 200)
    ds = make_us_dataset(pixels, spacing_mm=None)
    ds.PixelSpacing = [0.2, 0.25]
    [frame] = read_frames(_write(tmp_path, ds))
    assert (frame.row_spacing_mm, frame.column_spacing_mm) == (pytest.approx(0.2), pytest.approx(0.25))
    x, y, w, h = frame.scan_region_xywh
    assert abs(x - 60) <= 4 and abs(y - 40) <= 4 and abs(w - 200) <= 8 and abs(h - 140) <= 8


def test_no_spacing_at_all(tmp_path: pathlib.Path) -> None:
    [frame] = read_frames(_write(tmp_path, make_us_dataset(synthetic_breast_image(), spacing_mm=None)))
    assert frame.row_spacing_mm is None and frame.column_spacing_mm is None
    assert frame.scan_region_xywh[2] > 0 and frame.scan_region_xywh[3] > 0


def test_sixteen_bit_is_windowed(tmp_path: pathlib.Path) -> None:
    values = np.linspace(0, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)
    ds = make_us_dataset(np.zeros((64, 64), np.uint8))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = values.tobytes()
    ds.WindowCenter, ds.WindowWidth = 1000, 1000
    [frame] = read_frames(_write(tmp_path, ds))
    assert frame.pixels.dtype == np.uint8
    assert frame.pixels[0, 0] == 0 and frame.pixels[-1, -1] == 255
    inside = (values > 600) & (values < 1400)
    assert 0 < frame.pixels[inside].min() < frame.pixels[inside].max() < 255
    del ds.WindowCenter, ds.WindowWidth
    [frame] = read_frames(_write(tmp_path, ds, "b.dcm"))
    assert frame.pixels.min() == 0 and frame.pixels.max() == 255


def test_window_formula() -> None:
    # PS3.3 C.11.2.1.2.1 with center 100, width 51: 74.5 and below -> 0, above 124.5 -> 255.
    out = window_to_uint8(np.array([0.0, 74.0, 99.5, 125.0, 300.0]), 100.0, 51.0)
    assert list(out) == [0, 0, 128, 255, 255]


def test_not_dicom_is_invalid(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"this is not a DICOM file at all" * 10)
    with pytest.raises(InvalidInstance):
        read_frames(path)


def test_truncated_file_is_invalid(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, make_us_dataset(synthetic_breast_image()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])
    with pytest.raises(InvalidInstance):
        read_frames(path)


def test_missing_pixel_data_is_invalid(tmp_path: pathlib.Path) -> None:
    ds = make_us_dataset(synthetic_breast_image())
    del ds.PixelData
    with pytest.raises(InvalidInstance, match="Pixel Data"):
        read_frames(_write(tmp_path, ds))


@pytest.mark.parametrize("photometric", ["YBR_PARTIAL_420", "HSV"])
def test_unsupported_photometric_is_named(tmp_path: pathlib.Path, photometric: str) -> None:
    ds = make_us_dataset(synthetic_breast_image())
    ds.PhotometricInterpretation = photometric
    with pytest.raises(UnsupportedInput, match=photometric):
        read_frames(_write(tmp_path, ds))


def test_unsupported_bit_depth_is_named(tmp_path: pathlib.Path) -> None:
    ds = make_us_dataset(np.zeros((8, 8), np.uint8))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.PixelData = np.zeros((8, 8), np.uint32).tobytes()
    with pytest.raises(UnsupportedInput, match="32"):
        read_frames(_write(tmp_path, ds))


def test_unsupported_transfer_syntax_is_named(tmp_path: pathlib.Path) -> None:
    ds = make_us_dataset(synthetic_breast_image())
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    with pytest.raises(UnsupportedInput, match=r"1\.2\.840\.10008\.1\.2\.4\.100"):
        read_frames(_write(tmp_path, ds))


def test_pixel_data_shorter_than_described_is_invalid(tmp_path: pathlib.Path) -> None:
    ds = make_us_dataset(synthetic_breast_image())
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(InvalidInstance):
        read_frames(_write(tmp_path, ds))
