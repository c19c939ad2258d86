"""The bundled reference models: checksums enforced, served by ONNX Runtime without torch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.inference.pipeline import load_bmode_pipeline
from models.inference.registry import BUNDLED_MODEL_DIR, ModelRegistryError, read_manifest, sha256_of


def _a_us_classifier_role() -> str:
    from models.inference.pipeline import default_families

    return default_families()[0]


def test_manifest_lists_the_models_with_matching_checksums() -> None:
    entries = read_manifest()
    assert "us_segmenter" in entries and _a_us_classifier_role() in entries
    for entry in entries.values():
        assert sha256_of(BUNDLED_MODEL_DIR / entry.file) == entry.sha256
        assert entry.version and entry.name
        for side in entry.parameters.get("side_files", {}).values():
            assert sha256_of(BUNDLED_MODEL_DIR / side["file"]) == side["sha256"]


def test_a_tampered_model_file_is_refused(tmp_path: Path) -> None:
    for item in BUNDLED_MODEL_DIR.iterdir():
        shutil.copy(item, tmp_path / item.name)
    target = tmp_path / read_manifest()[_a_us_classifier_role()].file
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ModelRegistryError, match="sha256"):
        load_bmode_pipeline(tmp_path)


def test_missing_manifest_says_how_to_get_models(tmp_path: Path) -> None:
    with pytest.raises(ModelRegistryError, match="make train"):
        load_bmode_pipeline(tmp_path)


def _hypoechoic_oval(
    shape: tuple[int, int], centre: tuple[int, int], axes: tuple[int, int], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A dark oval on speckled tissue, the textbook appearance of a hypoechoic mass, and its mask."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(120, 25, shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = ((xx - centre[0]) / axes[0]) ** 2 + ((yy - centre[1]) / axes[1]) ** 2 <= 1
    image[inside] = np.clip(rng.normal(30, 8, inside.sum()), 0, 255).astype(np.uint8)
    return image, inside


def test_pipeline_finds_scores_and_explains_a_synthetic_lesion() -> None:
    image, _ = _hypoechoic_oval((300, 400), (200, 150), (60, 35), seed=0)
    analysis = load_bmode_pipeline().analyse(image)
    assert analysis.image_shape == (300, 400)
    for lesion in analysis.lesions:
        assert 0.0 <= lesion.malignancy_probability <= 1.0
        assert lesion.cam.shape == (300, 400) and lesion.cam.min() >= 0.0 and lesion.cam.max() <= 1.0
        assert np.array_equal(lesion.outline_xy[0], lesion.outline_xy[-1])
    assert analysis.lesions, "the segmenter should outline an obvious hypoechoic mass"
    x, y, w, h = analysis.lesions[0].bbox_xywh
    assert x <= 200 <= x + w and y <= 150 <= y + h


def test_pipeline_handles_a_blank_and_a_tiny_image() -> None:
    pipeline = load_bmode_pipeline()
    for shape in ((64, 64), (3, 5)):
        analysis = pipeline.analyse(np.zeros(shape, np.uint8))
        assert analysis.image_shape == shape
        assert all(lesion.cam.shape == shape for lesion in analysis.lesions)


def test_family_list_comes_from_configuration_then_manifest(tmp_path: Path) -> None:
    import json
    import shutil

    from models.inference.pipeline import default_families, load_bmode_pipeline
    from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest, write_manifest

    for item in BUNDLED_MODEL_DIR.iterdir():
        if item.suffix in (".onnx", ".npz", ".json"):
            shutil.copy(item, tmp_path)
    entries = read_manifest(tmp_path)
    role = _a_us_classifier_role()
    write_manifest(entries, tmp_path, default_pipelines={"US": [role]})
    write_manifest(entries, tmp_path)  # a later export keeps the configured default
    assert json.loads((tmp_path / "manifest.json").read_text())["default_pipelines"] == {"US": [role]}
    assert default_families(tmp_path) == (role,)
    # a consensus brings the members it averages, so that their scores are reported too
    members = tuple(entries[role].parameters.get("members", ()))
    assert load_bmode_pipeline(tmp_path).families == (role, *members)
    with pytest.raises(ModelRegistryError, match="not_a_family"):
        load_bmode_pipeline(tmp_path, families=[role, "not_a_family"])


def test_the_refiner_redraws_the_outline_and_is_named_with_the_segmenter() -> None:
    from models.inference.pipeline import load_refiner, load_segmenter, segment_lesions

    image, truth = _hypoechoic_oval((360, 480), (240, 170), (70, 40), seed=1)
    segmenter, entry = load_segmenter()
    refiner = load_refiner()
    assert refiner is not None, "the bundled models include the close-up refiner"
    coarse = segment_lesions(segmenter, entry, None, image)
    refined = segment_lesions(segmenter, entry, refiner, image)
    assert len(refined) == len(coarse) >= 1
    overlap = (refined[0].mask & truth).sum()
    assert 2 * overlap / (refined[0].mask.sum() + truth.sum()) > 0.85
    x, y, w, h = refined[0].box
    assert refined[0].mask[y : y + h, x : x + w].sum() == refined[0].area_px == refined[0].mask.sum()
    pipeline = load_bmode_pipeline()
    info = pipeline.segmenter_info
    assert info.name == f"{entry.name} + {refiner[1].name}" and len(info.name) <= 64  # TID 4019 Algorithm Name is LO
    assert info.sha256 == f"{entry.sha256} + {refiner[1].sha256}"
    assert refiner[1].info in pipeline.model_infos  # a new refiner means new result UIDs
    analysis = pipeline.analyse(image)
    assert analysis.segmenter == info and analysis.lesions[0].area_px == refined[0].area_px


def _merge_roles(model_dir: str, prefix: str, count: int) -> None:
    """One export process: merges ``count`` entries of its own, one at a time."""
    from models.inference.registry import ModelEntry, merge_into_manifest

    for index in range(count):
        role = f"{prefix}_{index}"
        merge_into_manifest(
            Path(model_dir), {role: ModelEntry(role=role, name=role, version="1", file=f"{role}.onnx", sha256="0" * 64)}
        )


def test_side_by_side_exports_keep_every_entry(tmp_path: Path) -> None:
    """make train exports families beside the segmenter lane: no export may drop another's entry."""
    import multiprocessing

    from models.inference.registry import ModelEntry, merge_into_manifest, write_manifest

    write_manifest({}, tmp_path, default_pipelines={"US": ["dl_u"]})
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_merge_roles, args=(str(tmp_path), f"writer{w}", 15)) for w in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    entries = read_manifest(tmp_path)
    assert set(entries) == {f"writer{w}_{i}" for w in range(4) for i in range(15)}

    # a merge replaces only what it names; the default pipelines are kept unless the caller updates them
    merge_into_manifest(
        tmp_path, {"late": ModelEntry(role="late", name="late", version="2", file="late.json", sha256="1" * 64)}
    )
    import json

    body = json.loads((tmp_path / "manifest.json").read_text())
    assert len(body["models"]) == 61 and body["default_pipelines"] == {"US": ["dl_u"]}
    merge_into_manifest(tmp_path, {}, lambda pipelines: {**pipelines, "US": ["late", *pipelines["US"]]})
    assert json.loads((tmp_path / "manifest.json").read_text())["default_pipelines"] == {"US": ["late", "dl_u"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".manifest.lock",
        "manifest.json",
    ]  # no staging file left behind


def test_a_malformed_manifest_is_not_replaced_by_an_export(tmp_path: Path) -> None:
    from models.inference.registry import ModelEntry, merge_into_manifest

    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelRegistryError, match="malformed"):
        merge_into_manifest(
            tmp_path, {"dl_u": ModelEntry(role="dl_u", name="x", version="1", file="x.onnx", sha256="0" * 64)}
        )
    assert (tmp_path / "manifest.json").read_text() == "{not json"
