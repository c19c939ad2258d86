"""Model cards, generated from the manifest and an evaluation report (``breastai evaluate --cards``).

Each card holds what a site needs before it turns a model on: intended use
(advisory, never diagnostic), the paper and what was changed, the data and
split, metrics with 95 % CIs as measured by ``breastai evaluate``, the
operating point and how it was chosen, known limits, and the file's sha256.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from models.evaluation.finder import finder_card
from models.evaluation.report import format_estimate, report_markdown
from models.evaluation.served import BENIGN_VS_MALIGNANT, MALIGNANT_VS_REST
from models.families.catalogue import card_texts
from models.inference.decisions import BM_ROLE
from models.inference.manifest import (
    ConsensusSpec,
    LexiconSpec,
    ModelKind,
    ModelSpec,
    NetworkSpec,
    RefinerSpec,
    RoiSpec,
    ScorerSpec,
    SegmenterSpec,
    Task,
)
from models.inference.registry import ModelEntry

INTENDED_USE = (
    "Advisory decision support for radiologists reading breast imaging. The score is an AI estimate, "
    "**not a diagnosis**; it must not be used to rule a lesion in or out without a radiologist's reading. "
    "Not a medical device; not cleared or approved by any regulator."
)


def _near_duplicate_note(training: Mapping[str, Any]) -> str:
    """What the card says about BUSI's near-duplicate scans, by the split rule the model was trained under."""
    if training.get("split_rule"):
        return (
            "Groups of near-duplicate scans (`models/near_duplicates.csv`) that would straddle two splits, "
            "or that carry conflicting labels, took no part; the rest count as one patient in the statistics."
        )
    return (
        "Trained before near-duplicate scans were grouped: some BUSI training images have a copy in the test split. "
        "The metrics below leave those copies out (`models/near_duplicates.csv`), so they are measured on "
        "unseen scans."
    )


def _int8_note(spec: ModelSpec) -> str:
    """How the file stores its convolution weights, when they are int8, and what that was measured to cost."""
    if not (isinstance(spec, NetworkSpec) and spec.int8_weights):
        return ""
    storage = spec.provenance["weight_storage"]  # the measurements are provenance, kept whole
    return (
        f" compute; convolution weights stored as int8, one scale per output channel: on "
        f"{storage['validation_lesions']} validation lesions "
        f"the served probability moved by at most {storage['max_probability_shift']:.3f} and the AUC went from "
        f"{storage['val_auc_float']:.4f} to {storage['val_auc_int8']:.4f} against {storage['compared_with']}"
    )


def _file_precision(spec: ModelSpec) -> str:
    """What the model file holds, as the manifest says; float32 where it does not say."""
    return "float32" if spec.precision is None else spec.precision.value


def _card_opening(entry: ModelEntry, identity: str) -> list[str]:
    """Title, identity, files with their sha256, intended use, and the "Model" heading every card starts with."""
    spec = entry.spec
    lines = [
        f"# Model card: {entry.name} {entry.version}",
        "",
        identity,
        f"- **File:** `{entry.file}` ({_file_precision(spec)}{_int8_note(spec)}), sha256 `{entry.sha256}`",
    ]
    for name, side in spec.side_files.items():
        lines.append(f"- **Side file ({name}):** `{side.file}`, sha256 `{side.sha256}`")
    return [*lines, "", "## Intended use", "", INTENDED_USE, "", "## Model", ""]


SPLIT_RULE_TEXT = (
    "Split: BUS-BRA by its patient-level fold (fold 4 = test; one case in ten of folds 1-3 = validation); "
    "BUSI and BrEaST by a stable hash of the image id (20 % test, 10 % validation);"
)


def _recipe_commands(role: str, training: Mapping[str, Any]) -> str:
    """What rebuilds this model: ``make train-ROLE`` and the commands it runs, with the seed the model was trained from.

    ``make`` passes no seed: each recipe's default is its shipped run's
    (``FamilySpec.seed``, held to the manifest by a test), so the seed
    printed here is what ``make`` runs for a bundled model; for a model
    trained with another ``--seed`` it is that seed.
    """
    seed = f" --seed {training['seed']}" if training.get("seed") is not None else ""
    train = f"`breastai train {role}{seed}`"
    if str(training.get("initialisation", "")).startswith("mask pretraining"):
        return (
            f"Recipe: `make train-{role}`, which runs `breastai train pretrain {role}{seed}`, then "
            f"`breastai train {role}{seed} --init runs/pretrain-masks/{role}/best.pt` "
            f"(`models/training/train_family.py`), "
            "each with `--datasets` and, where the CPU has bf16 units, `--bf16`."
        )
    return (
        f"Recipe: `make train-{role}`, which runs {train} (`models/training/train_family.py`) with `--datasets` and, "
        "where the CPU has bf16 units, `--bf16`."
    )


def _operating_point_and_metrics(
    spec: ScorerSpec, family_report: Mapping[str, Any], data: str, how: str, served: Mapping[str, Any] | None = None
) -> list[str]:
    """The card sections every classifier shares: its operating point and its held-out metrics.

    With ``served`` (the report's served block, for the headline model), the metrics lead with what the SR reports
    (:func:`_served_metrics`) and the ground-truth-box figures follow, labelled as such.
    """
    lines = [
        "## Operating point",
        "",
        f"Score >= **{spec.operating_point:.3f}** is called positive. Chosen on the "
        f"validation split "
        f"by Youden's J {how}; never on test data.",
        "",
    ]
    if served is None:
        return [
            *lines,
            f"## Metrics (held-out test split, as served; data: `{data}`)",
            "",
            "Classification uses the ground-truth lesion box (largest mask region), so these numbers do not include "
            "segmentation misses.",
            "",
            report_markdown(classification=family_report.get("classification")),
        ]
    return [
        *lines,
        *_served_metrics(served, family_report, data),
        "",
        "### On the ground-truth lesion box (second reading, per dataset and scanner)",
        "",
        "Each lesion scored on the ground-truth lesion box (largest mask region), as every family's card reports it: "
        "these numbers do not include segmentation misses, nor the images without a lesion.",
        "",
        report_markdown(classification=family_report.get("classification")),
    ]


def _served_estimate(block: Mapping[str, Any] | None) -> str:
    """``0.876 (0.836–0.912)`` from an ``{"value", "ci95"}`` estimate; n/a where undefined."""
    if not block or block.get("value") is None:
        return "n/a"
    low, high = block["ci95"]
    return format_estimate(block["value"], None if low is None else [low, high])


def _served_row(reading: str, task: str, block: Mapping[str, Any], unit: str) -> str:
    if "all" not in block:
        return f"| {reading} | {task} | – | {block.get('note', 'n/a')} | – | – |"
    group, interval = block["all"], block["operating_point_ci"]
    return (
        f"| {reading} | {task} | {group['n']} {unit} ({group['n_positive']} malignant) | "
        f"{format_estimate(group['auc'], group['auc_ci'])} | {_served_estimate(interval['sensitivity'])} | "
        f"{_served_estimate(interval['specificity'])} |"
    )


def _served_metrics(served: Mapping[str, Any], family_report: Mapping[str, Any], data: str) -> list[str]:
    """The headline card's metrics as the SR reports them, the ground-truth-box row second, and the detection."""
    images, froc = served["images"], served["froc"]
    nothing, normals = served["nothing_found"], served["normal_images"]
    truth = family_report.get("classification", {}).get("all", {})
    at = {rate: _served_estimate(value) for rate, value in froc["sensitivity_at_fp_per_image"].items()}
    if len(set(at.values())) == 1:  # the curve ends before the first rate: one figure for all
        rates = f"{next(iter(at.values()))} at {', '.join(list(at)[:-1])} and {list(at)[-1]}"
    else:
        rates = ", ".join(f"{value} at {rate}" for rate, value in at.items())
    return [
        f"## Metrics (held-out test split; data: `{data}`)",
        "",
        "**As served** (first rows): what the SR reports. Every test image goes through the served B-mode pipeline: "
        "the segmenter and refiner find the lesions, each found lesion gets this score, and the image's score is the "
        "highest of them, 0 where nothing was found (reported as no lesion). The images without a lesion (normal "
        "BUSI and BrEaST images) are negatives: whatever is reported on them counts against specificity by its score. "
        f"Per patient: the highest image score of a patient's images. {served['statistics']}. The ground-truth-box "
        "row (second) scores each lesion on its ground-truth box instead, so it leaves out the segmenter's misses "
        "and inventions.",
        "",
        "| reading | task | n | AUC (95 % CI) | sensitivity (95 % CI) | specificity (95 % CI) |",
        "|---|---|---|---|---|---|",
        _served_row(
            "**as served**, per image", "benign vs malignant, lesion images", served[BENIGN_VS_MALIGNANT], "images"
        ),
        _served_row(
            "**as served**, per image",
            f"malignant vs rest, {images['normal']} normal images included",
            served[MALIGNANT_VS_REST],
            "images",
        ),
        _served_row(
            "**as served**, per patient",
            "benign vs malignant",
            served["per_patient"][BENIGN_VS_MALIGNANT],
            "patients",
        ),
        f"| ground-truth lesion box (no segmentation misses) | benign vs malignant, lesion images | {truth.get('n')} "
        f"images ({truth.get('n_positive')} malignant) | {format_estimate(truth.get('auc'), truth.get('auc_ci'))} | "
        f"{format_estimate(truth.get('sensitivity'))} | {format_estimate(truth.get('specificity'))} |",
        "",
        f"Detection as served: the segmenter found nothing on {nothing['lesion_images']['nothing_found']} of "
        f"{nothing['lesion_images']['n']} lesion images ({nothing['malignant']['nothing_found']} of "
        f"{nothing['malignant']['n']} malignant), no reported lesion hit the lesion on "
        f"{froc.get('lesion_images_without_a_hit', 'n/a')} of them (their score came from another region), "
        f"and it reported a lesion on {normals['with_a_lesion_reported']} of "
        f"{normals['n']} normal images ({normals['called_malignant']} called malignant). FROC sensitivity over the "
        f"{froc['lesions']} ground-truth lesions (a found lesion hits one when their IoU is at least 0.1): {rates} "
        f"false positives per image; the curve ends at {froc['curve_ends_at_fp_per_image']:.2f} (every reported "
        "lesion counted, as served). Per dataset and scanner: `models/cards/evaluation/report.md`.",
    ]


def _ensemble_deviation(training: Mapping[str, Any]) -> str:
    ensemble = training.get("ensemble")
    if not ensemble:
        return ""
    return (
        f" Served as the mean of {ensemble['members']} networks trained by the same recipe from {ensemble['members']} "
        f"seeds; the paper trains one."
    )


#: The training-crop augmentation in words (:func:`models.training.samples.training_input`), the same for every family.
TRAINING_CROPS = (
    "Training crops: the box shifted up to 10 % and its padding varied, flipped left-right, with gamma and speckle "
    "varied. "
)


def _weights_chosen(training: Mapping[str, Any]) -> str:
    """Which weights the graph holds: one best validation epoch, or a seed ensemble's members."""
    ensemble = training.get("ensemble")
    if not ensemble:
        return f"best validation epoch {training.get('best_epoch')}"
    members = ", ".join(
        f"seed {seed} (epoch {epoch}, validation AUC {score:.3f})"
        for seed, epoch, score in zip(
            ensemble["seeds"], ensemble["best_epochs"], ensemble["member_val_auc"], strict=False
        )
    )
    served = training.get("val_auc_as_served")
    return (
        f"**seed ensemble of {ensemble['members']} networks**, each trained by this recipe and kept at its best "
        f"validation epoch: {members}; "
        f"served as the mean of their outputs (logits and maps) in one graph"
        + (f", validation AUC {served:.3f} as served" if served is not None else "")
    )


def _cross_validation_section(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The recipe's K-fold AUCs (``breastai train crossval ... --record``), each rule it was scored under."""
    if not records:
        return []
    lines = [
        "",
        "## Cross-validation (training and validation findings, test not used)",
        "",
        "The recipe trained once per fold of patients (folds balanced for the label), each time without that fold, and "
        "scored "
        "the fold it left out. AUC within folds: only (positive, negative) pairs of one fold, ranked by that fold's "
        "network; "
        "95 % interval from 1000 patient resamples within folds. The AUC of all out-of-fold scores pooled also "
        "compares the "
        "folds' networks' score levels. Recipe: `breastai train crossval`.",
        "",
        "| start | weights that scored each fold | folds | findings (positive) | epochs | AUC within folds (95% CI) | "
        "per-fold AUC | pooled AUC |",
        "|---|---|---:|---|---:|---|---|---:|",
    ]

    def row(record: Mapping[str, Any], scored_with: str) -> str:
        folds = ", ".join("–" if value is None else f"{value:.2f}" for value in record["fold_auc"])
        low, high = record["auc_ci95"]
        pooled = f"{record['auc_pooled']:.3f}" if record.get("auc_pooled") is not None else "–"
        return (
            f"| {record.get('init', 'random')} | {scored_with} | {record['folds']} | {record['cases']} "
            f"({record['positives']}) | {record['epochs']} "
            f"| {record['auc']:.3f} ({low:.3f}–{high:.3f}) | {folds} | {pooled} |"
        )

    notes = []
    for record in records:
        lines.append(row(record, record["scored_with"]))
        same_runs = record.get("same_runs_last_epoch")
        if same_runs:
            lines.append(row({**record, **same_runs, "auc_pooled": None}, "the same runs' last epochs"))
            difference = same_runs["chosen_minus_last"]
            notes.append(
                f"Chosen epoch against the same runs' last epochs: ΔAUC {difference['delta_auc']:+.3f} "
                f"({difference['delta_ci95'][0]:+.3f} to {difference['delta_ci95'][1]:+.3f}), "
                f"{_bootstrap_p(difference)} (paired patient bootstrap)."
            )
        comparison = record.get("comparison")
        if comparison:
            against = comparison["against"]
            notes.append(
                f"{record['scored_with'].capitalize()} ({record.get('init', 'random')} start) against "
                f"{against['scored_with']} ({against['init']} start), "
                f"same {comparison['cases']} findings and folds: ΔAUC {comparison['delta_auc']:+.3f} "
                f"({comparison['delta_ci95'][0]:+.3f} to {comparison['delta_ci95'][1]:+.3f}), "
                f"{_bootstrap_p(comparison)} (paired patient bootstrap)."
            )
    return lines + [line for note in notes for line in ("", note)]


def _bootstrap_p(difference: Mapping[str, Any]) -> str:
    """A bootstrap p-value as text: 0 means no resample crossed 0, which bounds p by 1 / resamples, not at 0."""
    resamples = int(difference.get("resamples", 1000))  # records written before the count was kept used 1000
    if difference["p_value"] == 0:
        return f"p < {1 / resamples:.3g}"
    return f"p = {difference['p_value']:.2f}"


def read_cross_validation(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """``<role>.json`` records of ``folder`` (``models/cards/crossval``), by role; empty where there is none."""
    if not folder.is_dir():
        return {}
    return {path.stem: list(json.loads(path.read_text())) for path in sorted(folder.glob("*.json"))}


def _four_a_section(four_a: Mapping[str, Any] | None, four_a_lh: str) -> list[str]:
    """The 4A co-decision's tally on test lesions assessed 4A, naming the LH model it read (DLR_LH, or the LH
    consensus).
    """
    if not four_a:
        return []
    lh = "DLR_LH" if four_a_lh == "dlr_lh" else f"`{four_a_lh}`"
    lines = [
        "",
        f"## BI-RADS 4A co-decision ({lh} + DLR_BM, test cases assessed 4A)",
        "",
        "| recommendation | n | malignant | benign |",
        "|---|---:|---:|---:|",
    ]
    return lines + [f"| {name} | {row['n']} | {row['malignant']} | {row['benign']} |" for name, row in four_a.items()]


def card_markdown(
    entry: ModelEntry,
    family_report: Mapping[str, Any],
    four_a: Mapping[str, Any] | None,
    data: str,
    cross_validation: Sequence[Mapping[str, Any]] = (),
    four_a_lh: str = "dlr_lh",
) -> str:
    """One model card as Markdown (``four_a_lh``: the role whose LH score the 4A co-decision read)."""
    text = card_texts().get(entry.role, {})
    spec = entry.spec_as(NetworkSpec)
    training = entry.parameters.get("training", {})
    lines = _card_opening(entry, f"- **Family:** `{entry.role}` — {text.get('paper', 'see docs/models.md')}")
    lines += [
        text.get("architecture", ""),
        "",
        f"**Initialisation:** {training.get('initialisation', 'random (from scratch)')}.",
        "",
        f"**Deviations from the paper:** {text.get('deviations', 'none recorded')}" + _ensemble_deviation(training),
        "",
        "## Data and split",
        "",
        f"Datasets: {', '.join(training.get('datasets', []))}. Task: `{spec.task.value}`. "
        + SPLIT_RULE_TEXT
        + " mini-MIAS by woman (image pair). "
        + _near_duplicate_note(training),
        "",
        "| split | lesions | positive |",
        "|---|---:|---:|",
    ]
    for split in ("train", "val", "test"):
        lines.append(
            f"| {split} | {training.get('cases', {}).get(split, 'n/a')} | "
            f"{training.get('positives', {}).get(split, 'n/a')} |"
        )
    lines += [
        "",
        f"Training: {training.get('epochs')} epochs, batch {training.get('batch_size')}, learning rate "
        f"{training.get('learning_rate')}, "
        + _precision(training)
        + f"seed {training.get('seed')}, input {spec.input_size} px; {_weights_chosen(training)}. "
        + _roi_rule(spec.roi)
        + TRAINING_CROPS
        + _stage_cycles(training)
        + _recipe_commands(entry.role, training),
        "",
        *_operating_point_and_metrics(spec, family_report, data, "through the exported file"),
    ]
    if family_report.get("variants"):
        lines += [
            "",
            "## The paper's comparison models (same test lesions)",
            "",
            "The paper compares the fused model with SVMs on the image features alone and on the clinical variables "
            "alone; "
            "those SVMs are fitted with it and shipped as side files, and scored here on the same lesions.",
            "",
            report_markdown(comparisons=family_report["variants"]),
        ]
    lines += _four_a_section(four_a, four_a_lh)
    lines += _cross_validation_section(cross_validation)
    lines += [
        "",
        "## Known limits",
        "",
        f"- {text.get('limits', '')}",
        "- Trained and measured on public research datasets; performance at a new site, scanner or population must be "
        "checked there (`breastai evaluate` on local data).",
        "",
    ]
    return "\n".join(lines)


SEGMENTER_LIMITS = (
    "On images without a lesion (normal BUSI images) the segmenter almost always outlines something: on validation "
    "data no probability threshold separated those false regions from real lesions, so reports are meaningful for "
    "images that show a lesion. Burned-in calipers and text (BUSI) can be outlined."
)


def _refiner_epoch(parameters: Mapping[str, Any]) -> str:
    """Which epoch the refiner shipped from, and of how many ran where the export recorded it (since 0.5.0)."""
    epoch = int(parameters.get("train_epoch", 0)) + 1
    epochs = (parameters.get("training") or {}).get("epochs_run")
    return f"Epoch {epoch} of {epochs}, chosen" if epochs else f"Epoch {epoch}, chosen"


def _segmenter_data_and_operating_point(spec: SegmenterSpec) -> list[str]:
    """The segmenter's data, split and training run (as its manifest entry records them), and how its threshold was
    set.
    """
    parameters = spec.provenance  # the training records
    training = parameters.get("training") or {}
    if training:
        run = (
            f"Training: {training.get('epochs')} epochs, batch {training.get('batch_size')}, learning rate "
            f"{training.get('learning_rate')}, "
            f"{_precision(training)}seed {training.get('seed')}, input {spec.input_size} px; epoch "
            f"{int(parameters.get('train_epoch', 0)) + 1} of {training.get('epochs_run')}, chosen by Dice on the "
            f"validation split's lesion images. " + (f"{training['history']}" if training.get("history") else "")
        ).rstrip()
    else:
        run = "This export recorded no training run. "
    return [
        "## Data and split",
        "",
        "Images: BUSI, BUS-BRA and BrEaST, lesion and normal images (a normal image is trained towards an empty mask). "
        + SPLIT_RULE_TEXT
        + " the same assignment as every family's. "
        + run,
        "",
        "## Operating point",
        "",
        f"A pixel is lesion where its probability is at least {spec.threshold}, and a connected component "
        f"counts "
        f"only from {spec.min_area_fraction:.1%} of the image up. Both were fixed when the "
        f"pipeline was "
        "written, not tuned on any split. On validation no threshold separated false outlines on normal images from "
        "real "
        "lesions (Known limits).",
        "",
    ]


def segmenter_card(
    entry: ModelEntry, segmentation: Mapping[str, Any], data: str, refiner: ModelEntry | None = None
) -> str:
    """The lesion segmentation's card (segmenter, and refiner where there is one): Dice, IoU and HD95 on the held-out
    lesion images.
    """
    spec = entry.spec_as(SegmenterSpec)
    lines = _card_opening(
        entry,
        "- **Role:** `us_segmenter` — the lesion segmentation every family starts from (docs/models.md, all papers)",
    )
    refining = None if refiner is None else refiner.spec_as(RefinerSpec)
    if refiner is not None and refining is not None:
        lines[3:3] = [
            f"- **Refiner:** `{refiner.file}` ({refiner.name} {refiner.version}, "
            f"{_file_precision(refining)}), sha256 `{refiner.sha256}`"
        ]
    lines += [
        f"UNet with an EfficientNet-b0 encoder (MONAI FlexibleUNet), one grayscale input of "
        f"{spec.input_size} px "
        "(per-image z-score), one lesion logit per pixel; threshold "
        f"{spec.threshold}, connected components, components under {spec.min_area_fraction} "
        f"of the image dropped. "
        "Trained from scratch (no pretrained encoder weights can be had here) with Dice + BCE on BUSI, BUS-BRA and "
        "BrEaST "
        "images, normal images included; batch-norm statistics recalibrated on the training images before export. "
        f"Recipe: `models/training/train_reference.py segmenter{_bf16_flag(entry.parameters)}`.",
        "",
        *(
            []
            if refiner is None or refining is None
            else [
                "**Second stage, the refiner** (`models/inference/refine.py`): a smaller UNet (MONAI BasicUNet, 16-256 "
                "channels, instance norm), trained on close-up windows "
                f"(each lesion's box grown by {refining.window_expand} of its size per side, jittered "
                f"in training as "
                f"coarse boxes miss) at {refining.input_size} px, re-outlines every coarse component "
                f"at about its "
                "native resolution; the refined component that overlaps the coarse one most replaces it (none: the "
                "coarse one stays). "
                f"{_refiner_epoch(refiner.parameters)} by validation Dice on the windows "
                f"({refiner.parameters.get('val_dice_windows')}). Recipe: `models/training/train_reference.py "
                f"refiner{_bf16_flag(refiner.parameters)}`.",
                "",
            ]
        ),
        *_segmenter_data_and_operating_point(spec),
        f"## Metrics (held-out test split, lesion images, as "
        f"served{'' if refiner is None else ': segmenter then refiner'}; data: `{data}`)",
        "",
        report_markdown(segmentation=segmentation),
        "",
        "## Known limits",
        "",
        f"- {SEGMENTER_LIMITS}",
        "- HD95 is in pixels of each dataset's images (long side capped at 512 px).",
        "",
    ]
    return "\n".join(lines)


def consensus_card(
    entry: ModelEntry,
    family_report: Mapping[str, Any],
    data: str,
    four_a: Mapping[str, Any] | None = None,
    four_a_lh: str = "dlr_lh",
    served: Mapping[str, Any] | None = None,
) -> str:
    """A consensus's card (the headline benign/malignant one, or the LH one): its members, the fitted operating point,
    and its metrics: with ``served`` (the report's served block, where it is the headline), first as the SR reports
    them, then on the ground-truth lesion box.
    """
    spec = entry.spec_as(ConsensusSpec)
    fitted = entry.parameters.get("fitted", {})
    members = list(spec.members)
    lh = spec.task is Task.BIRADS_HIGH
    if lh:
        identity = (
            f"- **Role:** `{entry.role}` — the BI-RADS 2/3 vs 4/5 (LH) score the 4A co-decision reads "
            f"(`models/inference/consensus.py`)"
        )
        why = (
            "**Deviations from the paper:** Lu et al. read DLR_LH alone. Here DLR_LH is averaged with DL-U's network "
            "trained on the "
            "same labels (`dl_u_lh`, its own card): two networks of different architecture, whose errors are only "
            "partly shared. "
            "It reads the LH score; the BM side of the co-decision is DLR_BM's, as in the paper."
        )
        positives, recipe = "assessed BI-RADS 4/5", "`breastai train consensus --task birads_high`"
    else:
        identity = (
            "- **Role:** `consensus` — one headline score from the paper families (`models/inference/consensus.py`)"
        )
        why = (
            "**Deviations from the papers:** none of the papers ensembles families; this is the project's headline "
            "score because "
            "on the validation split the mean ranked lesions better than any single member (see below), and it needs "
            "no weights "
            "that could be tuned to that split."
        )
        positives, recipe = "malignant", "`breastai train consensus`"
    lines = _card_opening(entry, identity)
    lines += [
        f"The mean of the log-odds of {', '.join(f'`{m}`' for m in members)}, with equal weights "
        "(each member's probability clipped to [1e-4, 1 - 1e-4]); the explanation map is the mean of the members' maps "
        "over the "
        "region every member looked at. The file pins the sha256 of every member's graph and side files: a folder "
        "whose members "
        "changed after fitting is refused at start-up. It is not a model of its own: each member keeps its own score, "
        "call and "
        "card in the report.",
        "",
        "**Initialisation:** nothing is trained; the members are described in their own cards.",
        "",
        why,
        "",
        "## Data and fitting",
        "",
        f"Only the operating point is fitted: on the validation split ({fitted.get('cases', 'n/a')} lesions, "
        f"{fitted.get('positives', 'n/a')} {positives}; {', '.join(fitted.get('datasets', []))}), members scored as "
        f"served. "
        f"Validation AUC {fitted.get('auc', 'n/a')} against members {fitted.get('member_auc', {})}. "
        f"Recipe: {recipe} (`models/training/fit_consensus.py`).",
        "",
        *_operating_point_and_metrics(spec, family_report, data, "with the members as served", served),
        *_four_a_section(four_a, four_a_lh),
        "",
        "## Known limits",
        "",
        "- The members share their training data and the segmenter's lesion box, so their errors are correlated: the "
        "gain over "
        "the best member is modest, and the DeLong comparisons in `models/cards/evaluation/report.md` say whether it "
        "is "
        "distinguishable from zero.",
        *(["- Learns the *assessed* BI-RADS category, as DLR_LH does, not pathology."] if lh else []),
        "- Every member's limits apply (see their cards).",
        "",
    ]
    return "\n".join(lines)


def lexicon_card(entry: ModelEntry, family_report: Mapping[str, Any], data: str) -> str:
    """The lexicon-descriptor model's card: what it measures, what it was fitted on, and its metrics as served."""
    spec = entry.spec_as(LexiconSpec)
    fitted = entry.parameters.get("fitted", {})
    lines = _card_opening(
        entry,
        f"- **Role:** `{entry.role}` — BI-RADS lexicon descriptors of the served outline "
        f"(`models/inference/lexicon.py`)",
    )
    lines += [
        "Fifteen quantitative stand-ins for the ACR BI-RADS ultrasound lexicon (shape, orientation, margin, echo "
        "pattern, "
        "posterior features), measured on the lesion's outline as served (segmenter, then refiner) and the pixels "
        "around it, "
        "then an L2-regularised logistic regression. Explanation: each descriptor's share of the log-odds (the three "
        "strongest "
        "are in the score's details) and a map lighting the region each descriptor was read from, weighted by that "
        "share.",
        "",
        "**Initialisation:** nothing is learned but the regression's 16 coefficients.",
        "",
        "**Relation to the papers:** CLDLR (Yang et al. 2024) feeds the radiologist's margin and posterior-feature "
        "readings to "
        "its SVM; DICOM does not carry them, so this model measures them. It is not a paper family.",
        "",
        "## Data and fitting",
        "",
        f"Fitted on the training split ({fitted.get('train_cases', 'n/a')} lesions, "
        f"{fitted.get('train_positives', 'n/a')} positive; "
        f"{', '.join(fitted.get('datasets', []))}) with C = {fitted.get('regularisation_C')}; validation AUC "
        f"{fitted.get('val_auc')} "
        f"on {fitted.get('val_cases')} lesions. The descriptors were read on the outlines of the segmentation models "
        f"pinned in the "
        "manifest entry; a folder with another segmenter or refiner refuses this model until it is refit. "
        "Recipe: `breastai train lexicon` (`models/training/fit_lexicon.py`).",
        "",
        *_operating_point_and_metrics(spec, family_report, data, "through the stored coefficients"),
        "",
        "## Known limits",
        "",
        "- The descriptors are only as good as the outline. On the validation split the same regression read on the "
        "radiologists' own outlines reached AUC 0.95, against 0.85 on the coarse outlines and 0.86 on the refined "
        "ones: the "
        "public sets' outlines carry margin detail (and drawing habits: convexity alone separates BUSI's classes "
        "almost "
        "perfectly) that ours do not reproduce.",
        "- Measured here on the served outline of the ground-truth lesion (the served component that overlaps its box "
        "most); "
        "no other model in the consensus, because on validation adding it did not raise the consensus's AUC (0.922 "
        "with it, "
        "0.923 without).",
        "- Scale-free by design (ratios and logs), but echo and posterior descriptors depend on gain and depth "
        "settings.",
        "",
    ]
    return "\n".join(lines)


def _roi_rule(roi: RoiSpec) -> str:
    """The ROI growth the export recorded and serving applies (a run may override the family's default)."""
    side = "of its shortest side" if roi.expand_shortest_side else "of its size"
    return f"ROI as served: the lesion box grown by {roi.expand:.0%} {side} on every side. "


def _bf16_flag(parameters: Mapping[str, Any]) -> str:
    """`` --bf16`` where a segmentation stage was trained under bf16 autocast.

    Exports record it in ``training`` (``None``: fp32); the bundled refiner 0.5.0,
    exported before that, recorded it beside (``"autocast": "bfloat16"`` or ``"none"``),
    and the segmenter 0.1.0's ``training`` record, read back from the commit that
    shipped it, says fp32.
    """
    training = parameters.get("training") or {}
    autocast = training["autocast"] if "autocast" in training else parameters.get("autocast")
    return " --bf16" if autocast == "bfloat16" else ""


def _precision(training: Mapping[str, Any]) -> str:
    """The arithmetic the network was trained in; exports before autocast existed recorded none, so they say nothing."""
    if "autocast" not in training:
        return ""
    if training["autocast"]:
        return f"{training['autocast']} autocast (fp32 weights), "
    return "fp32 (no autocast), "


def _stage_cycles(training: Mapping[str, Any]) -> str:
    """MUP-Net's repeated projection and last-layer stages, where the export recorded them."""
    cycles = training.get("push_cycles")
    if not cycles:
        return ""
    return (
        f"Then {cycles} cycles of projection and last-layer training, each after the first preceded by "
        f"{training.get('push_epochs')} joint epochs; cycle {training.get('chosen_cycle')} (counting from 0) scored "
        f"best on validation and is served. "
    )


def write_cards(
    report: Mapping[str, Any],
    entries: Mapping[str, ModelEntry],
    folder: Path,
    cross_validation: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> list[Path]:
    """Write ``<role>.md`` for every evaluated family of ``report``, and the segmenter's card.

    ``cross_validation`` (role -> records) defaults to what ``folder/crossval`` holds.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if cross_validation is None:
        cross_validation = read_cross_validation(folder / "crossval")
    written = []
    # The 4A tally goes on the cards of the two models it read and, where the LH one is a consensus, of its members.
    four_a_lh = str(report.get("four_a_lh_model", "dlr_lh"))  # reports from before the LH consensus: DLR_LH
    lh_entry = entries.get(four_a_lh)
    four_a_roles = {
        BM_ROLE,
        four_a_lh,
        *(
            lh_entry.spec_as(ConsensusSpec).members
            if lh_entry is not None and lh_entry.kind is ModelKind.CONSENSUS
            else ()
        ),
    }
    if report.get("segmentation") and "us_segmenter" in entries:
        path = folder / "us_segmenter.md"
        path.write_text(
            segmenter_card(
                entries["us_segmenter"], report["segmentation"], str(report.get("data")), entries.get("us_refiner")
            )
        )
        written.append(path)
    for role, finder_report in report.get("finders", {}).items():
        if "image_level" in finder_report and role in entries:
            path = folder / f"{role}.md"
            path.write_text(finder_card(entries[role], finder_report, card_texts().get(role, {})))
            written.append(path)
    for role, family_report in report["families"].items():
        if "classification" not in family_report or role not in entries:
            continue
        four_a = report.get("four_a_co_decision") if role in four_a_roles else None
        path = folder / f"{role}.md"
        if entries[role].kind is ModelKind.CONSENSUS:
            served = report.get("served")
            headline = served is not None and served.get("pipeline", {}).get("headline") == role
            path.write_text(
                consensus_card(
                    entries[role],
                    family_report,
                    str(report.get("data")),
                    four_a,
                    four_a_lh,
                    served if headline else None,
                )
            )
        elif entries[role].kind is ModelKind.LEXICON:
            path.write_text(lexicon_card(entries[role], family_report, str(report.get("data"))))
        else:
            path.write_text(
                card_markdown(
                    entries[role],
                    family_report,
                    four_a,
                    str(report.get("data")),
                    cross_validation.get(role, ()),
                    four_a_lh,
                )
            )
        written.append(path)
    return written


def external_card(
    report: Mapping[str, Any], roles: Sequence[str], holdout: str, recipe: str, notes: Sequence[str] = ()
) -> str:
    """The external-validation card: ``roles`` trained without ``holdout``, scored on all of it (``--split all``).

    Parameters
    ----------
    report : dict
        ``breastai evaluate <datasets>/<holdout> --split all`` of the models
        trained without ``holdout`` (:mod:`models.training.external`).
    roles : sequence of str
        The report's families, in card order (the consensus first).
    holdout : str
        The dataset left out of training, validation and the operating points.
    recipe : str
        The command that produced the run, quoted in the card.
    notes : sequence of str
        One line per family about its training data and chosen epoch.
    """
    families = report["families"]
    shown = [role for role in roles if "classification" in families.get(role, {})]
    lines = [
        f"# External validation: trained without {holdout}, tested on all of {holdout}",
        "",
        f"Recipe: `{recipe}` (`models/training/external.py`): each family's own recipe with `--holdout {holdout}` "
        f"(mask pretraining first where the recipe has it, also without `{holdout}`), "
        f"the consensus fitted on the remaining datasets' validation split, then "
        f"`breastai evaluate <datasets>/{holdout} --split all` on the exported models, as served.",
        f"No image of `{holdout}` took part in pretraining, in training, in the choice of a checkpoint or in an "
        f"operating point. "
        f"The weights of this run are not shipped: the bundled models are trained with `{holdout}`'s training folds.",
        "",
        *(f"- {note}" for note in notes),
        "",
        "| model | version | sha256 |",
        "|---|---|---|",
        *(
            f"| `{role}` | {families[role]['model']['version']} | `{families[role]['model']['sha256']}` |"
            for role in shown
            if families[role]["model"]["sha256"]
        ),
        "",
    ]
    for role in shown:
        lines += [report_markdown(classification=families[role]["classification"], title=role), ""]
        if "reference" in families[role]:
            lines += [f"{families[role]['model']['name']}. {families[role]['reference']}", ""]
    for task, comparisons in report.get("comparisons", {}).items():
        lines += [report_markdown(comparisons=comparisons, title=f"DeLong comparisons, {task}"), ""]
    for task, comparisons in report.get("comparisons_with_readers", {}).items():
        lines += [
            report_markdown(
                comparisons=comparisons, title=f"DeLong comparisons with the radiologists' BI-RADS, {task}"
            ),
            "",
        ]
    return "\n".join(lines)
