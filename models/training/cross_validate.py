"""Cross-validated accuracy of a family's recipe where one validation split is too small to say anything.

DL-M's validation split holds 12 mini-MIAS findings (3 malignant) and its
test split 22 (8): an epoch chosen on the first and an AUC read on the
second are both mostly chance. Here the training and validation findings
are pooled and dealt into K folds by patient (mini-MIAS: by woman), balanced
for the label. The recipe trains K times, each time without one fold, for a
fixed number of epochs, and the fold it left out is scored with the *last*
epoch's weights, so no checkpoint is chosen on the cases it is scored on.
The K held-out folds' scores are pooled into one out-of-fold AUC with a
patient-level bootstrap interval (:func:`models.evaluation.bootstrap_ci`).
Test findings are never read.

``--choose-epoch`` scores each fold instead as the recipe runs on the fixed
split: with the epoch chosen on an inner validation fold of its training
part. Two recipes (say, random weights against ``--init`` from another network)
are compared on the same findings with ``--against``: the clustered DeLong
test of :func:`models.evaluation.delong_test` on their out-of-fold scores.

Only families whose served score is the network's own output (``dl_u``,
``dl_m``) are cross-validated: the others add a fitted stage (MLP, SVM,
prototype projection) that this does not repeat.

    breastai train crossval dl_m --folds 5 --report runs/crossval/dl_m.json
    breastai train crossval dl_m --init runs/families/dl_u/best.pt --report runs/crossval/dl_m-from-dl_u.json --against runs/crossval/dl_m.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.evaluation import auc, bootstrap_ci, delong_test
from models.training.loop import DEVICES, check_resumable, seed_everything
from models.training.train_family import (
    FAMILIES,
    FINISHERS,
    RUN_DEFINING,
    FamilySpec,
    LesionSample,
    RunConfig,
    positive_scores,
    split_samples,
    train_network,
)

#: Families whose served score is the network's output, so that cross-validating the network cross-validates the model.
CROSS_VALIDATED = tuple(sorted(name for name in FAMILIES if name not in FINISHERS))


def patient_folds(samples: list[LesionSample], folds: int) -> list[int]:
    """Fold of each sample: all of one patient's samples in one fold, the folds balanced for the label.

    Patients are ordered by their label (1 if any of their lesions is
    positive), then by a stable hash of their key, and dealt round-robin,
    so each fold gets a near-equal share of each class whatever the order
    of the input.
    """
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, not {folds}")
    label_of: dict[str, int] = defaultdict(int)
    for sample in samples:
        label_of[sample.record.patient] = max(label_of[sample.record.patient], sample.label)
    if len(label_of) < folds:
        raise ValueError(f"{len(label_of)} patients cannot fill {folds} folds")
    ordered = sorted(label_of, key=lambda patient: (label_of[patient], hashlib.sha256(patient.encode()).hexdigest()))
    fold_of = {patient: index % folds for index, patient in enumerate(ordered)}
    return [fold_of[sample.record.patient] for sample in samples]


def case_key(sample: LesionSample) -> str:
    """One finding's identity in a report (dataset/image id)."""
    return f"{sample.record.dataset}/{sample.record.image_id}"


def trained_model(spec: FamilySpec, work: Path, checkpoint: str) -> torch.nn.Module:
    """The fold's network from ``last.pt`` (the last epoch) or ``best.pt`` (the epoch chosen on its inner validation)."""
    model = spec.build()
    model.load_state_dict(torch.load(work / checkpoint, map_location="cpu", weights_only=False)["model"])
    return model.eval()


def inner_split(kept: list[LesionSample], folds: int) -> tuple[list[LesionSample], list[LesionSample]]:
    """Training and inner-validation lesions out of a fold's training part: one of ``folds`` patient folds validates."""
    inner = patient_folds(kept, folds)
    return [s for s, f in zip(kept, inner) if f != 0], [s for s, f in zip(kept, inner) if f == 0]


def cross_validate(spec: FamilySpec, config: RunConfig, pooled: list[LesionSample], folds: int, choose_epoch: bool = False) -> dict[str, Any]:
    """Train the recipe once per fold without it, score the fold it left out; pool the held-out scores.

    ``choose_epoch`` False scores each fold with its run's last epoch. True
    is the recipe as it runs on the fixed split: a fold's training part
    gives up one of ``folds`` patient folds as an inner validation set, on
    which the epoch is chosen (``best.pt``), and that epoch scores the fold.
    """
    assignment = patient_folds(pooled, folds)
    scores: dict[str, float] = {}
    fold_auc: list[float | None] = []
    for fold in range(folds):
        kept = [s for s, f in zip(pooled, assignment) if f != fold]
        held_out = [s for s, f in zip(pooled, assignment) if f == fold]
        train, validation = inner_split(kept, folds) if choose_epoch else (kept, held_out)
        run = replace(config, work=str(Path(config.work) / f"fold-{fold}"), part=f"{config.part}-fold-{fold}")
        settings = {**asdict(run), "folds": folds, "choose_epoch": choose_epoch}
        check_resumable(Path(run.work), settings, (*RUN_DEFINING, "epochs", "folds", "choose_epoch"))
        Path(run.work).mkdir(parents=True, exist_ok=True)
        (Path(run.work) / "config.json").write_text(json.dumps(settings, indent=2))
        seed_everything(run.seed)
        # Without choose_epoch the held-out fold is the run's "val" only to be logged: last.pt scores it, not best.pt.
        train_network(spec, run, {"train": train, "val": validation})
        model = trained_model(spec, Path(run.work), "best.pt" if choose_epoch else "last.pt")
        fold_scores = positive_scores(spec, model, held_out, run.input_size)
        scores.update({case_key(s): float(v) for s, v in zip(held_out, fold_scores)})
        labels = [s.label for s in held_out]
        fold_auc.append(auc(labels, fold_scores) if 0 < sum(labels) < len(labels) else None)
    labels = [s.label for s in pooled]
    pooled_scores = [scores[case_key(s)] for s in pooled]
    patients = [s.record.patient for s in pooled]
    low, high = bootstrap_ci(labels, pooled_scores, resamples=1000, clusters=patients)
    return {
        "family": spec.name,
        "folds": folds,
        "epochs": config.epochs,
        "scored_with": (
            f"the epoch chosen on an inner validation fold (one of {folds} patient folds of the training part)"
            if choose_epoch
            else "last epoch of each fold's run (no checkpoint chosen on the fold it scores)"
        ),
        "init": config.init or "random",
        "seed": config.seed,
        "cases": len(pooled),
        "positives": int(sum(labels)),
        "patients": len(set(patients)),
        "auc": auc(labels, pooled_scores),
        "auc_ci95": [low, high],
        "fold_auc": fold_auc,
        "cases_by_key": {case_key(s): {"label": s.label, "patient": s.record.patient, "fold": f, "score": scores[case_key(s)]} for s, f in zip(pooled, assignment)},
    }


def compare(report: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Clustered DeLong test of two cross-validation reports on the findings both scored."""
    keys = sorted(set(report["cases_by_key"]) & set(other["cases_by_key"]))
    if not keys:
        raise SystemExit("the two cross-validation reports share no finding")
    cases = [report["cases_by_key"][k] for k in keys]
    result = delong_test(
        [c["label"] for c in cases], [c["score"] for c in cases], [other["cases_by_key"][k]["score"] for k in keys], clusters=[c["patient"] for c in cases]
    )
    return {
        "against": {"init": other["init"], "scored_with": other["scored_with"], "auc": result.auc_b},
        "cases": len(keys),
        "delta_auc": result.difference,
        "p_value": result.p_value,
    }


#: What makes two summaries the same recipe: a new run of it replaces the old one in a record.
RECIPE_KEYS = ("family", "init", "scored_with", "folds", "epochs", "seed")


def record_summary(path: Path, summary: dict[str, Any]) -> None:
    """Keep ``summary`` in the JSON list at ``path``, replacing an earlier one of the same recipe (:data:`RECIPE_KEYS`)."""
    records = json.loads(path.read_text()) if path.is_file() else []
    records = [r for r in records if any(r.get(k) != summary.get(k) for k in RECIPE_KEYS)] + [summary]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=CROSS_VALIDATED)
    parser.add_argument("--datasets", default="../shared/datasets")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--work", default=None, help="checkpoint folder, one fold-K run inside (default runs/crossval/FAMILY[-init])")
    parser.add_argument("--report", required=True, help="where the JSON report (out-of-fold scores included) is written")
    parser.add_argument("--against", help="an earlier report of the same family: compare on the same findings (DeLong)")
    parser.add_argument(
        "--record", help="also keep the summary (no per-finding scores) in this JSON list, replacing one of the same recipe: "
        "models/cards/crossval/FAMILY.json is what the family's model card shows",
    )
    parser.add_argument("--epochs", type=int, help="default: the recipe's")
    parser.add_argument("--init", default="", help="start every fold from this checkpoint (default: random weights)")
    parser.add_argument(
        "--choose-epoch", action="store_true",
        help="score each fold with the epoch chosen on an inner validation fold, as the recipe chooses it on its split (default: the last epoch)",
    )
    parser.add_argument("--seed", type=int, default=20261121)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    args = parser.parse_args(argv)
    spec = FAMILIES[args.family]
    suffix = ("-init" if args.init else "") + ("-chosen-epoch" if args.choose_epoch else "")
    config = RunConfig(
        part=f"crossval-{spec.name}",
        family=spec.name,
        datasets=args.datasets,
        work=args.work or f"runs/crossval/{spec.name}{suffix}",
        holdout="",
        epochs=args.epochs or spec.epochs,
        batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        input_size=spec.input_size,
        seed=args.seed,
        threads=args.threads,
        max_minutes=float("inf"),
        bf16=args.bf16,
        device=args.device,
        init=args.init,
    )
    if config.threads:
        torch.set_num_threads(config.threads)
    samples = split_samples(spec, Path(config.datasets))
    pooled = samples["train"] + samples["val"]
    if len({s.label for s in pooled}) < 2:
        raise SystemExit(f"cross-validation needs both classes among the training and validation lesions of {config.datasets}")
    try:
        report = cross_validate(spec, config, pooled, args.folds, args.choose_epoch)
    except ValueError as exc:
        parser.error(str(exc))
    if args.against:
        report["comparison"] = compare(report, json.loads(Path(args.against).read_text()))
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: v for k, v in report.items() if k != "cases_by_key"}
    if args.record:
        record_summary(Path(args.record), summary)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
