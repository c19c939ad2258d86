"""workers.routing: every route and every reason, from headers built here and from real vendor files."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from tests.dicom_factory import (
    make_mg_dataset,
    make_us_dataset,
    square_lesion_analysis,
    synthetic_breast_image,
    write_dataset,
)
from workers import routing
from workers.dicom_reader import read_frames
from workers.routing import (
    ABVS_PIPELINE,
    BMODE_PIPELINE,
    COLOUR_FRACTION_THRESHOLD,
    COLOUR_REASON,
    CONTRAST_MAMMOGRAPHY_REASON,
    DERIVED_REASON,
    FOR_PROCESSING_REASON,
    MAGNIFICATION_REASON,
    MAMMOGRAPHY_PIPELINE,
    OWN_RESULT_REASON,
    PARTIAL_VIEW_REASON,
    SPECIMEN_REASON,
    SPOT_COMPRESSION_REASON,
    STEREOTACTIC_REASON,
    TOMOSYNTHESIS_REASON,
    Route,
    check_pixels,
    cine_note,
    colour_fraction,
    confirm_grey,
    route,
)
from workers.sc_writer import build_overlay_image
from workers.sr_writer import AnalysedFrame, ReportContext, build_report

ROOT = pathlib.Path(__file__).resolve().parents[2]
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
ENHANCED_US_VOLUME = "1.2.840.10008.5.1.4.1.1.6.2"
MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
PROJECTION_PRESENTATION = "1.2.840.10008.5.1.4.1.1.13.1.4"
PROJECTION_PROCESSING = "1.2.840.10008.5.1.4.1.1.13.1.5"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _region(data_type: int, spatial_format: int = 1) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat, item.RegionDataType = spatial_format, data_type
    item.RegionLocationMinX0, item.RegionLocationMinY0, item.RegionLocationMaxX1, item.RegionLocationMaxY1 = 0, 0, 9, 9
    return item


def _us(sop_class: str = US_IMAGE, photometric: str = "MONOCHROME2", **attributes: object) -> Dataset:
    """A US header as a B-mode scanner writes it: 2D mode bitmap, one tissue region."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.Modality = "US"
    ds.Manufacturer = "Example Medical"
    ds.ManufacturerModelName = "Example 9"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "BREAST", "0001"]
    ds.PhotometricInterpretation = photometric
    ds.SequenceOfUltrasoundRegions = [_region(1)]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _mg(
    sop_class: str = MG_PRESENTATION, laterality: str | None = "L", view: str | None = "CC", **attributes: object
) -> Dataset:
    """A mammography header: Image Laterality, View Position and its CID 4014 view code."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.Modality = "MG"
    ds.Manufacturer = "Example Medical"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PROCESSING" if sop_class in (MG_PROCESSING, DX_PROCESSING) else "FOR PRESENTATION"
    if laterality is not None:
        ds.ImageLaterality = laterality
    if view is not None:
        ds.ViewPosition = view
        code = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}.get(view)
        if code is not None:
            item = _code(code[0], "SCT", code[1])
            item.ViewModifierCodeSequence = []
            ds.ViewCodeSequence = [item]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _vendor_file(name: str) -> pathlib.Path:
    found = get_testdata_file(name)
    if found is None:
        pytest.skip(f"{name} not available (pydicom-data missing?)")
    return pathlib.Path(str(found))


# --- B-mode ultrasound -----------------------------------------------------------------------------------------------


def test_a_grey_b_mode_image_goes_to_the_b_mode_pipeline_without_a_pixel_check() -> None:
    assert route(_us()) == Route(BMODE_PIPELINE, "2D B-mode ultrasound image")


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3"])
def test_the_retired_ultrasound_classes_are_ultrasound_too(sop_class: str) -> None:
    assert route(_us(sop_class)).pipeline == BMODE_PIPELINE


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL_422", "YBR_FULL", "YBR_RCT", "PALETTE COLOR"])
def test_a_colour_encoded_image_without_colour_flags_is_b_mode_after_a_pixel_check(photometric: str) -> None:
    chosen = route(_us(photometric=photometric))
    assert (chosen.pipeline, chosen.check_colour) == (BMODE_PIPELINE, True)


@pytest.mark.parametrize(
    ("frames", "note"),
    [
        (2, "cine of 2 frames: frame 2 analysed (the middle one)"),
        (30, "cine of 30 frames: frame 16 analysed (the middle one)"),
        (120, "cine of 120 frames: frame 61 analysed (the middle one)"),
    ],
)
def test_a_cine_is_b_mode_and_says_which_frame_is_analysed(frames: int, note: str) -> None:
    chosen = route(_us(US_MULTIFRAME, NumberOfFrames=frames))
    assert (chosen.pipeline, chosen.frames_note, chosen.max_frames) == (BMODE_PIPELINE, note, 1)
    assert chosen.reason == f"B-mode ultrasound {note}"


def test_a_multi_frame_object_of_one_frame_is_not_called_a_cine() -> None:
    chosen = route(_us(US_MULTIFRAME, NumberOfFrames=1))
    assert (chosen.pipeline, chosen.frames_note) == (BMODE_PIPELINE, None)


def test_several_frames_are_named_as_the_reader_spaces_them() -> None:
    assert cine_note(30, 3) == "cine of 30 frames: frames 1, 15, 30 analysed (evenly spaced)"
    assert cine_note(2, 5) == "cine of 2 frames: frames 1, 2 analysed (evenly spaced)"


@pytest.mark.parametrize("max_frames", [1, 3])
def test_the_frames_note_names_the_frames_read_frames_takes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, max_frames: int
) -> None:
    monkeypatch.setattr(routing, "CINE_MAX_FRAMES", max_frames)
    stack = np.stack([synthetic_breast_image(rows=48, columns=64, seed=s) for s in range(9)])
    path = write_dataset(make_us_dataset(stack), tmp_path / "cine.dcm")
    chosen = route(pydicom.dcmread(path, stop_before_pixels=True))
    read = [frame.frame_number for frame in read_frames(path, max_frames=chosen.max_frames)]
    assert chosen.frames_note is not None
    assert chosen.frames_note.split(": ")[1].split(" analysed")[0].removeprefix("frames ").removeprefix("frame ") == (
        ", ".join(str(number) for number in read)
    )


def test_the_sample_studies_go_to_the_b_mode_pipeline() -> None:
    samples = sorted((ROOT / "samples").glob("*/*.dcm"))
    assert samples, "no sample studies (make samples)"
    for path in samples:
        chosen = route(pydicom.dcmread(path, stop_before_pixels=True))
        assert (chosen.pipeline, chosen.check_colour) == (BMODE_PIPELINE, False), path.name


# --- colour Doppler, power Doppler, elastography ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "attributes",
    [
        pytest.param({"UltrasoundColorDataPresent": 1}, id="colour-data-present"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "BREAST", "0011"]}, id="bitmap-2d+colour-doppler"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "BREAST", "0101"]}, id="bitmap-colour-power"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "BREAST", "0009"]}, id="bitmap-pw-doppler"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "BREAST", "0004"]}, id="bitmap-cw-doppler"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "BREAST", "0020"]}, id="bitmap-colour-m-mode"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "BREAST", "0201"]}, id="bitmap-tissue-characterisation"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "COLOR"]}, id="text-color"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "COLOUR FLOW"]}, id="text-colour-flow"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "POWER_DOPPLER"]}, id="text-power-doppler"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "BREAST", "CFM"]}, id="text-cfm"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "BREAST", "CPA"]}, id="text-cpa"),
        pytest.param({"ImageType": ["DERIVED", "PRIMARY", "ELASTOGRAPHY"]}, id="text-elastography"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "STRAIN"]}, id="text-strain"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "SHEAR WAVE"]}, id="text-shear-wave"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "SWE"]}, id="text-swe"),
        pytest.param({"ImageType": "COLOR"}, id="single-valued-image-type"),
        pytest.param({"SequenceOfUltrasoundRegions": [_region(1), _region(2)]}, id="region-colour-flow"),
        pytest.param({"SequenceOfUltrasoundRegions": [_region(1), _region(3, 3)]}, id="region-pw-spectral"),
        pytest.param({"SequenceOfUltrasoundRegions": [_region(1), _region(4, 3)]}, id="region-cw-spectral"),
        pytest.param({"SequenceOfUltrasoundRegions": [_region(1), _region(5, 4)]}, id="region-doppler-trace"),
        pytest.param({"SequenceOfUltrasoundRegions": [_region(1), _region(0, 3)]}, id="region-spectral-format"),
    ],
)
@pytest.mark.parametrize("sop_class", [US_IMAGE, US_MULTIFRAME])
def test_colour_doppler_and_elastography_are_never_given_to_the_b_mode_models(
    attributes: dict[str, object], sop_class: str
) -> None:
    header = _us(sop_class, photometric="RGB", NumberOfFrames=12, **attributes)
    assert route(header) == Route(None, COLOUR_REASON)


def test_the_colour_check_comes_before_the_volume_scanner_check() -> None:
    header = _us(
        US_MULTIFRAME, NumberOfFrames=300, ManufacturerModelName="Invenia ABUS 2.0", UltrasoundColorDataPresent=1
    )
    assert route(header) == Route(None, COLOUR_REASON)


@pytest.mark.parametrize(
    "attributes",
    [
        pytest.param({"UltrasoundColorDataPresent": 0}, id="colour-data-absent"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "BREAST", "0003"]}, id="bitmap-2d+m-mode"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "BREAST", "0401"]}, id="bitmap-spatially-related"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "SMALL PARTS"]}, id="anatomy-only"),
        pytest.param({"ImageType": ["DERIVED", "PRIMARY", "EPICARDIAL", "0001"]}, id="sonosite"),
        pytest.param({"ImageType": ["ORIGINAL", "PRIMARY", "BREAST", "0441"]}, id="bitmap-3d-rendering"),
        pytest.param({"SequenceOfUltrasoundRegions": [_region(1), _region(10, 4), _region(13, 0)]}, id="ecg-grey-bar"),
        pytest.param({"SequenceOfUltrasoundRegions": []}, id="no-regions"),
        pytest.param({"ImageType": []}, id="empty-image-type"),
    ],
)
def test_what_is_not_a_colour_signal(attributes: dict[str, object]) -> None:
    assert route(_us(**attributes)).pipeline == BMODE_PIPELINE


# --- the pixel check -------------------------------------------------------------------------------------------------


def _grey_rgb(rows: int = 200, columns: int = 300, seed: int = 0) -> npt.NDArray[np.uint8]:
    grey = synthetic_breast_image(rows, columns, seed)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _paint(rgb: npt.NDArray[np.uint8], box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    x, y, w, h = box
    rgb[y : y + h, x : x + w] = colour


REGION = (50, 20, 200, 160)  # x, y, width, height: the scan region of a 300 x 200 frame


def test_grey_stored_as_rgb_has_no_colour() -> None:
    assert colour_fraction(_grey_rgb(), REGION) == 0.0


def test_chroma_noise_of_lossy_compression_is_not_colour() -> None:
    rgb = _grey_rgb().astype(np.int16)
    rgb += np.random.default_rng(1).integers(-12, 13, size=rgb.shape, dtype=np.int16)
    assert colour_fraction(np.clip(rgb, 0, 255).astype(np.uint8), REGION) == 0.0


def test_a_sepia_tinted_b_mode_map_is_not_colour() -> None:
    grey = synthetic_breast_image(200, 300).astype(np.float64)
    tint = np.stack([grey, grey * 0.85, grey * 0.65], axis=2)  # a warm B-mode chroma map
    assert colour_fraction(np.clip(tint, 0, 255).astype(np.uint8), REGION) == 0.0


def test_a_flow_patch_inside_the_region_is_colour() -> None:
    rgb = _grey_rgb()
    _paint(rgb, (120, 80, 20, 12), (220, 30, 20))  # red flow
    _paint(rgb, (120, 92, 20, 12), (20, 40, 230))  # blue flow
    fraction = colour_fraction(rgb, REGION)
    assert fraction == pytest.approx(2 * 20 * 12 / (200 * 160))
    assert fraction >= COLOUR_FRACTION_THRESHOLD


def test_a_power_doppler_patch_of_yellow_and_orange_is_colour() -> None:
    rgb = _grey_rgb()
    _paint(rgb, (100, 60, 30, 30), (255, 200, 0))
    _paint(rgb, (130, 60, 10, 30), (200, 80, 0))
    assert colour_fraction(rgb, REGION) >= COLOUR_FRACTION_THRESHOLD


def test_a_colour_bar_outside_the_region_is_ignored() -> None:
    rgb = _grey_rgb()
    for row in range(0, 200):  # a colour legend down the right edge, outside the scan region
        _paint(rgb, (280, row, 15, 1), (255 - row, 0, row))
    assert colour_fraction(rgb, REGION) == 0.0
    assert colour_fraction(rgb, (0, 0, 300, 200)) >= COLOUR_FRACTION_THRESHOLD


def test_thin_coloured_annotations_inside_the_region_are_ignored() -> None:
    rgb = _grey_rgb()
    _paint(rgb, (60, 100, 150, 1), (255, 255, 0))  # a yellow caliper line
    _paint(rgb, (100, 40, 2, 60), (0, 255, 0))  # a green 2-pixel marker
    for x in range(70, 200, 6):  # dotted line and text-like strokes
        _paint(rgb, (x, 150, 2, 2), (0, 255, 255))
    assert colour_fraction(rgb, REGION) == 0.0


def test_a_region_reaching_past_the_frame_is_clipped() -> None:
    rgb = _grey_rgb()
    _paint(rgb, (250, 150, 50, 50), (230, 20, 20))
    assert colour_fraction(rgb, (250, 150, 500, 500)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "array", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.uint16), np.zeros((0, 10, 3), np.uint8)]
)
def test_colour_fraction_refuses_what_is_not_an_rgb_frame(array: npt.NDArray[np.generic]) -> None:
    with pytest.raises(ValueError, match="uint8"):
        colour_fraction(array, (0, 0, 10, 10))  # type: ignore[arg-type]


def test_confirm_grey_settles_a_route_that_asked_for_the_check() -> None:
    chosen = Route(BMODE_PIPELINE, "2D B-mode ultrasound image", check_colour=True)
    grey, coloured = _grey_rgb(), _grey_rgb()
    _paint(coloured, (100, 60, 40, 40), (220, 30, 20))
    assert confirm_grey(chosen, [(grey, REGION)]) == Route(BMODE_PIPELINE, "2D B-mode ultrasound image")
    assert confirm_grey(chosen, [(grey, REGION), (coloured, REGION)]) == Route(None, COLOUR_REASON)
    plain = Route(BMODE_PIPELINE, "2D B-mode ultrasound image")
    assert confirm_grey(plain, [(coloured, REGION)]) is plain, "no check was asked for"


def _written_rgb_study(tmp_path: pathlib.Path, colour: bool) -> pathlib.Path:
    rgb = _grey_rgb(240, 320)
    if colour:
        _paint(rgb, (140, 100, 40, 30), (220, 30, 20))
        _paint(rgb, (140, 130, 40, 20), (20, 40, 230))
    ds = make_us_dataset(rgb, photometric="RGB")
    return write_dataset(ds, tmp_path / ("colour.dcm" if colour else "grey.dcm"))


@pytest.mark.parametrize(("colour", "expected"), [(False, BMODE_PIPELINE), (True, None)])
def test_check_pixels_on_written_files(tmp_path: pathlib.Path, colour: bool, expected: str | None) -> None:
    path = _written_rgb_study(tmp_path, colour)
    chosen = route(pydicom.dcmread(path, stop_before_pixels=True))
    assert chosen.check_colour
    checked = check_pixels(chosen, path, read_frames(path, max_frames=chosen.max_frames))
    assert (checked.pipeline, checked.check_colour) == (expected, False)
    assert checked.reason == (COLOUR_REASON if colour else "2D B-mode ultrasound image")


def test_check_pixels_does_not_decode_what_needs_no_check(tmp_path: pathlib.Path) -> None:
    chosen = route(_us())
    assert check_pixels(chosen, tmp_path / "absent.dcm", []) is chosen


# --- real vendor files (pydicom test data) ---------------------------------------------------------------------------

# name: (route from the header alone, after the pixel check), with what the file is
VENDOR_ROUTES = {
    # GE LOGIQ 700 power Doppler of a lymph node, RGB, no header flag: only the pixels tell
    "US1_UNCR.dcm": (BMODE_PIPELINE, None),
    "US1_J2KR.dcm": (BMODE_PIPELINE, None),
    "examples_rgb_color.dcm": (BMODE_PIPELINE, None),
    "ExplVR_BigEnd.dcm": (BMODE_PIPELINE, None),  # a crop of a power Doppler image
    # Acme transoesophageal colour Doppler, Image Type ...\0011 (2D + Color Doppler)
    "color-pl.dcm": (None, None),
    "color-px.dcm": (None, None),
    # Philips CX50, PALETTE COLOR, Ultrasound Color Data Present 1
    "OBXXXX1A.dcm": (None, None),
    # ALOKA dual B-mode in PALETTE COLOR with green cursor and labels inside the scan: grey
    "gdcm-US-ALOKA-16.dcm": (BMODE_PIPELINE, BMODE_PIPELINE),
    # SonoSite cines in YBR_FULL_422: grey
    "examples_ybr_color.dcm": (BMODE_PIPELINE, BMODE_PIPELINE),
    "color3d_jpeg_baseline.dcm": (BMODE_PIPELINE, BMODE_PIPELINE),
    # Philips EPIQ 7C, MONOCHROME2, Ultrasound Color Data Present 0: no check needed
    "JPGLosslessP14SV1_1s_1f_8b.dcm": (BMODE_PIPELINE, BMODE_PIPELINE),
}


@pytest.mark.parametrize("name", sorted(VENDOR_ROUTES))
def test_vendor_ultrasound_files(name: str) -> None:
    path = _vendor_file(name)
    from_header, after_pixels = VENDOR_ROUTES[name]
    chosen = route(pydicom.dcmread(path, stop_before_pixels=True))
    assert chosen.pipeline == from_header
    if chosen.pipeline is None:
        assert chosen.reason == COLOUR_REASON
        return
    checked = check_pixels(chosen, path, read_frames(path, max_frames=chosen.max_frames))
    assert checked.pipeline == after_pixels
    assert checked.reason == (COLOUR_REASON if after_pixels is None else chosen.reason)


def test_a_vendor_cine_names_its_analysed_frame() -> None:
    chosen = route(pydicom.dcmread(_vendor_file("examples_ybr_color.dcm"), stop_before_pixels=True))
    assert chosen.frames_note == "cine of 30 frames: frame 16 analysed (the middle one)"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("SC_rgb.dcm", DERIVED_REASON),
        ("test-SR.dcm", DERIVED_REASON),
        ("reportsi.dcm", DERIVED_REASON),
        ("liver.dcm", DERIVED_REASON),  # Segmentation
        ("CT_small.dcm", "no pipeline for modality CT / CT Image Storage"),
        ("MR_small.dcm", "no pipeline for modality MR / MR Image Storage"),
        ("RG1_UNCI.dcm", "no pipeline for modality CR / Computed Radiography Image Storage"),
        ("waveform_ecg.dcm", "no pipeline for modality ECG / 12-lead ECG Waveform Storage"),
    ],
)
def test_vendor_files_that_are_not_analysed(name: str, reason: str) -> None:
    assert route(pydicom.dcmread(_vendor_file(name), stop_before_pixels=True)) == Route(None, reason)


# --- automated breast volume scanners --------------------------------------------------------------------------------


def test_an_enhanced_us_volume_goes_to_the_abvs_pipeline() -> None:
    header = _us(ENHANCED_US_VOLUME, NumberOfFrames=300)
    assert route(header) == Route(ABVS_PIPELINE, "automated breast ultrasound (ABVS) volume")


@pytest.mark.parametrize(
    "attributes",
    [
        {"Manufacturer": "SIEMENS", "ManufacturerModelName": "ACUSON S2000 ABVS"},
        {"Manufacturer": "SIEMENS", "ManufacturerModelName": "ACUSON S2000", "SeriesDescription": "ABVS Right AP"},
        {"Manufacturer": "GE Healthcare", "ManufacturerModelName": "Invenia ABUS 2.0"},
        {"Manufacturer": "GE Healthcare", "ManufacturerModelName": "somo•v"},
        {"Manufacturer": "U-Systems", "ManufacturerModelName": "ABS-1"},
        {"ProtocolName": "Automated Breast Volume"},
        {"ImageType": ["ORIGINAL", "PRIMARY", "ABUS", "0001"]},
    ],
)
def test_a_multi_frame_sweep_from_an_automated_breast_scanner_goes_to_the_abvs_pipeline(
    attributes: dict[str, object],
) -> None:
    assert route(_us(US_MULTIFRAME, NumberOfFrames=318, **attributes)).pipeline == ABVS_PIPELINE


def test_a_single_image_from_an_automated_breast_scanner_is_b_mode() -> None:
    assert route(_us(ManufacturerModelName="Invenia ABUS 2.0")).pipeline == BMODE_PIPELINE


@pytest.mark.parametrize(
    "attributes",
    [
        {"ManufacturerModelName": "ACUSON S2000"},
        {"SeriesDescription": "ABDOMEN"},
        {"SeriesDescription": "FABUS trial"},
    ],
)
def test_a_cine_from_a_hand_held_scanner_is_not_a_volume(attributes: dict[str, object]) -> None:
    assert route(_us(US_MULTIFRAME, NumberOfFrames=60, **attributes)).pipeline == BMODE_PIPELINE


# --- mammography -----------------------------------------------------------------------------------------------------


def test_a_for_presentation_mammogram_goes_to_the_mammography_pipeline() -> None:
    assert route(_mg(laterality="R", view="MLO")) == Route(
        MAMMOGRAPHY_PIPELINE, "mammogram, right, MLO", laterality="R", view="MLO"
    )


def test_a_mammogram_written_by_the_test_factory() -> None:
    header = make_mg_dataset(np.zeros((32, 24), np.uint16), laterality="R", view="MLO")
    chosen = route(header)
    assert (chosen.pipeline, chosen.laterality, chosen.view) == (MAMMOGRAPHY_PIPELINE, "R", "MLO")


@pytest.mark.parametrize("view", ["CC", "MLO", "ML", "LM", "LMO", "XCCL", "XCCM", "FB", "SIO", "ISO"])
def test_the_view_position_is_reported(view: str) -> None:
    assert route(_mg(view=view)).view == view


@pytest.mark.parametrize(("code", "view"), sorted(routing._VIEW_CODES.items()))
def test_the_view_from_its_code_when_view_position_is_absent(code: str, view: str) -> None:
    header = _mg(view=None, ViewCodeSequence=[_code(code, "SRT" if code[:2] in ("R-", "G-") else "SCT", "x")])
    assert route(header).view == view


def _cid_codes(name: str) -> set[str]:
    """SNOMED CT code values of a context group, from the PS3.16 tables pydicom ships."""
    group = getattr(codes, name)
    return {getattr(group, concept).value for concept in dir(group) if concept[0].isupper()}


def test_the_view_codes_are_those_of_cid_4014_and_4015() -> None:
    views = {code for code in routing._VIEW_CODES if code[0].isdigit()}
    specimen = {code for code in routing._SPECIMEN_VIEW_CODES if code[0].isdigit()}
    assert views | specimen == _cid_codes("cid4014")
    modifiers = routing._SPOT_COMPRESSION_CODES | routing._MAGNIFICATION_CODES
    assert {code for code in modifiers if code[0].isdigit()} <= _cid_codes("cid4015")


@pytest.mark.parametrize(
    ("attributes", "laterality"),
    [
        ({"ImageLaterality": "L"}, "L"),
        ({"ImageLaterality": "B"}, "B"),
        ({"Laterality": "R"}, "R"),
        ({"ImageLaterality": "U", "Laterality": "L"}, "L"),
        ({"ViewPosition": "RMLO"}, "R"),
        ({"ViewCodeSequence": [_code("R-10242", "SRT", "left cranio-caudal")]}, "L"),
        ({}, None),
    ],
)
def test_the_laterality_and_where_it_comes_from(attributes: dict[str, object], laterality: str | None) -> None:
    header = _mg(laterality=None, view=None, **attributes)
    assert route(header).laterality == laterality


def test_a_view_position_written_with_its_side() -> None:
    chosen = route(_mg(laterality=None, view="LCC"))
    assert (chosen.laterality, chosen.view, chosen.reason) == ("L", "CC", "mammogram, left, CC")


def test_a_mammogram_that_does_not_say_its_side_or_view() -> None:
    assert route(_mg(laterality=None, view=None)) == Route(
        MAMMOGRAPHY_PIPELINE, "mammogram, side not stated, view not stated"
    )


def test_digital_x_ray_is_a_mammogram_only_with_modality_mg() -> None:
    assert route(_mg(DX_PRESENTATION)).pipeline == MAMMOGRAPHY_PIPELINE
    chest = _mg(DX_PRESENTATION, Modality="DX")
    assert route(chest) == Route(None, "no pipeline for modality DX / Digital X-Ray Image Storage - For Presentation")
    raw_chest = _mg(DX_PROCESSING, Modality="DX")
    assert route(raw_chest).reason == "no pipeline for modality DX / Digital X-Ray Image Storage - For Processing"


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(_mg(MG_PROCESSING), id="mg-for-processing"),
        pytest.param(_mg(DX_PROCESSING), id="dx-for-processing-mg"),
        pytest.param(_mg(PROJECTION_PROCESSING), id="breast-projection-for-processing"),
        pytest.param(_mg(PresentationIntentType="FOR PROCESSING"), id="intent-for-processing"),
    ],
)
def test_for_processing_images_are_not_analysed(header: Dataset) -> None:
    assert route(header) == Route(None, FOR_PROCESSING_REASON)


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"ViewCodeSequence": [_code("127457009", "SCT", "tissue specimen from breast")]}, SPECIMEN_REASON),
        ({"ViewCodeSequence": [_code("G-8310", "SRT", "tissue specimen from breast")]}, SPECIMEN_REASON),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "SPECIMEN"]}, SPECIMEN_REASON),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "STEREO"]}, STEREOTACTIC_REASON),
        ({"ImageType": ["DERIVED", "PRIMARY", "STEREO_SCOUT"]}, STEREOTACTIC_REASON),
        ({"PartialView": "YES"}, PARTIAL_VIEW_REASON),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "", "HIGH_ENERGY"]}, CONTRAST_MAMMOGRAPHY_REASON),
        ({"ImageType": ["DERIVED", "PRIMARY", "", "RECOMBINED"]}, CONTRAST_MAMMOGRAPHY_REASON),
    ],
)
def test_views_that_are_not_full_field_mammograms(attributes: dict[str, object], reason: str) -> None:
    assert route(_mg(**attributes)) == Route(None, reason)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (_code("399055006", "SCT", "Spot Compression"), SPOT_COMPRESSION_REASON),
        (_code("R-102D7", "SRT", "Spot Compression"), SPOT_COMPRESSION_REASON),
        (_code("399163009", "SCT", "Magnification"), MAGNIFICATION_REASON),
        (_code("R-102D6", "SRT", "Magnification"), MAGNIFICATION_REASON),
    ],
)
@pytest.mark.parametrize("nested", [True, False], ids=["in-the-view-item", "top-level"])
def test_spot_compression_and_magnification_views(code: Dataset, reason: str, nested: bool) -> None:
    header = _mg()
    if nested:
        header.ViewCodeSequence[0].ViewModifierCodeSequence = [code]
    else:
        header.ViewModifierCodeSequence = [code]
    assert route(header) == Route(None, reason)


@pytest.mark.parametrize(
    "attributes",
    [
        {"PartialView": "NO"},
        {"ImageType": ["ORIGINAL", "PRIMARY", "", "LOW_ENERGY"]},  # the low-energy image of CEM is a mammogram
        {"ViewCodeSequence": [_code("399162004", "SCT", "cranio-caudal")]},
    ],
)
def test_full_field_views_stay_mammograms(attributes: dict[str, object]) -> None:
    assert route(_mg(**attributes)).pipeline == MAMMOGRAPHY_PIPELINE


def test_a_cleavage_view_modifier_is_still_a_full_field_view() -> None:
    header = _mg()
    header.ViewCodeSequence[0].ViewModifierCodeSequence = [_code("399161006", "SCT", "Cleavage")]
    assert route(header).pipeline == MAMMOGRAPHY_PIPELINE


# --- tomosynthesis and synthesised 2D --------------------------------------------------------------------------------


def _frame_laterality(side: str) -> Dataset:
    anatomy = Dataset()
    anatomy.FrameLaterality = side
    group = Dataset()
    group.FrameAnatomySequence = [anatomy]
    return group


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(_mg(TOMOSYNTHESIS, NumberOfFrames=60), id="reconstructed-volume"),
        pytest.param(_mg(TOMOSYNTHESIS, ImageType=["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "MAXIMUM"]), id="slab"),
        pytest.param(_mg(PROJECTION_PRESENTATION, NumberOfFrames=15), id="projections"),
        pytest.param(
            _mg(TOMOSYNTHESIS, NumberOfFrames=60, ImageType=["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"]),
            id="generated-2d-flag-on-a-volume",
        ),
        pytest.param(_mg(TOMOSYNTHESIS, SeriesDescription="R CC VIEW"), id="not-a-product-name"),
    ],
)
def test_tomosynthesis_is_analysed_only_through_a_synthesised_view(header: Dataset) -> None:
    assert route(header) == Route(None, TOMOSYNTHESIS_REASON)


@pytest.mark.parametrize(
    ("sop_class", "attributes"),
    [
        (TOMOSYNTHESIS, {"ImageType": ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"], "NumberOfFrames": 1}),
        (PROJECTION_PRESENTATION, {"ImageType": ["DERIVED", "PRIMARY", "SYNTHESIZED"]}),
        (TOMOSYNTHESIS, {"SeriesDescription": "L CC C-View"}),
        (TOMOSYNTHESIS, {"SeriesDescription": "LCC Intelligent 2D"}),
        (TOMOSYNTHESIS, {"SeriesDescription": "V-Preview LCC"}),
        (TOMOSYNTHESIS, {"SeriesDescription": "Insight 2D L CC"}),
        (TOMOSYNTHESIS, {"SeriesDescription": "S-View L-CC"}),
    ],
)
def test_a_synthesised_2d_view_goes_to_the_mammography_pipeline(sop_class: str, attributes: dict[str, object]) -> None:
    chosen = route(_mg(sop_class, **attributes))
    assert chosen == Route(MAMMOGRAPHY_PIPELINE, "synthesised 2D mammogram, left, CC", laterality="L", view="CC")


def test_a_synthesised_view_takes_its_side_from_the_frame_anatomy() -> None:
    header = _mg(
        TOMOSYNTHESIS,
        laterality=None,
        NumberOfFrames=1,
        ImageType=["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"],
        SharedFunctionalGroupsSequence=[_frame_laterality("R")],
    )
    assert route(header).laterality == "R"


def test_a_synthesised_view_is_still_checked_for_special_views() -> None:
    header = _mg(TOMOSYNTHESIS, SeriesDescription="L CC C-View", PartialView="YES")
    assert route(header) == Route(None, PARTIAL_VIEW_REASON)


# --- derived objects and our own results -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sop_class",
    [
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
        "1.2.840.10008.5.1.4.1.1.88.50",  # Mammography CAD SR
        "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
        "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
        "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    ],
)
def test_derived_objects_are_not_analysed(sop_class: str) -> None:
    assert route(_us(sop_class, Modality="OT")) == Route(None, DERIVED_REASON)


def test_raw_data_is_acquired_but_has_no_pipeline() -> None:
    assert route(_us("1.2.840.10008.5.1.4.1.1.66", Modality="US")) == Route(
        None, "no pipeline for modality US / Raw Data Storage"
    )


def test_anything_with_our_manufacturer_is_our_own_result() -> None:
    # Even in an ultrasound class: whatever we wrote is never analysed again.
    assert route(_us(Manufacturer="BreastAI project")) == Route(None, OWN_RESULT_REASON)
    assert route(_us(Manufacturer="BreastAI sample builder")).pipeline == BMODE_PIPELINE


@pytest.fixture()
def our_results(tmp_path: pathlib.Path) -> Iterator[tuple[Dataset, Dataset]]:
    source = write_dataset(make_us_dataset(synthetic_breast_image()), tmp_path / "source.dcm")
    [frame] = read_frames(source)
    analysis = square_lesion_analysis(frame.pixels.shape)
    overlay = build_overlay_image(frame, analysis, "2.25.1", "2.25.2", 1, ReportContext())
    report = build_report(
        [AnalysedFrame(frame=frame, analysis=analysis)],
        evidence=[frame.dataset],
        series_instance_uid="2.25.3",
        sop_instance_uid="2.25.4",
        context=ReportContext(),
    )
    yield overlay, report


def test_our_overlay_and_report_are_recognised(our_results: tuple[Dataset, Dataset]) -> None:
    for result in our_results:
        assert route(result) == Route(None, OWN_RESULT_REASON)


# --- anything else ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        (
            {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "Modality": "CT"},
            "no pipeline for modality CT / CT Image Storage",
        ),
        (
            {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.4", "Modality": "MR"},
            "no pipeline for modality MR / MR Image Storage",
        ),
        ({"SOPClassUID": "1.2.3.4", "Modality": "XX"}, "no pipeline for modality XX / 1.2.3.4"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, "no pipeline for modality unknown / CT Image Storage"),
        ({}, "no pipeline for modality unknown / no SOP Class UID"),
    ],
)
def test_anything_else_names_its_modality_and_class(attributes: dict[str, object], reason: str) -> None:
    header = Dataset()
    for keyword, value in attributes.items():
        setattr(header, keyword, value)
    assert route(header) == Route(None, reason)


# --- the reasons and the documentation -------------------------------------------------------------------------------

REASONS = [
    OWN_RESULT_REASON,
    DERIVED_REASON,
    COLOUR_REASON,
    FOR_PROCESSING_REASON,
    TOMOSYNTHESIS_REASON,
    SPECIMEN_REASON,
    STEREOTACTIC_REASON,
    SPOT_COMPRESSION_REASON,
    MAGNIFICATION_REASON,
    PARTIAL_VIEW_REASON,
    CONTRAST_MAMMOGRAPHY_REASON,
]


@pytest.mark.parametrize("reason", REASONS)
def test_every_reason_is_a_short_sentence_listed_in_the_routing_page(reason: str) -> None:
    assert len(reason) <= 120 and reason[0].islower() and not reason.endswith(".")
    assert reason in (ROOT / "docs" / "routing.md").read_text(encoding="utf-8")


def test_the_routing_page_names_every_pipeline_and_threshold() -> None:
    page = (ROOT / "docs" / "routing.md").read_text(encoding="utf-8")
    for name in (BMODE_PIPELINE, MAMMOGRAPHY_PIPELINE, ABVS_PIPELINE):
        assert f"`{name}`" in page
    assert f"{COLOUR_FRACTION_THRESHOLD:.1%}" in page
