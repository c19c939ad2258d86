"""K-fold cross-validation of a family's recipe (DL-M on mini-MIAS): folds by patient, last-epoch scores, pooled AUC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from models.training.cross_validate import CROSS_VALIDATED, compare, main, patient_folds  # noqa: E402
from models.training.data import Record  # noqa: E402
from models.training.train_family import LesionSample  # noqa: E402


def _sample(patient: str, label: int, index: int) -> LesionSample:
    record = Record(dataset="mias", image_id=f"{patient}-{index}", image_path=Path("unused.png"), mask_path=None,
                    malignant=label, patient=patient, device="mias", split="train")
    return LesionSample(record, np.zeros((8, 8), np.uint8), (0, 0, 4, 4), label)


def test_folds_keep_a_patient_together_and_share_out_each_class() -> None:
    samples = [_sample(f"woman-{w}", int(w < 8), k) for w in range(20) for k in range(1 + w % 2)]
    folds = patient_folds(samples, 4)
    by_patient: dict[str, set[int]] = {}
    for sample, fold in zip(samples, folds):
        by_patient.setdefault(sample.record.patient, set()).add(fold)
    assert all(len(f) == 1 for f in by_patient.values())
    positive_patients_per_fold = [sum(1 for p, f in by_patient.items() if f == {k} and int(p.split("-")[1]) < 8) for k in range(4)]
    assert positive_patients_per_fold == [2, 2, 2, 2]
    assert patient_folds(list(reversed(samples)), 4) == list(reversed(folds))  # the input order does not decide the folds
    with pytest.raises(ValueError, match="at least 2 folds"):
        patient_folds(samples, 1)
    with pytest.raises(ValueError, match="cannot fill"):
        patient_folds(samples[:3], 4)


def _synthetic_mias(root: Path, women: int = 16) -> Path:
    """Two MLO views a woman, one finding each; malignant findings bright, benign ones dim (the label is learnable)."""
    import cv2

    folder = root / "mias"
    (folder / "images").mkdir(parents=True)
    rows = ["id,ref,tissue,abnormality,severity,x,y,radius,image_id"]
    rng = np.random.default_rng(0)
    for number in range(1, 2 * women + 1):
        malignant = ((number + 1) // 2) % 2 == 0
        image = rng.normal(60, 10, (128, 128)).clip(0, 255).astype(np.uint8)
        cv2.circle(image, (64, 64), 14, 200 if malignant else 110, -1)
        name = f"mdb{number:03d}"
        cv2.imwrite(str(folder / "images" / f"{name}.png"), image)
        rows.append(f"mias_{name},{name},G,CIRC,{'M' if malignant else 'B'},64,64,14,{name}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_cross_validation_scores_each_training_finding_once_with_a_network_that_never_saw_it(tmp_path: Path) -> None:
    from models.training.train_family import FAMILIES, split_samples

    datasets = _synthetic_mias(tmp_path / "datasets")
    report_file = tmp_path / "dl_m.json"
    options = ["dl_m", "--datasets", str(datasets), "--folds", "3", "--epochs", "2", "--threads", "1", "--device", "cpu"]
    main([*options, "--work", str(tmp_path / "work"), "--report", str(report_file)])
    report = json.loads(report_file.read_text())
    samples = split_samples(FAMILIES["dl_m"], datasets)
    pooled = {f"mias/{s.record.image_id}" for s in samples["train"] + samples["val"]}
    assert set(report["cases_by_key"]) == pooled and report["cases"] == len(pooled)
    assert not {f"mias/{s.record.image_id}" for s in samples["test"]} & set(report["cases_by_key"])
    assert 0.0 <= report["auc"] <= 1.0 and report["auc_ci95"][0] <= report["auc"] <= report["auc_ci95"][1]
    assert sorted({c["fold"] for c in report["cases_by_key"].values()}) == [0, 1, 2]
    for fold in range(3):  # each fold's network trained without the findings it scored
        log = [json.loads(line) for line in (tmp_path / "work" / f"fold-{fold}" / "train.log").read_text().splitlines()]
        assert [entry["epoch"] for entry in log] == [0, 1]
        assert json.loads((tmp_path / "work" / f"fold-{fold}" / "config.json").read_text())["folds"] == 3
    # the same recipe against itself: no difference
    assert compare(report, report)["delta_auc"] == 0.0
    # a different recipe cannot resume in the same folder
    with pytest.raises(SystemExit, match="other settings"):
        main([*options[:-4], "--epochs", "3", "--work", str(tmp_path / "work"), "--report", str(tmp_path / "other.json")])


def test_choosing_the_epoch_uses_an_inner_fold_of_the_training_part_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.training import cross_validate
    from models.training.cross_validate import inner_split

    samples = [_sample(f"woman-{w}", int(w < 8), k) for w in range(20) for k in range(1 + w % 2)]
    train, validation = inner_split(samples, 5)
    assert validation and train and len(train) + len(validation) == len(samples)
    assert not {s.record.patient for s in train} & {s.record.patient for s in validation}
    assert {s.label for s in validation} == {0, 1}

    datasets = _synthetic_mias(tmp_path / "datasets", women=20)
    report_file = tmp_path / "chosen.json"
    seen: list[dict[str, set[str]]] = []
    original = cross_validate.train_network

    def recording(spec, config, samples):  # type: ignore[no-untyped-def]
        seen.append({split: {f"{s.record.dataset}/{s.record.image_id}" for s in part} for split, part in samples.items()})
        original(spec, config, samples)

    monkeypatch.setattr(cross_validate, "train_network", recording)
    main(["dl_m", "--datasets", str(datasets), "--folds", "3", "--epochs", "2", "--threads", "1", "--device", "cpu", "--choose-epoch",
          "--work", str(tmp_path / "work"), "--report", str(report_file)])
    report = json.loads(report_file.read_text())
    assert report["scored_with"].startswith("the epoch chosen on an inner validation fold")
    assert len(seen) == 3
    for fold, run in enumerate(seen):  # the epoch was chosen on lesions of other folds, never on the ones it scored
        held_out = {k for k, c in report["cases_by_key"].items() if c["fold"] == fold}
        assert held_out and run["val"] and not (run["val"] | run["train"]) & held_out
        assert run["val"] | run["train"] | held_out == set(report["cases_by_key"])


def test_only_families_whose_score_is_the_network_are_cross_validated() -> None:
    assert CROSS_VALIDATED == ("dl_m", "dl_u")


def test_dl_m_exports_the_last_epoch_of_its_schedule_and_its_card_says_so(tmp_path: Path) -> None:
    import torch

    from models.cards import _weights_chosen
    from models.registry import read_manifest
    from models.training import train_family

    datasets = _synthetic_mias(tmp_path / "datasets", women=24)  # 24: the validation women include both classes
    work, models = tmp_path / "work", tmp_path / "models"
    train_family.main(["dl_m", "--datasets", str(datasets), "--work", str(work), "--output", str(models), "--epochs", "3", "--threads", "1", "--device", "cpu"])
    training = read_manifest(models)["dl_m"].parameters["training"]
    assert training["last_epoch"] == 2 and "best_epoch" not in training
    assert _weights_chosen(training).startswith("the last epoch (2) of the fixed schedule")
    last = torch.load(work / "last.pt", map_location="cpu", weights_only=False)
    exported = train_family.load_best(train_family.FAMILIES["dl_m"], work)
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in last["model"].items())
    # the families that choose on validation still do
    assert train_family.chosen_checkpoint(work).name == "best.pt"


def test_a_recorded_summary_replaces_the_same_recipe_and_reaches_the_card(tmp_path: Path) -> None:
    from models.cards import _cross_validation_section, read_cross_validation
    from models.training.cross_validate import record_summary

    base = {"family": "dl_m", "init": "random", "scored_with": "last epoch", "folds": 5, "epochs": 30, "seed": 1,
            "cases": 73, "positives": 33, "patients": 65, "auc": 0.6, "auc_ci95": [0.5, 0.7], "fold_auc": [0.6, None, 0.7, 0.5, 0.6]}
    record = tmp_path / "crossval" / "dl_m.json"
    record_summary(record, base)
    record_summary(record, {**base, "scored_with": "chosen epoch", "auc": 0.5})
    record_summary(record, {**base, "auc": 0.65})  # the same recipe again: replaces its first run
    records = read_cross_validation(tmp_path / "crossval")["dl_m"]
    assert [(r["scored_with"], r["auc"]) for r in records] == [("chosen epoch", 0.5), ("last epoch", 0.65)]
    section = "\n".join(_cross_validation_section(records))
    assert "0.650 (0.500–0.700)" in section and "0.60, –, 0.70" in section and "73 findings" in section
