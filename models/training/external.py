"""External validation in one command: train without a dataset, test on all of it.

``breastai train external --holdout busbra`` trains each consensus member
with ``--holdout busbra`` (:func:`models.training.train_family.split_samples`
drops that dataset from training and validation), fits their consensus on the
validation split of the remaining datasets, scores every model as served on
*all* images of the held-out dataset (``breastai evaluate DATA/busbra --split
all``), and writes one card, ``models/cards/external/without_<holdout>.md``.

Families whose reference recipe starts from mask pretraining
(:data:`models.training.mask_pretraining.REFERENCE_MASK_PRETRAINING`) get
it here too, with the same epochs, run without the held-out dataset
(``runs/pretrain-masks/FAMILY-without-HOLDOUT``), so the external figure is
that of the shipped recipes. Nothing of the held-out dataset takes part in
pretraining, in training, in the choice of a checkpoint, or in either
operating point. Each step is resumable: the family
recipes keep their checkpoints (default ``runs/families/FAMILY-without-HOLDOUT``)
and a rerun continues where the last one stopped. The weights stay in
``runs/external-HOLDOUT/weights`` and are not shipped.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from models.errors import TrainingError
from models.evaluation.cards import external_card
from models.training.fit_consensus import DEFAULT_MEMBERS, fit_consensus


def run_external(
    datasets: Path,
    holdout: str,
    families: Sequence[str],
    work: Path | None,
    cards: Path | None,
    train_options: Sequence[str] = (),
    resamples: int = 1000,
    pretrain_epochs: int | None = None,
) -> dict[str, Any]:
    """Train ``families`` without ``holdout``, fit their consensus, evaluate on all of ``holdout``.

    Returns
    -------
    dict
        The evaluation report (also written, with its PNGs, to
        ``<work>/evaluation``); the card goes to ``cards/without_<holdout>.md``
        when ``cards`` is given.

    Raises
    ------
    TrainingError
        ``holdout`` is not a dataset folder under ``datasets``, or ``families`` is empty or names a family
        that is not a trainable one.
    """
    if not (datasets / holdout / "labels.csv").is_file():
        raise TrainingError(f"external: {datasets / holdout} is not a dataset folder (images/, masks/, labels.csv)")
    from models.evaluation.command import evaluate
    from models.training import train_family

    unknown = [f for f in families if f not in train_family.FAMILIES]
    if unknown or not families:
        # Found before the first family trains for hours, not when its turn comes.
        raise TrainingError(
            f"external: --families {','.join(families) or '(none)'}: "
            + (f"no family {', '.join(unknown)}; " if unknown else "")
            + f"one or more of {', '.join(sorted(train_family.FAMILIES))}"
        )

    root = work or Path(f"runs/external-{holdout}")
    weights = root / "weights"
    for family in families:
        family_work = ["--work", str(root / family)] if work is not None else []
        pretrain_work = root / f"pretrain-masks-{family}" if work is not None else None
        start = pretrain_without(family, datasets, holdout, pretrain_work, train_options, pretrain_epochs)
        init = ["--init", str(start / "best.pt")] if start is not None else []
        train_family.main(
            [
                family,
                "--datasets",
                str(datasets),
                "--holdout",
                holdout,
                "--output",
                str(weights),
                *family_work,
                *init,
                *train_options,
            ]
        )
    roles = list(families)
    if len(families) > 1:
        fit_consensus(datasets, weights, families, holdout)
        roles = ["consensus", *families]
    report = evaluate(datasets / holdout, weights, roles, "all", root / "evaluation", resamples=resamples)
    if cards is not None:
        write_external_card(report, root, holdout, families, cards)
    return report


def pretrain_without(
    family: str,
    datasets: Path,
    holdout: str,
    work: Path | None,
    train_options: Sequence[str],
    epochs: int | None = None,
) -> Path | None:
    """Run ``family``'s reference mask pretraining without ``holdout``; its checkpoint folder (None: no recipe).

    Resumable like the pretraining itself. ``epochs`` overrides the recipe's.
    Of the family options only those that mean the same to the pretraining
    (``--bf16``, ``--threads``, ``--input-size``, ``--device``) are passed on.
    """
    from models.training.mask_pretraining import REFERENCE_MASK_PRETRAINING, main

    if family not in REFERENCE_MASK_PRETRAINING:
        return None
    folder = work or Path(f"runs/pretrain-masks/{family}-without-{holdout}")
    shared = _shared_options(train_options)
    if epochs is not None:
        shared += ["--epochs", str(epochs)]
    main(
        [
            family,
            "--holdout",
            holdout,
            "--datasets",
            str(datasets),
            "--work",
            str(folder),
            *shared,
        ]
    )
    return folder


# A family's seed is its pretraining's too (FamilySpec.seed seeds both by default), so a --seed given to one reaches
# both.
SHARED_WITH_PRETRAINING = ("--threads", "--input-size", "--device", "--seed")


def _shared_options(train_options: Sequence[str]) -> list[str]:
    """``--bf16``, ``--threads N``, ``--input-size N``, ``--device D`` and ``--seed S`` (either spelling) out of the
    family options.
    """
    shared: list[str] = []
    for index, option in enumerate(train_options):
        if option == "--bf16" or option.startswith(tuple(f"{name}=" for name in SHARED_WITH_PRETRAINING)):
            shared.append(option)
        elif option in SHARED_WITH_PRETRAINING and index + 1 < len(train_options):
            shared.extend(train_options[index : index + 2])
    return shared


def write_external_card(report: dict[str, Any], root: Path, holdout: str, families: Sequence[str], cards: Path) -> Path:
    """``cards/without_<holdout>.md`` and its ROC plot from the run in ``root`` (weights and evaluation)."""
    from models.evaluation.command import READER_ROLE

    cards.mkdir(parents=True, exist_ok=True)
    roles = [role for role in ("consensus", *families, READER_ROLE) if role in report["families"]]
    recipe = f"breastai train external --holdout {holdout} --families {','.join(families)}"
    notes = _training_notes(root / "weights", families)
    roc = root / "evaluation" / "roc_malignancy.png"
    if roc.is_file():
        shutil.copyfile(roc, cards / f"roc_without_{holdout}.png")
        notes.append(f"ROC curves of every model above: `roc_without_{holdout}.png`.")
    card = cards / f"without_{holdout}.md"
    card.write_text(external_card(report, roles, holdout, recipe, notes))
    return card


def _training_notes(weights: Path, families: Sequence[str]) -> list[str]:
    """One line per family: lesions it was trained and validated on, and the epoch validation chose."""
    manifest = json.loads((weights / "manifest.json").read_text())["models"]
    lines = []
    for family in families:
        training = manifest[family]["parameters"]["training"]
        cases, positives = training["cases"], training["positives"]
        start = str(training.get("initialisation", ""))
        started = (
            ""
            if not start or start.startswith("random")
            else f" Started from {start.split(' (', 1)[0]}, {_pretraining_size(start)}."
        )
        lines.append(
            f"`{family}`: trained on {cases['train']} lesions ({positives['train']} malignant) of "
            f"{', '.join(training['datasets'])}; "
            f"{cases['val']} for validation ({positives['val']} malignant), which chose epoch {training['best_epoch']} "
            f"of {training['epochs']}.{started}"
        )
    return lines


def _pretraining_size(initialisation: str) -> str:
    """The "N epochs, without any image of X" part of an initialisation line (export_family.initialisation)."""
    epochs = initialisation.split("; ", 1)[1].split(" ", 1)[0] if "; " in initialisation else "?"
    without = initialisation.split(", without any image of ", 1)
    held = without[1].split(",", 1)[0] if len(without) == 2 else ""
    return f"{epochs} epoch{'' if epochs == '1' else 's'}" + (f", without any image of `{held}`" if held else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--holdout", required=True, help="the dataset left out of training and tested on in full (e.g. busbra)"
    )
    parser.add_argument("--datasets", type=Path, default=Path("../shared/datasets"))
    parser.add_argument(
        "--families",
        default=",".join(DEFAULT_MEMBERS),
        help="benign/malignant US families; more than one also gets a consensus",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help=(
            "folder for checkpoints, weights and the evaluation (default: runs/families/FAMILY-without-HOLDOUT and "
            "runs/external-HOLDOUT)"
        ),
    )
    parser.add_argument(
        "--cards",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "cards" / "external",
        help="where the card is written",
    )
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument(
        "--pretrain-epochs", type=int, default=None, help="mask-pretraining epochs (default: each recipe's own)"
    )
    args, train_options = parser.parse_known_args(argv)
    if any(option == "--init" or option.startswith("--init=") for option in train_options):
        # A checkpoint from elsewhere may have seen the held-out dataset; the reference pretraining is rerun without it
        # instead.
        parser.error(
            "--init is refused here: a given checkpoint may have seen the held-out dataset; the families whose recipe "
            "starts from mask pretraining get it here, without the held-out dataset"
        )
    families = [f for f in args.families.split(",") if f]
    report = run_external(
        args.datasets,
        args.holdout,
        families,
        args.work,
        args.cards,
        train_options,
        args.resamples,
        args.pretrain_epochs,
    )
    for role, body in report["families"].items():
        overall = body.get("classification", {}).get("all", {})
        if overall:
            print(f"{role}: AUC {overall['auc']:.3f} on all {overall['n']} lesions of {args.holdout}", flush=True)


if __name__ == "__main__":
    main()
