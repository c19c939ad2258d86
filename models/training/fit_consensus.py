"""Fit a consensus entry (:mod:`models.inference.consensus`) of a model folder on the validation split.

``python -m models.training.fit_consensus --datasets ../shared/datasets``
(or ``breastai train consensus``) scores each member family exactly as
served (exported graphs, ground-truth lesion box) on the validation split,
takes the mean of their log-odds, picks the operating point by Youden's J,
and writes ``consensus.json`` (the members' sha256) plus the manifest entry.
Nothing else is fitted: the weights are equal by design, so the validation
split decides only the threshold. The benign/malignant consensus becomes
the first entry of the folder's default US list, i.e. the headline score.

``--task birads_high`` fits the BI-RADS 2/3 vs 4/5 consensus
(``consensus_lh.json``, role ``consensus_lh``) of DLR_LH and DL-U's network
trained on the same labels (``dl_u_lh``), by the same rule; it takes
DLR_LH's place in the US list, and the BI-RADS 4A co-decision reads it
instead of DLR_LH alone. Without ``--task`` the headline is fitted, then
every other consensus the folder already has (so ``make train``, which
retrains DLR_LH, refits an opted-in LH consensus too).

Needs no torch; run it again whenever a member is retrained (a changed
member makes the service refuse the stale consensus at start-up).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from models.datasets import US_DATASETS, load_records
from models.errors import TrainingError
from models.evaluation.command import lesion_boxes, score_family
from models.evaluation.stats import auc, youden_threshold
from models.inference.consensus import mean_log_odds, write_consensus_file
from models.inference.manifest import ModelKind
from models.inference.registry import BUNDLED_MODEL_DIR, MANIFEST_NAME, ModelEntry, merge_into_manifest, read_manifest


@dataclass(frozen=True)
class ConsensusRecipe:
    """One consensus the project fits: its role, identity, task, default members and where it sits in the US list."""

    role: str
    name: str
    version: str
    task: str
    members: tuple[str, ...]
    datasets: tuple[str, ...]
    headline: bool  # first in the US list (the headline score) rather than in place of its first member


#: ``breastai train consensus [--task T]``: the benign/malignant headline, and the BI-RADS 2/3 vs 4/5 score the 4A
#: co-decision reads (``models.inference.decisions.lh_score``). Both are the same rule, equal-weight mean log-odds.
CONSENSUSES = {
    "malignancy": ConsensusRecipe(
        "consensus",
        "BreastAI-Consensus-MeanLogOdds",
        # 0.4.0: refit after MUP-Net 0.6.0, on the near-duplicate-aware validation split; 0.5.0: after DLR_BM and CLDLR
        # 0.7.0; 0.6.0: after MUP-Net 0.7.0; 0.7.0: after DLR_BM 0.8.0
        "0.7.0",
        "malignancy",
        ("dlr_bm", "cldlr", "dl_u", "mupnet"),
        US_DATASETS,
        headline=True,
    ),
    "birads_high": ConsensusRecipe(
        "consensus_lh",
        "BreastAI-Consensus-LH-MeanLogOdds",
        "0.1.0",
        "birads_high",
        ("dlr_lh", "dl_u_lh"),
        ("busbra", "breast_lesions"),
        headline=False,
    ),
}
DEFAULT_MEMBERS = CONSENSUSES["malignancy"].members


def _us_list(recipe: ConsensusRecipe, members: Sequence[str]) -> Callable[[dict[str, list[str]]], dict[str, list[str]]]:
    """How fitting ``recipe`` changes the folder's default US list.

    The headline goes first. Another consensus takes its first member's
    place (or goes last when the list lacks it), and the members stay
    where they are: a consensus brings any member the list lacks with it.
    """

    def update(pipelines: dict[str, list[str]]) -> dict[str, list[str]]:
        current = [r for r in pipelines.get("US", list(members)) if r != recipe.role]
        if recipe.headline:
            return {**pipelines, "US": [recipe.role, *current]}
        at = current.index(members[0]) if members[0] in current else len(current)
        return {**pipelines, "US": [*current[:at], recipe.role, *current[at:]]}

    return update


def fit_consensus(
    datasets: Path, model_dir: Path, members: Sequence[str] = (), holdout: str = "", task: str = "malignancy"
) -> ModelEntry:
    """Score the members on the validation split, choose the operating point, write file and manifest entry.

    ``task`` picks the consensus (:data:`CONSENSUSES`): ``malignancy`` (role
    ``consensus``) or ``birads_high`` (role ``consensus_lh``); every member
    must answer that task. No ``members``: the task's own (:data:`CONSENSUSES`).

    ``holdout`` names a dataset the members were trained without (external
    validation, ``breastai train FAMILY --holdout``): its images are left out
    of the validation split here too, so nothing of it chooses the threshold.

    Raises
    ------
    TrainingError
        A member is not in the folder, is not an ultrasound model of ``task``,
        or the validation split has no labelled lesion for it, or lesions of one class only.
    DatasetError
        ``datasets`` holds no image of the consensus's datasets, or a file in it cannot be read.
    """
    recipe = CONSENSUSES[task]
    members = tuple(members) or recipe.members
    entries = read_manifest(model_dir)
    for role in members:
        entry = entries.get(role)
        if entry is None:
            raise TrainingError(
                f"fit_consensus: {role} is not in {model_dir / MANIFEST_NAME} (it has {', '.join(sorted(entries))})"
            )
        if entry.parameters.get("task", "malignancy") != task or entry.parameters.get("modality", "US") != "US":
            raise TrainingError(f"fit_consensus: {role} is not an ultrasound model of the {task} task")
    records = [r for r in load_records(datasets, recipe.datasets) if r.split == "val" and r.dataset != holdout]
    lesions = lesion_boxes(records)
    scored = {role: {c.record.image_id: c for c in score_family(entries[role], model_dir, lesions)} for role in members}
    ids = [i for i in scored[members[0]] if all(i in scored[role] for role in members)]
    if not ids:
        raise TrainingError("fit_consensus: no labelled lesion in the validation split")
    labels = [scored[members[0]][i].label for i in ids]
    if len(set(labels)) < 2:
        raise TrainingError(
            f"fit_consensus: the validation split of {datasets} holds {task} lesions of one class only "
            f"({len(labels)} lesions, {sum(labels)} positive); the operating point needs both"
        )
    combined = [mean_log_odds([scored[role][i].score.probability for role in members]) for i in ids]
    member_auc = {role: round(auc(labels, [scored[role][i].score.probability for i in ids]), 4) for role in members}
    file_name = f"{recipe.role}.json"
    digest = write_consensus_file(model_dir / file_name, {role: entries[role] for role in members})
    datasets_used = sorted({scored[members[0]][i].record.dataset for i in ids})
    entry = ModelEntry(
        role=recipe.role,
        name=recipe.name,
        version=recipe.version,
        file=file_name,
        sha256=digest,
        parameters={
            "kind": ModelKind.CONSENSUS.value,
            "family": recipe.role,
            "task": task,
            "modality": "US",
            "members": list(members),
            "operating_point": youden_threshold(labels, combined),
            "precision": "JSON member list",
            "fitted": {
                "split": "val",
                "datasets": datasets_used,
                "trained_without": holdout or None,
                "cases": len(ids),
                "positives": int(sum(labels)),
                "auc": round(auc(labels, combined), 4),
                "member_auc": member_auc,
            },
        },
    )
    merge_into_manifest(model_dir, {recipe.role: entry}, _us_list(recipe, members))
    return entry


def consensus_tasks(task: str | None, present: Collection[str]) -> list[str]:
    """The consensuses one ``breastai train consensus`` fits: ``task`` alone, or the headline and every other one
    ``present`` has.
    """
    if task is not None:
        return [task]
    return [
        "malignancy",
        *(other for other, recipe in CONSENSUSES.items() if other != "malignancy" and recipe.role in present),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=Path("../shared/datasets"))
    parser.add_argument(
        "--model-dir", type=Path, default=BUNDLED_MODEL_DIR, help="model folder whose manifest gets the consensus entry"
    )
    parser.add_argument(
        "--holdout",
        default="",
        help="the dataset the members were trained without (left out of the validation split too)",
    )
    parser.add_argument(
        "--task",
        choices=sorted(CONSENSUSES),
        help=(
            "fit this consensus only: malignancy (role consensus, the headline) or birads_high (role consensus_lh, "
            "read by the 4A co-decision); default: the headline, then every other consensus the folder already has, "
            "so that retrained members never leave one stale"
        ),
    )
    parser.add_argument(
        "--members", default="", help="comma-separated member roles (default: the task's own); with --task only"
    )
    args = parser.parse_args(argv)
    members = tuple(m for m in args.members.split(",") if m)
    if members and args.task is None:
        parser.error("--members needs --task")
    for task in consensus_tasks(args.task, read_manifest(args.model_dir)):
        entry = fit_consensus(args.datasets, args.model_dir, members, args.holdout, task)
        fitted = entry.parameters["fitted"]
        print(
            f"{entry.role} of {', '.join(entry.parameters['members'])}: validation AUC {fitted['auc']:.4f} (members "
            f"{fitted['member_auc']}), "
            f"operating point {entry.parameters['operating_point']:.3f}, sha256 {entry.sha256}",
            flush=True,
        )


if __name__ == "__main__":
    main()
