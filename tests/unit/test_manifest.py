"""The typed manifest: enums parsed once at load, and refusals that name the model and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from models.errors import ManifestError, ModelRegistryError
from models.inference.family_scorer import load_family_scorer
from models.inference.manifest import (
    ConsensusSpec,
    LexiconSpec,
    Modality,
    ModelKind,
    NetworkSpec,
    Normalisation,
    Precision,
    RefinerSpec,
    SegmenterSpec,
    Task,
    parse_spec,
)
from models.inference.pipeline import load_bmode_pipeline
from models.inference.registry import BUNDLED_MODEL_DIR, MANIFEST_NAME, ModelEntry, merge_into_manifest, read_manifest

SMALL = ("us_segmenter", "us_refiner", "dl_u", "cldlr")  # a segmentation, a family without and one with side files
REMOVE: Any = object()  # a change that deletes the field


def _small_folder(
    tmp_path: Path, change: dict[str, dict[str, Any]] | None = None, pipeline: tuple[str, ...] = ("dl_u",)
) -> Path:
    """A model folder holding :data:`SMALL` from the bundle, with ``change[role]`` merged into its parameters.

    The files are links to the bundled ones: a test that alters a file must replace the link, never write through it.
    """
    bundled = json.loads((BUNDLED_MODEL_DIR / MANIFEST_NAME).read_text())["models"]
    models: dict[str, Any] = {}
    for role in SMALL:
        entry = json.loads(json.dumps(bundled[role]))
        entry["parameters"].update((change or {}).get(role, {}))
        entry["parameters"] = {k: v for k, v in entry["parameters"].items() if v is not REMOVE}
        models[role] = entry
        for name in [entry["file"], *(side["file"] for side in entry["parameters"].get("side_files", {}).values())]:
            if not (tmp_path / name).exists():
                (tmp_path / name).symlink_to(BUNDLED_MODEL_DIR / name)
    body = {"models": models, "default_pipelines": {"US": list(pipeline)}}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(body))
    return tmp_path


def _replace_with_altered_copy(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.unlink()  # the link to the bundled file, not the file
    path.write_bytes(bytes(data))


def test_the_bundled_manifest_parses_into_its_kinds_and_enums() -> None:
    entries = read_manifest()
    specs = {role: entry.spec for role, entry in entries.items()}
    assert isinstance(specs["us_segmenter"], SegmenterSpec) and specs["us_segmenter"].kind is ModelKind.SEGMENTER
    assert isinstance(specs["us_refiner"], RefinerSpec) and specs["us_refiner"].window_expand == 0.25
    assert isinstance(specs["consensus"], ConsensusSpec) and specs["consensus"].precision is Precision.JSON_MEMBER_LIST
    assert isinstance(specs["lexicon"], LexiconSpec) and set(specs["lexicon"].segmentation) == {
        "us_segmenter",
        "us_refiner",
    }
    dlr_lh, dl_u, dl_m = (entries[r].spec_as(NetworkSpec) for r in ("dlr_lh", "dl_u", "dl_m"))
    assert dlr_lh.task is Task.BIRADS_HIGH and dlr_lh.int8_weights and dlr_lh.precision is Precision.FLOAT16
    assert (
        dl_u.task is Task.MALIGNANCY
        and dl_u.roi.normalisation is Normalisation.MINMAX
        and dl_u.roi.expand_shortest_side
    )
    assert not dl_u.int8_weights and dl_m.modality is Modality.MG
    assert entries["cldlr"].spec_as(NetworkSpec).roi.normalisation is Normalisation.ZSCORE
    assert set(entries["cldlr"].spec.side_files) == {"cldlr", "clinical", "dlr"}
    # the typed fields are the manifest's own values, and what only records provenance stays whole beside them
    assert dlr_lh.operating_point == entries["dlr_lh"].parameters["operating_point"]
    assert dlr_lh.provenance["training"] == entries["dlr_lh"].parameters["training"]
    assert "operating_point" not in dlr_lh.provenance
    assert {spec.kind for spec in specs.values()} == set(ModelKind)


def test_an_entry_stays_constructible_and_writable_as_training_makes_it(tmp_path: Path) -> None:
    # an export merges a half-made entry into a folder: listing it is not serving it
    merge_into_manifest(
        tmp_path, {"draft": ModelEntry(role="draft", name="d", version="1", file="d.onnx", sha256="0" * 64)}
    )
    draft = read_manifest(tmp_path)["draft"]
    assert draft.parameters == {} and draft.kind is ModelKind.FAMILY
    with pytest.raises(ManifestError, match=r"model draft: manifest field parameters\.task is missing"):
        draft.spec  # noqa: B018


def test_a_served_model_without_an_operating_point_refuses_naming_the_model_and_the_field(tmp_path: Path) -> None:
    folder = _small_folder(tmp_path, {"dl_u": {"operating_point": REMOVE}})
    assert "dl_u" in read_manifest(folder)  # read, but not served
    with pytest.raises(ManifestError, match=r"model dl_u: manifest field parameters\.operating_point is missing"):
        load_bmode_pipeline(folder)
    # the service refuses to start: the command line turns it into a configuration error
    from service.errors import ConfigurationError
    from workers.cli import _pipeline

    with pytest.raises(ConfigurationError, match="operating_point"):
        _pipeline(folder, ())


def test_a_consensus_and_a_lexicon_model_need_their_operating_point_too() -> None:
    for parameters in (
        {"kind": "consensus", "task": "malignancy", "members": ["a"]},
        {"kind": "lexicon", "task": "malignancy"},
    ):
        with pytest.raises(ManifestError, match=r"model x: manifest field parameters\.operating_point is missing"):
            parse_spec("x", parameters)


def test_a_missing_side_file_refuses_naming_the_model_and_the_field(tmp_path: Path) -> None:
    folder = _small_folder(tmp_path, pipeline=("cldlr",))
    (folder / "cldlr_svm_clinical.npz").unlink()
    field = r"manifest field parameters\.side_files\.clinical\.file"
    message = rf"model cldlr: side file .*cldlr_svm_clinical\.npz \({field}\) is missing"
    with pytest.raises(ModelRegistryError, match=message):
        load_bmode_pipeline(folder)


def test_a_side_file_whose_sha256_differs_refuses(tmp_path: Path) -> None:
    folder = _small_folder(tmp_path)
    _replace_with_altered_copy(folder / "cldlr_svm_dlr.npz")
    with pytest.raises(
        ModelRegistryError, match=r"model cldlr: .* manifest field parameters\.side_files\.dlr\.sha256 says"
    ):
        load_family_scorer(read_manifest(folder)["cldlr"], folder)


def test_a_model_file_whose_sha256_differs_refuses(tmp_path: Path) -> None:
    folder = _small_folder(tmp_path)
    _replace_with_altered_copy(folder / "dl_u.onnx")
    with pytest.raises(
        ModelRegistryError, match=r"model dl_u: model file .*dl_u\.onnx has sha256 [0-9a-f]{64}, manifest field sha256"
    ):
        load_bmode_pipeline(folder)
    (folder / "dl_u.onnx").unlink()
    with pytest.raises(
        ModelRegistryError, match=r"model dl_u: model file .*dl_u\.onnx \(manifest field file\) is missing"
    ):
        load_bmode_pipeline(folder)


def test_an_unknown_task_refuses_naming_the_model_and_the_field(tmp_path: Path) -> None:
    folder = _small_folder(tmp_path, {"dl_u": {"task": "birads_4a"}})
    with pytest.raises(
        ManifestError, match=r"model dl_u: manifest field parameters\.task has unknown value 'birads_4a'"
    ):
        load_bmode_pipeline(folder)


@pytest.mark.parametrize(
    "role,change,field",
    [
        ("dl_u", {"roi_normalisation": "percentile"}, "roi_normalisation"),
        ("dl_u", {"precision": "int4"}, "precision"),
        ("dl_u", {"modality": "MR"}, "modality"),
        ("dl_u", {"kind": "ensemble"}, "kind"),
        ("dl_u", {"operating_point": 1.5}, "operating_point"),
        ("dl_u", {"operating_point": "0.4"}, "operating_point"),
        ("dl_u", {"roi_expand": REMOVE}, "roi_expand"),
        ("us_segmenter", {"threshold": REMOVE}, "threshold"),
        ("us_refiner", {"window_expand": REMOVE}, "window_expand"),
    ],
)
def test_other_bad_fields_refuse_naming_the_model_and_the_field(
    tmp_path: Path, role: str, change: dict[str, Any], field: str
) -> None:
    folder = _small_folder(tmp_path, {role: change})
    with pytest.raises(ManifestError, match=rf"model {role}: manifest field parameters\.{field} "):
        load_bmode_pipeline(folder)


def test_a_model_trained_on_square_roi_windows_is_refused_not_served_otherwise(tmp_path: Path) -> None:
    # Serving cuts no square windows since that trial was not adopted: such a model would see crops unlike its own.
    folder = _small_folder(tmp_path, {"dl_u": {"roi_square": True}})
    with pytest.raises(ManifestError, match=r"model dl_u: manifest field parameters\.roi_square is true"):
        load_bmode_pipeline(folder)
    bundled = read_manifest()["dl_u"].parameters
    for absent_or_off in ({}, {"roi_square": False}, {"roi_square": None}):
        spec = parse_spec("dl_u", {**bundled, **absent_or_off})
        assert isinstance(spec, NetworkSpec) and spec.roi == read_manifest()["dl_u"].spec_as(NetworkSpec).roi
        assert "roi_square" not in spec.provenance
    with pytest.raises(ManifestError, match=r"model dl_u: manifest field parameters\.roi_square must be true or false"):
        parse_spec("dl_u", {**bundled, "roi_square": "yes"})


def test_a_segmenter_named_as_a_family_is_refused(tmp_path: Path) -> None:
    folder = _small_folder(tmp_path)
    with pytest.raises(ModelRegistryError, match="model us_segmenter is a segmenter model: it does not score lesions"):
        load_bmode_pipeline(folder, families=["us_segmenter"])
