"""K-fold cross-validation of a family's recipe (DL-M on mini-MIAS): folds by patient, last-epoch scores, pooled AUC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from models.datasets import Record
from models.errors import TrainingError
from models.training.cross_validate import CROSS_VALIDATED, compare, main, patient_folds
from models.training.train_family import LesionSample


def _sample(patient: str, label: int, index: int) -> LesionSample:
    record = Record(
        dataset="mias",
        image_id=f"{patient}-{index}",
        image_path=Path("unused.png"),
        mask_path=None,
        malignant=label,
        patient=patient,
        device="mias",
        split="train",
    )
    return LesionSample(record, np.zeros((8, 8), np.uint8), (0, 0, 4, 4), label)


def test_folds_keep_a_patient_together_and_share_out_each_class() -> None:
    samples = [_sample(f"woman-{w}", int(w < 8), k) for w in range(20) for k in range(1 + w % 2)]
    folds = patient_folds(samples, 4)
    by_patient: dict[str, set[int]] = {}
    for sample, fold in zip(samples, folds, strict=False):
        by_patient.setdefault(sample.record.patient, set()).add(fold)
    assert all(len(f) == 1 for f in by_patient.values())
    positive_patients_per_fold = [
        sum(1 for p, f in by_patient.items() if f == {k} and int(p.split("-")[1]) < 8) for k in range(4)
    ]
    assert positive_patients_per_fold == [2, 2, 2, 2]
    assert patient_folds(list(reversed(samples)), 4) == list(
        reversed(folds)
    )  # the input order does not decide the folds
    with pytest.raises(TrainingError, match="at least 2 folds"):
        patient_folds(samples, 1)
    with pytest.raises(TrainingError, match="cannot fill"):
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


def _recording(monkeypatch: pytest.MonkeyPatch) -> tuple[list[dict[str, set[str]]], list[str]]:
    """Record what each fold's run trained and validated on, and which checkpoint scored a fold."""
    from models.training import cross_validate

    runs: list[dict[str, set[str]]] = []
    checkpoints: list[str] = []
    train_network, trained_model = cross_validate.train_network, cross_validate.trained_model

    def recording_train(spec, config, samples):  # type: ignore[no-untyped-def]
        runs.append(
            {split: {f"{s.record.dataset}/{s.record.image_id}" for s in part} for split, part in samples.items()}
        )
        train_network(spec, config, samples)

    def recording_model(spec, work, checkpoint):  # type: ignore[no-untyped-def]
        checkpoints.append(checkpoint)
        return trained_model(spec, work, checkpoint)

    monkeypatch.setattr(cross_validate, "train_network", recording_train)
    monkeypatch.setattr(cross_validate, "trained_model", recording_model)
    return runs, checkpoints


def test_cross_validation_scores_each_training_finding_once_with_a_network_that_never_saw_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.training.train_family import FAMILIES, split_samples

    datasets = _synthetic_mias(tmp_path / "datasets")
    report_file = tmp_path / "dl_m.json"
    runs, checkpoints = _recording(monkeypatch)
    options = [
        "dl_m",
        "--datasets",
        str(datasets),
        "--folds",
        "3",
        "--epochs",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
    ]
    main([*options, "--work", str(tmp_path / "work"), "--report", str(report_file)])
    report = json.loads(report_file.read_text())
    samples = split_samples(FAMILIES["dl_m"], datasets)
    pooled = {f"mias/{s.record.image_id}" for s in samples["train"] + samples["val"]}
    assert set(report["cases_by_key"]) == pooled and report["cases"] == len(pooled)
    assert not {f"mias/{s.record.image_id}" for s in samples["test"]} & set(report["cases_by_key"])
    assert 0.0 <= report["auc"] <= 1.0 and 0.0 <= report["auc_ci95"][0] <= report["auc_ci95"][1] <= 1.0
    assert sorted({c["fold"] for c in report["cases_by_key"].values()}) == [0, 1, 2]
    assert (
        len(runs) == 3 and checkpoints == ["last.pt"] * 3
    )  # the last epoch scored each fold, never the epoch best on it
    for fold, run in enumerate(runs):  # each fold's network trained without the findings it scored
        held_out = {k for k, c in report["cases_by_key"].items() if c["fold"] == fold}
        assert not run["train"] & held_out and run["train"] | held_out == pooled
        log = [json.loads(line) for line in (tmp_path / "work" / f"fold-{fold}" / "train.log").read_text().splitlines()]
        assert [entry["epoch"] for entry in log] == [0, 1]
        assert json.loads((tmp_path / "work" / f"fold-{fold}" / "config.json").read_text())["folds"] == 3
    # the same recipe against itself: no difference; a report of other findings or labels is refused
    assert compare(report, report)["delta_auc"] == 0.0
    relabelled = json.loads(json.dumps(report))
    first = next(iter(relabelled["cases_by_key"].values()))
    first["label"] = 1 - first["label"]
    with pytest.raises(TrainingError, match="disagree"):
        compare(report, relabelled)
    # a different recipe cannot resume in the same folder
    with pytest.raises(TrainingError, match="other settings"):
        main(
            [*options[:-4], "--epochs", "3", "--work", str(tmp_path / "work"), "--report", str(tmp_path / "other.json")]
        )
    # nor the same recipe on other findings: a finished fold may have trained on what is now held out
    assert "findings" in json.loads((tmp_path / "work" / "fold-0" / "config.json").read_text())
    labels_csv = datasets / "mias" / "labels.csv"
    header, _dropped, *rest = labels_csv.read_text().splitlines(keepends=True)
    labels_csv.write_text(header + "".join(rest))  # one image fewer (and every later finding's key moves)
    with pytest.raises(TrainingError, match="other settings"):
        main([*options, "--work", str(tmp_path / "work"), "--report", str(tmp_path / "fewer.json")])
    # an --against file that is not there is found before any training
    with pytest.raises(TrainingError, match=r"missing\.json"):
        main(
            [
                *options,
                "--work",
                str(tmp_path / "fresh"),
                "--report",
                str(tmp_path / "x.json"),
                "--against",
                str(tmp_path / "missing.json"),
            ]
        )
    assert not (tmp_path / "fresh").exists()


def test_within_fold_auc_counts_only_pairs_inside_a_fold() -> None:
    from models.training.cross_validate import within_fold_auc, within_fold_bootstrap

    labels = np.array([1, 0, 1, 0, 0])
    folds = np.array([0, 0, 1, 1, 1])
    # fold 0 ranks its pair right (1 of 1); fold 1 ranks 1 of its 2 pairs right; fold 1's scores are all higher than
    # fold 0's, so pooling would add cross-fold pairs: the within-fold AUC is (1 + 1) / 3
    scores = np.array([0.2, 0.1, 0.8, 0.9, 0.7])
    assert within_fold_auc(labels, scores, folds) == pytest.approx(2 / 3)
    draws = within_fold_bootstrap(labels, [scores, scores], folds, ["a", "b", "c", "d", "e"], resamples=50)
    assert draws.shape == (50, 2) and np.array_equal(draws[:, 0], draws[:, 1])
    with pytest.raises(TrainingError, match="both classes"):
        within_fold_auc(np.array([1, 0]), np.array([0.5, 0.5]), np.array([0, 1]))


def test_choosing_the_epoch_uses_an_inner_fold_of_the_training_part_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.training.cross_validate import inner_split

    samples = [_sample(f"woman-{w}", int(w < 8), k) for w in range(20) for k in range(1 + w % 2)]
    train, validation = inner_split(samples, 5)
    assert validation and train and len(train) + len(validation) == len(samples)
    assert not {s.record.patient for s in train} & {s.record.patient for s in validation}
    assert {s.label for s in validation} == {0, 1}

    datasets = _synthetic_mias(tmp_path / "datasets", women=20)
    report_file = tmp_path / "chosen.json"
    seen, checkpoints = _recording(monkeypatch)
    main(
        [
            "dl_m",
            "--datasets",
            str(datasets),
            "--folds",
            "3",
            "--epochs",
            "2",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--choose-epoch",
            "--work",
            str(tmp_path / "work"),
            "--report",
            str(report_file),
        ]
    )
    report = json.loads(report_file.read_text())
    assert report["scored_with"].startswith("the epoch chosen on an inner validation fold")
    assert len(seen) == 3 and sorted(checkpoints) == ["best.pt"] * 3 + ["last.pt"] * 3  # both rules, on the same runs
    same_runs = report["same_runs_last_epoch"]
    assert same_runs["chosen_minus_last"]["delta_auc"] == pytest.approx(report["auc"] - same_runs["auc"])
    for fold, run in enumerate(seen):  # the epoch was chosen on lesions of other folds, never on the ones it scored
        held_out = {k for k, c in report["cases_by_key"].items() if c["fold"] == fold}
        assert held_out and run["val"] and not (run["val"] | run["train"]) & held_out
        assert run["val"] | run["train"] | held_out == set(report["cases_by_key"])


def test_only_families_whose_score_is_the_network_are_cross_validated() -> None:
    assert CROSS_VALIDATED == ("dl_m", "dl_u")


def test_a_recorded_summary_replaces_the_same_recipe_and_reaches_the_card(tmp_path: Path) -> None:
    from models.evaluation.cards import _cross_validation_section, read_cross_validation
    from models.training.cross_validate import record_summary

    base = {
        "family": "dl_m",
        "init": "random",
        "scored_with": "last epoch",
        "folds": 5,
        "epochs": 30,
        "seed": 1,
        "cases": 73,
        "positives": 33,
        "patients": 65,
        "auc": 0.6,
        "auc_ci95": [0.5, 0.7],
        "fold_auc": [0.6, None, 0.7, 0.5, 0.6],
    }
    record = tmp_path / "crossval" / "dl_m.json"
    record_summary(record, base)
    record_summary(record, {**base, "scored_with": "chosen epoch", "auc": 0.5})
    record_summary(record, {**base, "auc": 0.65})  # the same recipe again: replaces its first run
    records = read_cross_validation(tmp_path / "crossval")["dl_m"]
    assert [(r["scored_with"], r["auc"]) for r in records] == [("chosen epoch", 0.5), ("last epoch", 0.65)]
    section = "\n".join(_cross_validation_section(records))
    assert "| 0.650 (0.500–0.700) | 0.60, –, 0.70, 0.50, 0.60 |" in section and "| 73 (33) |" in section


def test_the_bootstrap_draws_a_patients_findings_together_and_keeps_each_folds_size() -> None:
    from models.training.cross_validate import within_fold_bootstrap

    # Patient "p" has three findings in fold 0; every other patient one. Findings of one patient carry equal scores
    # and labels here, so each draw's AUC is a function of which patients it drew; with findings drawn one at a time,
    # p's three would come in counts other than 0, 3, 6, ... and the fold sizes would vary.
    labels = np.array([1, 1, 1, 0, 0, 1, 0, 0, 1, 0])
    folds = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    patients = ["p", "p", "p", "q", "r", "s", "t", "u", "v", "w"]
    rng = np.random.default_rng(3)
    scores = rng.random(10)
    scores[:3] = scores[0]
    drawn: list[np.ndarray] = []
    import models.training.cross_validate as cross_validate

    real = cross_validate.within_fold_auc

    def watching(labels_: np.ndarray, scores_: np.ndarray, folds_: np.ndarray) -> float:
        drawn.append(folds_.copy())
        return real(labels_, scores_, folds_)

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(cross_validate, "within_fold_auc", watching)
    try:
        values = within_fold_bootstrap(labels, [scores], folds, patients, resamples=200)
    finally:
        monkeypatch.undo()
    assert values.shape == (200, 1)
    resampled = drawn[1:]  # the first call is the up-front check on the data as it is
    # fold 0 has three patients (p, q, r): p brings 3 findings, q and r one each, so its size is 3 patients' worth
    sizes = {int((f == 0).sum()) for f in resampled}
    assert sizes <= {3, 5, 7, 9} and len(sizes) > 1
    assert {int((f == 1).sum()) for f in resampled} == {5}
    with pytest.raises(TrainingError, match="both classes"):
        within_fold_bootstrap(np.array([1, 0]), [np.array([0.2, 0.1])], np.array([0, 1]), ["a", "b"], resamples=5)


def test_paired_difference_p_value_counts_draws_on_the_far_side_of_zero() -> None:
    from models.evaluation.cards import _bootstrap_p
    from models.training.cross_validate import _paired_difference

    draws = np.array([-0.01] * 10 + [0.05] * 90)
    above = _paired_difference(0.04, draws)
    assert above["p_value"] == pytest.approx(0.2) and above["resamples"] == 100
    below = _paired_difference(-0.04, -draws)
    assert below["p_value"] == pytest.approx(0.2)
    assert _paired_difference(0.0, draws)["p_value"] == 1.0
    never = _paired_difference(0.05, np.full(1000, 0.05))
    assert never["p_value"] == 0.0 and _bootstrap_p(never) == "p < 0.001"
    assert _bootstrap_p(above) == "p = 0.20"


def test_a_fold_short_of_one_class_stops_before_any_training() -> None:
    from models.training.cross_validate import fold_plans, patient_folds

    # two malignant patients cannot give each of three folds a malignant finding
    samples = [_sample(f"woman-{w}", int(w < 2), 0) for w in range(9)]
    with pytest.raises(TrainingError, match="fold 0 holds one class only"):
        fold_plans(samples, patient_folds(samples, 3), 3, choose_epoch=False)
    plans = fold_plans(samples, patient_folds(samples, 2), 2, choose_epoch=False)
    assert [len(p[2]) for p in plans] == [5, 4]


def test_an_against_file_that_is_not_a_report_is_refused(tmp_path: Path) -> None:
    from models.training.cross_validate import read_report

    with pytest.raises(TrainingError, match="cannot read it"):
        read_report(tmp_path / "missing.json")
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(TrainingError, match="is not JSON"):
        read_report(tmp_path / "text.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(TrainingError, match="not a cross-validation report"):
        read_report(tmp_path / "list.json")
    (tmp_path / "report.json").write_text(json.dumps({"family": "dl_m", "cases_by_key": {}}))
    assert read_report(tmp_path / "report.json")["family"] == "dl_m"
