"""The numpy SVM against scikit-learn, Platt scaling, DICOM clinical variables, and the serving scorer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from sklearn.svm import SVC

from models.families.dlr import network as dlr
from models.inference.family_scorer import ClinicalContext, FamilyScorer, diameter_inputs, load_family_scorer
from models.inference.registry import ModelEntry, ModelRegistryError, sha256_of
from models.inference.svm import SvmModel, fit_platt
from workers.clinical import patient_age_years


def _fitted(rng: np.random.Generator) -> tuple[SVC, SvmModel, np.ndarray]:
    x = rng.normal(size=(120, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(0, 0.5, 120) > 0).astype(int)
    machine = SVC(kernel="rbf", C=1.0, gamma="scale").fit(x, y)
    model = SvmModel(
        mean=np.zeros(5),
        scale=np.ones(5),
        support_vectors=machine.support_vectors_,
        dual_coefficients=machine.dual_coef_[0],
        intercept=float(machine.intercept_[0]),
        gamma=float(machine._gamma),
        platt_a=-1.0,
        platt_b=0.0,
    )
    return machine, model, x


def test_numpy_svm_matches_sklearn_decision_and_round_trips(tmp_path: Path) -> None:
    machine, model, x = _fitted(np.random.default_rng(0))
    assert np.allclose(model.decision(x), machine.decision_function(x), atol=1e-8)
    model.save(tmp_path / "svm.npz")
    loaded = SvmModel.load(tmp_path / "svm.npz")
    # support vectors are stored as float32: decisions agree to float32 precision
    assert np.allclose(loaded.decision(x), machine.decision_function(x), atol=1e-4)
    assert np.allclose(loaded.probability(x), 1 / (1 + np.exp(-machine.decision_function(x))), atol=1e-4)


def test_platt_recovers_a_known_sigmoid() -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-1.5 * f + 0.4))).astype(int)
    a, b = fit_platt(f, y)
    assert a == pytest.approx(-1.5, abs=0.08) and b == pytest.approx(0.4, abs=0.08)


@pytest.mark.parametrize(
    "attributes,expected",
    [
        ({"PatientAge": "045Y"}, 45.0),
        ({"PatientAge": "006M"}, 0.5),
        ({"PatientBirthDate": "19700101", "StudyDate": "20200101"}, 50.0),
        ({"PatientAge": "", "PatientBirthDate": "", "StudyDate": "20200101"}, None),
        ({"PatientAge": "45"}, None),
    ],
)
def test_patient_age(attributes: dict[str, str], expected: float | None) -> None:
    ds = pydicom.Dataset()
    for key, value in attributes.items():
        setattr(ds, key, value)
    age = patient_age_years(ds)
    assert (age is None) if expected is None else age == pytest.approx(expected, abs=0.01)


def test_diameter_needs_spacing() -> None:
    assert diameter_inputs((0, 0, 100, 40), None) == [0.0, 0.0]
    assert diameter_inputs((0, 0, 100, 40), 0.1) == [pytest.approx(0.2), 1.0]


def _dlr_model(tmp_path: Path) -> ModelEntry:
    torch.manual_seed(0)
    wrapper = dlr.DLRExportWrapper(dlr.DLRNet(depth=18), dlr.AgeFusionMLP()).eval()
    path = tmp_path / "dlr_bm.onnx"
    torch.onnx.export(
        wrapper,
        (torch.zeros(1, 1, 64, 64), torch.zeros(1, 2)),
        str(path),
        input_names=["image", "clinical"],
        output_names=["logits", "image_logits", "cam"],
        opset_version=18,
        dynamo=False,
    )
    parameters = {
        "family": "dlr_bm",
        "task": "malignancy",
        "input_size": 64,
        "inputs": ["image", "clinical"],
        "roi_expand": 0.2,
        "roi_normalisation": "zscore",
        "precision": "float32",
        "operating_point": 0.4,
    }
    return ModelEntry("dlr_bm", "test-dlr", "0.0.1", path.name, sha256_of(path), parameters)


def test_scorer_runs_an_exported_family_and_reports_missing_age(tmp_path: Path) -> None:
    entry = _dlr_model(tmp_path)
    scorer = load_family_scorer(entry, tmp_path)
    gray = np.random.default_rng(2).integers(0, 255, (200, 300), dtype=np.uint8)
    without = scorer.score(gray, (100, 50, 60, 40))
    with_age = scorer.score(gray, (100, 50, 60, 40), ClinicalContext(age_years=64))
    assert 0.0 <= without.probability <= 1.0 and without.positive == (without.probability >= 0.4)
    assert without.roi_box == (88, 42, 84, 56)  # 20 % growth on every side
    assert without.cam.shape == (56, 84) and without.cam.min() >= 0.0 and without.cam.max() <= 1.0
    assert any("age not available" in note for note in without.notes) and not with_age.notes
    assert with_age.probability != without.probability  # age reaches the MLP


def test_scorer_refuses_a_side_file_that_does_not_match(tmp_path: Path) -> None:
    entry = _dlr_model(tmp_path)
    (tmp_path / "svm.npz").write_bytes(b"not the fitted machine")
    parameters = {**entry.parameters, "side_files": {"cldlr": {"file": "svm.npz", "sha256": "0" * 64}}}
    changed = ModelEntry(entry.role, entry.name, entry.version, entry.file, entry.sha256, parameters)
    with pytest.raises(ModelRegistryError, match="sha256"):
        load_family_scorer(changed, tmp_path)
    assert isinstance(load_family_scorer(entry, tmp_path), FamilyScorer)
    json.dumps(parameters)  # manifest parameters stay JSON


def test_bundled_cldlr_also_scores_the_papers_comparison_svms() -> None:
    from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest

    scorer = load_family_scorer(read_manifest()["cldlr"], BUNDLED_MODEL_DIR)
    gray = np.random.default_rng(4).integers(0, 255, (200, 300), dtype=np.uint8)
    box = (100, 50, 60, 40)
    young = scorer.score(gray, box, ClinicalContext(age_years=30, pixel_spacing_mm=0.1))
    old = scorer.score(gray, box, ClinicalContext(age_years=80, pixel_spacing_mm=0.1))
    for score in (young, old):
        assert {"dlr_only_probability", "clinical_only_probability", "network_probability"} <= set(score.details)
        assert all(0.0 <= float(score.details[k]) <= 1.0 for k in ("dlr_only_probability", "clinical_only_probability"))
    assert young.details["dlr_only_probability"] == pytest.approx(
        old.details["dlr_only_probability"]
    )  # image features only
    assert young.details["clinical_only_probability"] != pytest.approx(
        old.details["clinical_only_probability"]
    )  # age reaches it


@pytest.mark.parametrize(
    "context,expected_notes",
    [
        (ClinicalContext(age_years=55, pixel_spacing_mm=0.1), set()),
        (ClinicalContext(age_years=None, pixel_spacing_mm=0.1), {"patient age not available to the SVM"}),
        (ClinicalContext(age_years=55, pixel_spacing_mm=None), {"pixel spacing unknown: lesion size not used"}),
        (ClinicalContext(), {"patient age not available to the SVM", "pixel spacing unknown: lesion size not used"}),
    ],
)
def test_bundled_cldlr_scores_without_a_clinical_variable_and_says_which(
    context: ClinicalContext, expected_notes: set[str]
) -> None:
    # The issue: CLDLR "runs, and says so, when one is missing"; the notes reach the SR's comment (test_sr_writer).
    from models.inference.registry import BUNDLED_MODEL_DIR, read_manifest

    scorer = load_family_scorer(read_manifest()["cldlr"], BUNDLED_MODEL_DIR)
    gray = np.random.default_rng(4).integers(0, 255, (200, 300), dtype=np.uint8)
    score = scorer.score(gray, (100, 50, 60, 40), context)
    assert set(score.notes) == expected_notes
    assert 0.0 <= score.probability <= 1.0 and score.positive == (
        score.probability >= float(read_manifest()["cldlr"].parameters["operating_point"])
    )
