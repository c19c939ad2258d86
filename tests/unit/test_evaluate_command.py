"""breastai evaluate: the 4A tally and the command's refusal of unknown families."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.datasets import Record
from models.evaluation.command import ScoredCase, four_a_tally
from models.inference.findings import FamilyScore, ModelInfo
from models.inference.registry import BUNDLED_MODEL_DIR
from workers.cli import main


def _case(image_id: str, birads: str, malignant: int, probability: float, threshold: float) -> ScoredCase:
    record = Record(
        "breast_lesions", image_id, Path(f"{image_id}.png"), None, malignant, image_id, "x", "test", birads=birads
    )
    score = FamilyScore(
        "f",
        "malignancy",
        ModelInfo("m", "1", ""),
        probability,
        threshold,
        probability >= threshold,
        np.zeros((1, 1), np.float32),
        (0, 0, 1, 1),
    )
    return ScoredCase(record, malignant, score)


def test_four_a_tally_counts_only_4a_cases_by_recommendation() -> None:
    lh = [
        _case("a", "4a", 0, 0.1, 0.5),
        _case("b", "4a", 1, 0.9, 0.5),
        _case("c", "4a", 0, 0.9, 0.5),
        _case("d", "4b", 1, 0.9, 0.5),
    ]
    bm = [
        _case("a", "4a", 0, 0.2, 0.5),
        _case("b", "4a", 1, 0.8, 0.5),
        _case("c", "4a", 0, 0.1, 0.5),
        _case("d", "4b", 1, 0.9, 0.5),
    ]
    assert four_a_tally(lh, bm) == {
        "downgrade to BI-RADS 3": {"n": 1, "malignant": 0, "benign": 1},
        "keep BI-RADS 4A": {"n": 1, "malignant": 0, "benign": 1},
        "upgrade above BI-RADS 4A": {"n": 1, "malignant": 1, "benign": 0},
    }


def test_evaluate_refuses_a_family_the_model_folder_lacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models.errors import EvaluationError
    from models.evaluation.command import evaluate

    data = tmp_path / "site" / "images"
    data.mkdir(parents=True)
    (tmp_path / "site" / "masks").mkdir()
    (tmp_path / "site" / "labels.csv").write_text("id,label\n")
    with pytest.raises(EvaluationError, match="not_a_family"):
        evaluate(tmp_path / "site", BUNDLED_MODEL_DIR, ["not_a_family"], "all", tmp_path / "out")
    # the command line turns the library's refusal into a message and exit status 2, as for a bad setting
    assert (
        main(["evaluate", str(tmp_path / "site"), "--families", "not_a_family", "--output", str(tmp_path / "out")]) == 2
    )
    assert "breastai: models not_a_family are not in" in capsys.readouterr().err


def test_evaluate_refuses_a_model_whose_manifest_entry_is_incomplete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from models.inference.registry import ModelEntry, read_manifest, write_manifest

    models = tmp_path / "models"
    models.mkdir()
    entries = read_manifest()
    old = entries["dl_u"]
    parameters = {k: v for k, v in old.parameters.items() if k != "operating_point"}
    entries["dl_u"] = ModelEntry(old.role, old.name, old.version, old.file, old.sha256, parameters)
    write_manifest(entries, models)
    site = _synthetic_site(tmp_path, count=2)
    status = main(
        [
            "evaluate",
            str(site),
            "--split",
            "all",
            "--families",
            "dl_u",
            "--model-dir",
            str(models),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert status == 2
    assert "model dl_u: manifest field parameters.operating_point is missing" in capsys.readouterr().err


def _synthetic_site(root: Path, count: int = 6) -> Path:
    """A site folder of dark ovals on speckle (alternately labelled), with their masks."""
    import cv2

    site = root / "site"
    (site / "images").mkdir(parents=True)
    (site / "masks").mkdir()
    rng = np.random.default_rng(7)
    rows = ["id,label"]
    for index in range(count):
        image = np.clip(rng.normal(120, 25, (200, 260)), 0, 255).astype(np.uint8)
        mask = np.zeros_like(image)
        cv2.ellipse(mask, (130 + 5 * index, 100), (40 + 4 * index, 25), 0, 0, 360, 255, -1)
        image[mask > 0] = np.clip(rng.normal(35, 10, int((mask > 0).sum())), 0, 255).astype(np.uint8)
        cv2.imwrite(str(site / "images" / f"case{index}.png"), image)
        cv2.imwrite(str(site / "masks" / f"case{index}.png"), mask)
        rows.append(f"case{index},{'malignant' if index % 2 else 'benign'}")
    (site / "labels.csv").write_text("\n".join(rows) + "\n")
    return site


def test_evaluate_scores_the_consensus_as_its_members_combined(tmp_path: Path) -> None:
    import csv

    from models.inference.consensus import mean_log_odds
    from models.inference.manifest import ModelKind
    from models.inference.registry import read_manifest

    entries = read_manifest()
    role = next(r for r, e in entries.items() if e.kind is ModelKind.CONSENSUS)
    members = list(entries[role].parameters["members"])
    site = _synthetic_site(tmp_path)
    out = tmp_path / "out"
    main(
        [
            "evaluate",
            str(site),
            "--split",
            "all",
            "--families",
            ",".join([role, *members]),
            "--output",
            str(out),
            "--resamples",
            "20",
        ]
    )
    with (out / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    probability = {(r["family"], r["id"]): float(r["probability"]) for r in rows}
    ids = sorted({r["id"] for r in rows})
    assert len(ids) == 6
    for image_id in ids:
        expected = mean_log_odds([probability[(m, image_id)] for m in members])
        assert probability[(role, image_id)] == pytest.approx(expected, abs=2e-5)
    import json

    report = json.loads((out / "report.json").read_text())
    if "cldlr" in members:  # CLDLR is compared with the paper's image-only and clinical-only SVMs on the same cases
        pairs = {frozenset((c["family_a"], c["family_b"])) for c in report["families"]["cldlr"]["variants"]}
        assert {frozenset(("cldlr", "clinical only")), frozenset(("cldlr", "dlr only"))} <= pairs
        assert "cldlr: the paper's comparison models" in (out / "report.md").read_text()
    # asked alone, the consensus still scores its members, but reports only itself
    alone = tmp_path / "alone"
    main(["evaluate", str(site), "--split", "all", "--families", role, "--output", str(alone), "--resamples", "20"])
    with (alone / "predictions.csv").open(newline="") as handle:
        only = list(csv.DictReader(handle))
    assert {r["family"] for r in only} == {role}
    assert {r["id"]: float(r["probability"]) for r in only} == {i: probability[(role, i)] for i in ids}


def test_variant_predictions_come_from_every_case_or_not_at_all() -> None:
    from dataclasses import replace

    from models.evaluation.command import variant_predictions

    cases = [_case("a", "4a", 0, 0.2, 0.5), _case("b", "4b", 1, 0.8, 0.5)]
    with_details = [
        replace(c, score=replace(c.score, details={"dlr_only_probability": p, "network_probability": 0.5}))
        for c, p in zip(cases, (0.3, 0.7), strict=True)
    ]
    variants = variant_predictions(with_details)
    assert list(variants) == ["dlr only"]
    assert [(p.case_id, p.label, p.score) for p in variants["dlr only"]] == [("a", 0, 0.3), ("b", 1, 0.7)]
    assert variant_predictions([with_details[0], cases[1]]) == {}  # one case lacks it: no comparison


def test_a_stale_consensus_does_not_stop_evaluating_the_other_models(tmp_path: Path) -> None:
    """A site that retrained a member evaluates it and the segmenter before refitting the consensus; serving refuses."""
    import json

    from models.inference.manifest import ModelKind
    from models.inference.pipeline import load_bmode_pipeline
    from models.inference.registry import (
        BUNDLED_MODEL_DIR,
        ModelEntry,
        ModelRegistryError,
        read_manifest,
        sha256_of,
        write_manifest,
    )

    models = tmp_path / "models"
    models.mkdir()
    for item in BUNDLED_MODEL_DIR.iterdir():
        if item.suffix in (".onnx", ".npz") or item.name == "mupnet_prototypes.json":
            (models / item.name).symlink_to(item)
    entries = read_manifest()
    role = next(r for r, e in entries.items() if e.kind is ModelKind.CONSENSUS)
    body = json.loads((BUNDLED_MODEL_DIR / entries[role].file).read_text())
    body["members"]["dlr_bm"] = {"graph": "0" * 64}  # fitted on a dlr_bm the folder no longer has
    (models / entries[role].file).write_text(json.dumps(body))
    old = entries[role]
    entries[role] = ModelEntry(old.role, old.name, old.version, old.file, sha256_of(models / old.file), old.parameters)
    write_manifest(entries, models)
    with pytest.raises(ModelRegistryError, match="another dlr_bm"):
        load_bmode_pipeline(models)
    out = tmp_path / "out"
    main(
        [
            "evaluate",
            str(_synthetic_site(tmp_path)),
            "--split",
            "all",
            "--families",
            "dlr_bm",
            "--model-dir",
            str(models),
            "--output",
            str(out),
            "--resamples",
            "20",
        ]
    )
    report = json.loads((out / "report.json").read_text())
    assert report["families"]["dlr_bm"]["classification"]["all"]["n"] == 6
    assert report["segmentation"]["all"]["n"] == 6


def test_the_radiologists_birads_is_reported_beside_the_families_on_the_same_lesions(tmp_path: Path) -> None:
    import csv
    import json

    site = _synthetic_site(tmp_path, count=8)
    categories = ["2", "5", "3", "4", "4a", "", "0", "4c"]  # "" (no category) and 0 (incomplete) are left out
    rows = [f"case{i},{'malignant' if i % 2 else 'benign'},{category}" for i, category in enumerate(categories)]
    (site / "labels.csv").write_text("id,label,birads\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    main(["evaluate", str(site), "--split", "all", "--families", "dl_u", "--output", str(out), "--resamples", "20"])
    report = json.loads((out / "report.json").read_text())
    reader = report["families"]["birads_reader"]
    overall = reader["classification"]["all"]
    assert (overall["n"], overall["n_positive"]) == (6, 3)
    assert overall["auc"] == 1.0  # 4, 4c and 5 (malignant) above 2, 3 and 4a (benign)
    assert overall["sensitivity"] == 1.0 and overall["specificity"] == pytest.approx(2 / 3)  # 4a: biopsy recommended
    assert "malignancy" not in report["comparisons"]  # one model: nothing to compare among the models
    (comparison,) = report["comparisons_with_readers"]["malignancy"]
    assert {comparison["family_a"], comparison["family_b"]} == {"dl_u", "birads_reader"} and comparison["n_common"] == 6
    with (out / "predictions.csv").open(newline="") as handle:
        reader_rows = [r for r in csv.DictReader(handle) if r["family"] == "birads_reader"]
    assert sorted(r["id"] for r in reader_rows) == ["case0", "case1", "case2", "case3", "case4", "case7"]
    assert "Not a model" in (out / "report.md").read_text()


def test_labelled_rows_without_an_image_are_counted_and_named_not_silently_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    site = _synthetic_site(tmp_path, count=4)
    rows = (site / "labels.csv").read_text().splitlines()
    (site / "labels.csv").write_text(
        "\n".join([*rows, f"lost1,{rows[1].split(',', 1)[1]}", f"lost2,{rows[2].split(',', 1)[1]}"]) + "\n"
    )
    out = tmp_path / "out"
    main(["evaluate", str(site), "--split", "all", "--families", "dl_u", "--output", str(out), "--resamples", "20"])
    report = json.loads((out / "report.json").read_text())
    assert report["rows_without_image"] == {"count": 2, "first": [f"{site.name}/lost1", f"{site.name}/lost2"]}
    assert report["families"]["dl_u"]["classification"]["all"]["n"] == 4  # the four with images are scored
    assert "2 labelled row(s) have no image" in capsys.readouterr().err
    assert (out / "report.md").read_text().startswith("**2 labelled row(s) had no image")


def test_external_validation_refuses_a_held_out_set_that_is_not_there(tmp_path: Path) -> None:
    from models.errors import TrainingError
    from models.training.external import main as external_main

    with pytest.raises(TrainingError, match="not a dataset folder"):
        external_main(["--holdout", "busbra", "--datasets", str(tmp_path), "--cards", str(tmp_path / "cards")])
    assert not (tmp_path / "cards").exists()


def test_external_validation_passes_the_pretraining_only_the_options_that_mean_the_same_to_it() -> None:
    from models.training.external import _shared_options

    options = [
        "--epochs",
        "30",
        "--bf16",
        "--threads",
        "2",
        "--input-size=64",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--seed",
        "7",
        "--threads",
    ]
    # A trailing flag without its value is dropped.
    assert _shared_options(options) == ["--bf16", "--threads", "2", "--input-size=64", "--device", "cpu", "--seed", "7"]


def test_mask_pretraining_recipes_are_those_of_the_reference_families() -> None:
    from models.training.mask_pretraining import REFERENCE_MASK_PRETRAINING, mask_pretraining_recipe

    assert mask_pretraining_recipe("dlr_bm") == (12, 32) and mask_pretraining_recipe("cldlr") == (10, 32)
    assert mask_pretraining_recipe("mupnet") == (20, 32)
    assert mask_pretraining_recipe("dl_u") == (20, 32)  # no reference recipe: the command's plain default
    # make train-FAMILY pretrains exactly the families whose reference recipe has it, in the same job, then trains
    # from their own checkpoint.
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    listed = next(line for line in makefile.splitlines() if line.startswith("MASK_PRETRAINED :="))
    assert sorted(listed.split(",", 1)[1].rstrip(")").split()) == sorted(REFERENCE_MASK_PRETRAINING)
    for family in ("dlr_lh", "dlr_bm", "cldlr", "dl_u", "dl_m", "mupnet"):
        plan = [line for line in _make_plan(f"train-{family}") if "breastai train" in line]
        if family in REFERENCE_MASK_PRETRAINING:
            assert plan[0].startswith(f".venv/bin/breastai train pretrain {family}")
            assert (
                plan[1].startswith(f".venv/bin/breastai train {family} ")
                and f"--init runs/pretrain-masks/{family}/best.pt" in plan[1]
            )
            assert len(plan) == 2
        else:
            assert len(plan) == 1 and "--init" not in plan[0]


def test_external_validation_refuses_pretrained_weights_that_saw_the_held_out_set(tmp_path: Path) -> None:
    from models.training.external import main as external_main

    with pytest.raises(SystemExit) as raised:
        external_main(["--holdout", "busbra", "--datasets", str(tmp_path), "--init", "runs/pretrain/dl_u/encoder.pt"])
    assert raised.value.code == 2


def test_evaluating_one_folder_does_not_score_the_mammograms_beside_it(tmp_path: Path) -> None:
    import json

    import cv2

    site = _synthetic_site(tmp_path, count=4)
    mias = tmp_path / "mias"
    (mias / "images").mkdir(parents=True)
    cv2.imwrite(str(mias / "images" / "mdb001.png"), np.full((128, 128), 90, np.uint8))
    (mias / "labels.csv").write_text(
        "id,ref,tissue,abnormality,severity,x,y,radius,image_id\nmias_mdb001,mdb001,G,CIRC,M,64,64,20,mdb001\n"
    )
    out = tmp_path / "out"
    main(
        ["evaluate", str(site), "--split", "all", "--families", "dl_u,dl_m", "--output", str(out), "--resamples", "20"]
    )
    report = json.loads((out / "report.json").read_text())
    assert "classification" in report["families"]["dl_u"]
    assert report["families"]["dl_m"] == {"note": "no labelled lesion for this task in the data"}
    main(
        [
            "evaluate",
            str(mias),
            "--split",
            "all",
            "--families",
            "dl_m",
            "--output",
            str(tmp_path / "mg"),
            "--resamples",
            "20",
        ]
    )
    assert (
        json.loads((tmp_path / "mg" / "report.json").read_text())["families"]["dl_m"]["classification"]["all"]["n"] == 1
    )


def _make_plan(*arguments: str) -> list[str]:
    """What ``make -n ARGUMENTS`` would run, from the checkout's root, outside any make running this test."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    environment = {
        k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    }
    done = subprocess.run(
        ["make", "-n", *arguments], cwd=root, env=environment, capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.splitlines()


def test_make_train_runs_the_segmenter_lane_beside_the_families() -> None:
    """make train's plan (make -n): two stages at a time, each told its thread share, the lexicon after the export."""

    def plan(*variables: str) -> list[str]:
        return _make_plan("train", *variables)

    lines = plan("TRAIN_THREADS=1")
    assert any(line.startswith("make -j2 ") and line.endswith("train-stages") for line in lines)
    stages = [line for line in lines if "models.training.train_reference" in line or "breastai train" in line]
    trained = [
        line for line in stages if "breastai train lexicon" not in line and "breastai train consensus" not in line
    ]
    assert trained and all(line.endswith("--threads 1") or "--threads 1 " in line for line in trained)
    for family in ("dlr_lh", "dlr_bm", "cldlr", "dl_u", "dl_m", "mupnet"):
        assert any(f"breastai train {family} " in line for line in stages)
    order = [
        next(i for i, line in enumerate(lines) if needle in line)
        for needle in (
            "train_reference segmenter",
            "train_reference refiner",
            "models.training.export_reference",
            "breastai train lexicon",
            "breastai train consensus",
            "breastai evaluate",
        )
    ]
    assert order == sorted(order)
    # the longest family (DLR_BM, with its pretraining) is the first the second lane takes
    families = [
        line.split()[2]
        for line in lines
        if line.startswith(".venv/bin/breastai train ") and line.split()[2] not in ("lexicon", "consensus", "pretrain")
    ]
    assert families[0] == "dlr_bm" and sorted(families) == sorted(
        ["dlr_bm", "dlr_lh", "mupnet", "cldlr", "dl_u", "dl_m"]
    )
    assert any(line.startswith("make -j1 ") for line in plan("TRAIN_JOBS=1"))


def test_make_train_lh_consensus_trains_the_second_lh_network_then_fits_the_lh_consensus() -> None:
    """The opt-in LH consensus (not in make train): dl_u_lh's recipe, then the consensus refitted for birads_high."""
    lines = _make_plan("train-lh-consensus")
    trained = next(i for i, line in enumerate(lines) if line.startswith(".venv/bin/breastai train dl_u_lh "))
    fitted = next(i for i, line in enumerate(lines) if "breastai train consensus --task birads_high " in line)
    assert trained < fitted
    assert not any("breastai train dl_u_lh " in line for line in _make_plan("train", "TRAIN_THREADS=1"))


STAND_IN_STAGE = """#!/bin/sh
# stands in for a training stage: logs its start and end, and takes a time of the real stage's order
case "$*" in
  *"train_reference segmenter"*|*"train_reference refiner"*|*"pretrain dlr_bm"*) t=0.8;;
  *"train dlr_bm"*) t=1.2;; *"train dlr_lh"*) t=1.0;; *"train mupnet"*) t=0.4;; *) t=0.2;;
esac
echo "START $*" >> "$STAGE_LOG"
sleep $t
echo "END $*" >> "$STAGE_LOG"
"""


def test_make_train_keeps_two_lanes_busy_longest_first(tmp_path: Path) -> None:
    """make -j2 train-stages with stand-in stages: the real scheduling, not a dry run."""
    import os
    import subprocess

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stage = venv / "bin" / "stage"
    stage.write_text(STAND_IN_STAGE)
    stage.chmod(0o755)
    for name in ("breastai", "python"):
        (venv / "bin" / name).symlink_to(stage)
    (venv / ".stamp-serve").touch()
    (venv / ".stamp-train").touch()  # newer than .stamp-serve and pyproject.toml: nothing to install
    log = tmp_path / "stages.log"
    environment = {
        k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    }
    subprocess.run(
        ["make", "-j2", "--no-print-directory", f"VENV={venv}", "THREAD_FLAGS=--threads 1", "train-stages"],
        cwd=Path(__file__).resolve().parents[2],
        env={**environment, "STAGE_LOG": str(log)},
        capture_output=True,
        timeout=120,
        check=True,
    )
    events = [line.split(" ", 1) for line in log.read_text().splitlines()]
    starts = [what for event, what in events if event == "START"]
    # the segmenter lane and the longest family begin together
    first_two = starts[:2]
    assert any("models.training.train_reference segmenter" in what for what in first_two)
    assert any(what.startswith("train pretrain dlr_bm ") for what in first_two)
    # the lexicon starts as soon as the export it reads has ended, in the same lane
    export_end = events.index(["END", next(what for event, what in events if "export_reference" in what)])
    assert events[export_end + 1][0] == "START" and events[export_end + 1][1].startswith("train lexicon")
    # every family once, after its pretraining where it has one; never more than two stages at once
    for family in ("dlr_bm", "dlr_lh", "mupnet", "cldlr", "dl_u", "dl_m"):
        assert sum(what.startswith(f"train {family} ") for what in starts) == 1
    for family in ("dlr_bm", "mupnet", "cldlr"):
        assert starts.index(next(w for w in starts if w.startswith(f"train pretrain {family} "))) < starts.index(
            next(w for w in starts if w.startswith(f"train {family} "))
        )
    running = 0
    for event, _ in events:
        running += 1 if event == "START" else -1
        assert running <= 2
