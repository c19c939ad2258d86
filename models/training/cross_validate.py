"""Cross-validated accuracy of a family's recipe where one validation split is too small to say anything.

DL-M's validation split holds 12 mini-MIAS findings (3 malignant) and its
test split 22 (8): an epoch chosen on the first and an AUC read on the
second are both mostly chance. Here the training and validation findings
are pooled and dealt into K folds by patient (mini-MIAS: by woman), balanced
for the label. The recipe trains K times, each time without one fold, for a
fixed number of epochs, and scores the fold it left out with the *last*
epoch's weights, so no checkpoint is chosen on the cases it is scored on.

Each fold's network ranks only its own fold, so the headline AUC counts
(positive, negative) pairs within a fold only (:func:`within_fold_auc`),
with a 95 % interval from patient resamples drawn within each fold. The AUC
of all out-of-fold scores pooled is reported too; it also compares the
folds' networks' score levels, which no single served network has, so it
differs from the within-fold AUC (either way) where those levels differ.

The intervals and paired tests resample patients and hold each fold's
network fixed: they measure how the AUC varies with the findings, not with
another training run of the recipe (a different seed), which comes on top
when two recipes trained in separate runs are compared.

``--choose-epoch`` holds out an inner validation fold of each training part
and scores with the epoch chosen on it (as the other families choose theirs
on the fixed split), and scores the same runs' last epochs beside it: the
two rules compared on the same networks. ``--against`` compares two reports
of one family on the same findings and folds (paired patient bootstrap of
the within-fold AUC difference).

Only families whose served score is the network's own output (``dl_u``,
``dl_m``) are cross-validated: the others add a fitted stage (MLP, SVM,
prototype projection) that this does not repeat.

    breastai train crossval dl_m --folds 5 --report runs/crossval/dl_m.json --record models/cards/crossval/dl_m.json
    breastai train crossval dl_m --choose-epoch --report runs/crossval/dl_m-chosen-epoch.json --against
    runs/crossval/dl_m.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.errors import TrainingError
from models.evaluation.stats import auc, bootstrap_ci
from models.families.spec import FamilySpec
from models.training.loop import DEVICES, begin_run
from models.training.run_config import RUN_DEFINING, RunConfig
from models.training.samples import LesionSample, positive_scores, split_samples
from models.training.train_family import FAMILIES, train_network

#: Families whose served score is one network's output, so that cross-validating the network cross-validates the model
#: (a seed ensemble's served score is several networks' mean, which the folds here do not train).
CROSS_VALIDATED = tuple(sorted(name for name, spec in FAMILIES.items() if spec.finish is None and spec.ensemble == 1))


def patient_folds(samples: list[LesionSample], folds: int) -> list[int]:
    """Fold of each sample: all of one patient's samples in one fold, the folds balanced for the label.

    Patients are ordered by their label (1 if any of their lesions is
    positive), then by a stable hash of their key, and dealt round-robin,
    so each fold gets a near-equal share of each class whatever the order
    of the input.

    Raises
    ------
    TrainingError
        Fewer than 2 folds, or fewer patients than folds.
    """
    if folds < 2:
        raise TrainingError(f"cross-validation needs at least 2 folds, not {folds}")
    label_of: dict[str, int] = defaultdict(int)
    for sample in samples:
        label_of[sample.record.patient] = max(label_of[sample.record.patient], sample.label)
    if len(label_of) < folds:
        raise TrainingError(f"{len(label_of)} patients cannot fill {folds} folds")
    ordered = sorted(label_of, key=lambda patient: (label_of[patient], hashlib.sha256(patient.encode()).hexdigest()))
    fold_of = {patient: index % folds for index, patient in enumerate(ordered)}
    return [fold_of[sample.record.patient] for sample in samples]


def case_key(sample: LesionSample) -> str:
    """One finding's identity in a report (dataset/image id)."""
    return f"{sample.record.dataset}/{sample.record.image_id}"


def trained_model(spec: FamilySpec, work: Path, checkpoint: str) -> torch.nn.Module:
    """The fold's network from ``last.pt`` (the last epoch) or ``best.pt`` (the epoch chosen on its inner
    validation).
    """
    model = spec.build()
    model.load_state_dict(torch.load(work / checkpoint, map_location="cpu", weights_only=False)["model"])
    return model.eval()


def inner_split(kept: list[LesionSample], folds: int) -> tuple[list[LesionSample], list[LesionSample]]:
    """Training and inner-validation lesions out of a fold's training part: one of ``folds`` patient folds validates."""
    inner = patient_folds(kept, folds)
    return [s for s, f in zip(kept, inner, strict=False) if f != 0], [
        s for s, f in zip(kept, inner, strict=False) if f == 0
    ]


def findings_fingerprint(train: list[LesionSample], validation: list[LesionSample]) -> str:
    """sha256 of which findings a fold's run trains and validates on, so a resumed run is known to be the same one."""
    body = json.dumps({"train": sorted(map(case_key, train)), "val": sorted(map(case_key, validation))})
    return hashlib.sha256(body.encode()).hexdigest()


def fold_plans(
    pooled: list[LesionSample], assignment: list[int], folds: int, choose_epoch: bool
) -> list[tuple[list[LesionSample], list[LesionSample], list[LesionSample]]]:
    """(training, validation, held-out) lesions of each fold's run, checked before any of them trains.

    The run's validation set (the held-out fold itself, or with
    ``choose_epoch`` an inner fold of the training part) is scored every
    epoch, which needs both classes; without this check a fold short of one
    class would stop the command after the folds before it had trained.

    Raises
    ------
    TrainingError
        A validation set holds one class only (fewer patients of a class than folds).
    """
    plans = []
    for fold in range(folds):
        kept = [s for s, f in zip(pooled, assignment, strict=False) if f != fold]
        held_out = [s for s, f in zip(pooled, assignment, strict=False) if f == fold]
        train, validation = inner_split(kept, folds) if choose_epoch else (kept, held_out)
        if len({s.label for s in validation}) < 2:
            which = "the inner validation fold of fold" if choose_epoch else "fold"
            raise TrainingError(
                f"{which} {fold} holds one class only ({len(validation)} findings): "
                f"fewer than {folds} patients of a class; use fewer --folds"
            )
        plans.append((train, validation, held_out))
    return plans


def within_fold_auc(
    labels: npt.NDArray[np.int64], scores: npt.NDArray[np.float64], folds: npt.NDArray[np.int64]
) -> float:
    """AUC over the (positive, negative) pairs of one fold each, pooled over folds.

    Each fold's network ranks only its own fold's findings, so only pairs
    within a fold compare like with like; pairs across folds would also
    compare the folds' networks' calibrations, which the one served network
    does not have. Equals the folds' AUCs weighted by their pair counts.
    Folds with one class only add no pair.

    Raises
    ------
    TrainingError
        No fold holds both classes.
    """
    concordant, pairs = 0.0, 0
    for fold in np.unique(folds):
        inside = folds == fold
        positives, negatives = int(labels[inside].sum()), int((1 - labels[inside]).sum())
        if positives and negatives:
            concordant += auc(labels[inside], scores[inside]) * positives * negatives
            pairs += positives * negatives
    if not pairs:
        raise TrainingError("no fold holds both classes")
    return concordant / pairs


#: Draws allowed per kept resample before giving up (a draw without a fold holding both classes is drawn again).
MAX_DRAWS_PER_RESAMPLE = 20


def within_fold_bootstrap(
    labels: npt.NDArray[np.int64],
    score_sets: list[npt.NDArray[np.float64]],
    folds: npt.NDArray[np.int64],
    patients: list[str],
    resamples: int = 1000,
    seed: int = 0,
) -> npt.NDArray[np.float64]:
    """:func:`within_fold_auc` of every score set on ``resamples`` patient-level resamples drawn within each fold.

    Each fold keeps its number of patients, drawn with replacement from its
    own; every score set is measured on the same draw, so differences
    between them are paired. Returns shape (resamples, len(score_sets)).

    Raises
    ------
    TrainingError
        No fold holds both classes, or too few draws do to bootstrap.
    """
    within_fold_auc(labels, score_sets[0], folds)  # raises at once where no draw could ever hold a pair
    rng = np.random.default_rng(seed)
    members: list[list[npt.NDArray[np.int64]]] = []
    for fold in np.unique(folds):
        by_patient: dict[str, list[int]] = defaultdict(list)
        for position in np.flatnonzero(folds == fold):
            by_patient[patients[position]].append(int(position))
        members.append([np.asarray(v) for v in by_patient.values()])
    values = np.empty((resamples, len(score_sets)))
    drawn = attempts = 0
    while drawn < resamples:
        attempts += 1
        if attempts > MAX_DRAWS_PER_RESAMPLE * resamples:
            raise TrainingError(
                f"only {drawn} of {attempts} patient resamples held a fold with both classes: too few pairs to "
                f"bootstrap"
            )
        draw = np.concatenate(
            [np.concatenate([group[k] for k in rng.integers(0, len(group), len(group))]) for group in members]
        )
        try:
            values[drawn] = [within_fold_auc(labels[draw], scores[draw], folds[draw]) for scores in score_sets]
        except TrainingError:  # no fold of this draw holds both classes: drawn again, as stats.bootstrap_ci does
            continue
        drawn += 1
    return values


def _interval(values: npt.NDArray[np.float64]) -> list[float]:
    low, high = np.quantile(values, [0.025, 0.975])
    return [float(low), float(high)]


def _paired_difference(difference: float, draws: npt.NDArray[np.float64]) -> dict[str, Any]:
    """Difference of two within-fold AUCs, its paired-bootstrap interval and two-sided p (twice the share across 0).

    No difference at all gives p = 1. A p of 0 means no draw crossed 0: it
    is below 1 / len(draws), not zero, and the cards print it so.
    """
    if difference == 0:
        return {"delta_auc": 0.0, "delta_ci95": _interval(draws), "p_value": 1.0, "resamples": len(draws)}
    share = float(np.mean(draws <= 0)) if difference > 0 else float(np.mean(draws >= 0))
    return {
        "delta_auc": difference,
        "delta_ci95": _interval(draws),
        "p_value": min(1.0, 2 * share),
        "resamples": len(draws),
    }


def _fold_aucs(
    labels: npt.NDArray[np.int64], scores: npt.NDArray[np.float64], folds: npt.NDArray[np.int64]
) -> list[float | None]:
    return [
        auc(labels[folds == k], scores[folds == k]) if 0 < labels[folds == k].sum() < (folds == k).sum() else None
        for k in np.unique(folds)
    ]


def cross_validate(
    spec: FamilySpec, config: RunConfig, pooled: list[LesionSample], folds: int, choose_epoch: bool = False
) -> dict[str, Any]:
    """Train the recipe once per fold without it and score the fold it left out.

    ``choose_epoch`` False scores each fold with its run's last epoch (the
    fold is the run's validation set only to be logged). True holds out one
    of ``folds`` patient folds of each training part as an inner validation
    set, on which the epoch is chosen (``best.pt``) as the family recipes
    choose theirs on the fixed split; the same runs' last epochs are scored
    too, so the two rules are compared on the same networks.

    The headline AUC counts pairs within a fold only (:func:`within_fold_auc`),
    with a patient bootstrap within folds; the pooled AUC over all
    out-of-fold scores is reported beside it.
    """
    assignment = patient_folds(pooled, folds)
    plans = fold_plans(pooled, assignment, folds, choose_epoch)
    chosen: dict[str, float] = {}
    last: dict[str, float] = {}
    for fold, (train, validation, held_out) in enumerate(plans):
        run = replace(config, work=str(Path(config.work) / f"fold-{fold}"), part=f"{config.part}-fold-{fold}")
        # "findings": a finished fold trained on other data (another --datasets, new near-duplicates) must not be
        # reused.
        begin_run(
            run,
            (*RUN_DEFINING, "epochs", "folds", "choose_epoch", "findings"),
            extra={"folds": folds, "choose_epoch": choose_epoch, "findings": findings_fingerprint(train, validation)},
        )
        train_network(spec, run, {"train": train, "val": validation})
        last.update(
            zip(
                map(case_key, held_out),
                map(
                    float,
                    positive_scores(spec, trained_model(spec, Path(run.work), "last.pt"), held_out, run.input_size),
                ),
                strict=False,
            )
        )
        if choose_epoch:
            chosen.update(
                zip(
                    map(case_key, held_out),
                    map(
                        float,
                        positive_scores(spec, trained_model(spec, Path(run.work), "best.pt"), held_out, run.input_size),
                    ),
                    strict=False,
                )
            )
    scored = chosen if choose_epoch else last
    labels = np.asarray([s.label for s in pooled])
    fold_of = np.asarray(assignment)
    patients = [s.record.patient for s in pooled]
    scores = np.asarray([scored[case_key(s)] for s in pooled])
    last_scores = np.asarray([last[case_key(s)] for s in pooled])
    draws = within_fold_bootstrap(labels, [scores, last_scores], fold_of, patients)
    headline = within_fold_auc(labels, scores, fold_of)
    report: dict[str, Any] = {
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
        "bf16": config.bf16,
        "cases": len(pooled),
        "positives": int(labels.sum()),
        "patients": len(set(patients)),
        "auc": headline,
        "auc_ci95": _interval(draws[:, 0]),
        "auc_measure": "pairs within a fold only (each fold's network ranks its own findings); 95 % interval from 1000 "
        "patient resamples within folds",
        "fold_auc": _fold_aucs(labels, scores, fold_of),
        "auc_pooled": auc(labels, scores),
        "auc_pooled_ci95": list(bootstrap_ci(labels, scores, resamples=1000, clusters=patients)),
    }
    if choose_epoch:
        same_runs = within_fold_auc(labels, last_scores, fold_of)
        report["same_runs_last_epoch"] = {
            "auc": same_runs,
            "auc_ci95": _interval(draws[:, 1]),
            "fold_auc": _fold_aucs(labels, last_scores, fold_of),
            "chosen_minus_last": _paired_difference(headline - same_runs, draws[:, 0] - draws[:, 1]),
        }
    report["cases_by_key"] = {
        case_key(s): {"label": s.label, "patient": s.record.patient, "fold": f, "score": scored[case_key(s)]}
        for s, f in zip(pooled, assignment, strict=False)
    }
    return report


def compare(report: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Within-fold AUC difference of two reports of one family on the same findings and folds; paired patient bootstrap.

    Raises
    ------
    TrainingError
        The reports are of different families, or disagree on a finding's label, patient or fold.
    """
    if report["family"] != other["family"]:
        raise TrainingError(f"cannot compare a {report['family']} report with a {other['family']} one")
    keys = sorted(report["cases_by_key"])
    if set(keys) != set(other["cases_by_key"]):
        raise TrainingError("the two cross-validation reports did not score the same findings")
    mine, theirs = [report["cases_by_key"][k] for k in keys], [other["cases_by_key"][k] for k in keys]
    if any(
        (a["label"], a["patient"], a["fold"]) != (b["label"], b["patient"], b["fold"])
        for a, b in zip(mine, theirs, strict=False)
    ):
        raise TrainingError("the two cross-validation reports disagree on a finding's label, patient or fold")
    labels, folds = np.asarray([c["label"] for c in mine]), np.asarray([c["fold"] for c in mine])
    scores, other_scores = np.asarray([c["score"] for c in mine]), np.asarray([c["score"] for c in theirs])
    draws = within_fold_bootstrap(labels, [scores, other_scores], folds, [c["patient"] for c in mine])
    difference = within_fold_auc(labels, scores, folds) - within_fold_auc(labels, other_scores, folds)
    return {
        "against": {
            "init": other["init"],
            "scored_with": other["scored_with"],
            "auc": within_fold_auc(labels, other_scores, folds),
        },
        "cases": len(keys),
        **_paired_difference(difference, draws[:, 0] - draws[:, 1]),
    }


#: What makes two summaries the same recipe: a new run of it replaces the old one in a record.
RECIPE_KEYS = ("family", "init", "scored_with", "folds", "epochs", "seed", "bf16")


def record_summary(path: Path, summary: dict[str, Any]) -> None:
    """Keep ``summary`` in the JSON list at ``path``, replacing an earlier one of the same recipe
    (:data:`RECIPE_KEYS`).
    """
    records = json.loads(path.read_text()) if path.is_file() else []
    records = [r for r in records if any(r.get(k) != summary.get(k) for k in RECIPE_KEYS)] + [summary]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")


def read_report(path: Path) -> dict[str, Any]:
    """An earlier cross-validation report (``--against``); :class:`TrainingError` where it is missing or not one."""
    try:
        report = json.loads(path.read_text())
    except OSError as exc:
        raise TrainingError(f"--against {path}: cannot read it ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise TrainingError(f"--against {path} is not JSON: {exc}") from exc
    if not isinstance(report, dict) or not isinstance(report.get("cases_by_key"), dict):
        raise TrainingError(f"--against {path} is not a cross-validation report (it has no cases_by_key)")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=CROSS_VALIDATED)
    parser.add_argument("--datasets", default="../shared/datasets")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--work", default=None, help="checkpoint folder, one fold-K run inside (default runs/crossval/FAMILY[-init])"
    )
    parser.add_argument(
        "--report", required=True, help="where the JSON report (out-of-fold scores included) is written"
    )
    parser.add_argument(
        "--against",
        help=(
            "an earlier report of the same family: compare on the same findings (paired patient bootstrap of the "
            "within-fold AUC difference)"
        ),
    )
    parser.add_argument(
        "--record",
        help="also keep the summary (no per-finding scores) in this JSON list, replacing one of the same recipe: "
        "models/cards/crossval/FAMILY.json is what the family's model card shows",
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--init", default="", help="start every fold from this checkpoint (default: random weights)")
    parser.add_argument(
        "--choose-epoch",
        action="store_true",
        help=(
            "score each fold with the epoch chosen on an inner validation fold (and, beside it, the same runs' last "
            "epochs); default: the last epoch"
        ),
    )
    parser.add_argument("--seed", type=int, help="default: the family recipe's seed (FamilySpec.seed)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, not {args.epochs}")
    # Read before hours of training, so a missing or malformed file is found now.
    against = read_report(Path(args.against)) if args.against else None
    if against is not None and against.get("family") != args.family:
        raise TrainingError(f"--against {args.against} is a {against.get('family')} report, not {args.family}")
    spec = FAMILIES[args.family]
    suffix = ("-init" if args.init else "") + ("-chosen-epoch" if args.choose_epoch else "")
    config = RunConfig(
        part=f"crossval-{spec.name}",
        family=spec.name,
        datasets=args.datasets,
        work=args.work or f"runs/crossval/{spec.name}{suffix}",
        holdout="",
        epochs=spec.epochs if args.epochs is None else args.epochs,
        batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        input_size=spec.input_size,
        seed=args.seed if args.seed is not None else spec.seed,
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
        raise TrainingError(
            f"cross-validation needs both classes among the training and validation lesions of {config.datasets}"
        )
    report = cross_validate(spec, config, pooled, args.folds, args.choose_epoch)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")  # kept even if the comparison below refuses
    if against is not None:
        report["comparison"] = compare(report, against)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: v for k, v in report.items() if k != "cases_by_key"}
    if args.record:
        record_summary(Path(args.record), summary)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
