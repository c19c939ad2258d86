"""Trial, not a recipe: another family's network trained on the LH task, mixed with the bundled DLR_LH on validation.

    breastai evaluate ../shared/datasets --split val --output runs/val
    python research/trial_lh_members.py dl_u --seed 20261121 --bf16 --predictions runs/val/predictions.csv

DLR_LH (BI-RADS 2/3 vs 4/5) was the only LH model the service had, and seed
ensembles of it did not help (``docs/history.md``). What this trial found
for DL-U's network is now a recipe (``dl_u_lh``) and an opt-in served role
(``consensus_lh``, ``make train-lh-consensus``); the trial stays for the
other families' networks. This asks whether a
network of another architecture, trained on the same LH labels with its own
family's recipe (loss, ROI, epochs), adds to it: it trains that network
(stage ``network`` of ``breastai train``, one thread unless told) under
``runs/trial/FAMILY_lh_SEED``, scores the validation lesions in PyTorch on
the ground-truth box, and prints the validation AUC of the network alone,
of the bundled DLR_LH as served (from ``--predictions``) and of their equal
mean log-odds, over all validation lesions and BUS-BRA's. The scores are
kept as ``val_scores.npy`` beside the checkpoints so that mixes of several
trials can be scored too. Nothing is exported or served, and test is not
touched.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.evaluation.stats import auc
from models.training import train_family


def log_odds(probability: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    clipped = np.clip(probability, 1e-6, 1 - 1e-6)
    return np.asarray(np.log(clipped / (1 - clipped)))


def main(argv: list[str] | None = None) -> list[str]:
    """Train (unless ``--score-only``) and score one trial; returns the printed lines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=sorted(f for f, spec in train_family.FAMILIES.items() if spec.task == "malignancy" and f != "dl_m"))
    parser.add_argument("--seed", type=int, default=20261121)
    parser.add_argument("--datasets", default="../shared/datasets")
    parser.add_argument("--predictions", required=True, help="predictions.csv of `breastai evaluate --split val` with the bundled models")
    parser.add_argument("--work-root", default="runs/trial", help="the trial trains under WORK_ROOT/FAMILY_lh_SEED")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast, as `make train` uses where the CPU has it")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, help="default: the family's recipe")
    parser.add_argument("--batch-size", type=int, help="default: the family's recipe")
    parser.add_argument("--input-size", type=int, help="default: the family's recipe")
    parser.add_argument("--score-only", action="store_true", help="score a finished trial again without training")
    args = parser.parse_args(argv)
    overrides = [
        *(["--bf16"] if args.bf16 else []),
        *(option for name, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--input-size", args.input_size))
          if value is not None for option in (name, str(value))),
    ]

    lh_spec = train_family.FAMILIES["dlr_lh"]
    name = f"{args.family}_lh"
    spec = dataclasses.replace(train_family.FAMILIES[args.family], name=name, task=lh_spec.task, datasets=lh_spec.datasets)
    work = Path(args.work_root) / f"{name}_{args.seed}"
    # The trial's family exists only while it trains: nothing else in the process should see it.
    train_family.FAMILIES[name] = spec
    try:
        if not args.score_only:
            train_family.main(
                [name, "--stage", "network", "--datasets", args.datasets, "--threads", str(args.threads), "--seed", str(args.seed), "--work", str(work), *overrides]
            )
        samples = train_family.split_samples(spec, Path(args.datasets))["val"]
        size = int(json.loads((work / "config.json").read_text())["input_size"])
        scores = train_family.positive_scores(spec, train_family.load_best(spec, work), samples, size)
    finally:
        del train_family.FAMILIES[name]
    np.save(work / "val_scores.npy", scores)

    with open(args.predictions, newline="") as handle:
        served = {row["id"]: float(row["probability"]) for row in csv.DictReader(handle) if row["family"] == "dlr_lh"}
    dlr_lh = np.array([served[s.record.image_id] for s in samples])
    mixed = log_odds(scores) + log_odds(dlr_lh)
    labels = np.array([s.label for s in samples])
    lines = []
    for group, chosen in (("all", np.ones(len(samples), bool)), ("busbra", np.array([s.record.dataset == "busbra" for s in samples]))):
        y = labels[chosen]
        lines.append(
            f"{name} seed {args.seed} {group} n={chosen.sum()}: alone {auc(y, scores[chosen]):.3f}, "
            f"dlr_lh {auc(y, dlr_lh[chosen]):.3f}, mean log-odds {auc(y, mixed[chosen]):.3f}"
        )
        print(lines[-1])
    return lines


if __name__ == "__main__":
    main()
