"""The ABVS three-plane model's card, written from its manifest entry and its held-out report.

The report (``models/cards/evaluation/abvs_three_plane.json``) is what
:func:`models.training.train_abvs_three_plane.evaluate_test` measured once,
after the export, on the test split's synthetic volumes; this module only
formats it with the card prose of :mod:`models.families.abvs.card`, so the
committed card can be checked against the committed report without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.inference.registry import ModelEntry

REPORT_PATH = Path("models/cards/evaluation/abvs_three_plane.json")
CARD_PATH = Path("models/cards/abvs_three_plane.md")
DATASET_NAMES = {"busbra": "BUS-BRA", "busi": "BUSI", "breast_lesions": "BrEaST"}


def _auc(figures: Mapping[str, Any]) -> str:
    low, high = figures["auc_ci"]
    return f"{figures['auc']:.3f} ({low:.3f}-{high:.3f})"


def _row(name: str, figures: Mapping[str, Any]) -> str:
    return (
        f"| {name} | {figures['n']} ({figures['n_positive']} malignant) | {_auc(figures)} | "
        f"{figures['sensitivity']:.2f} / {figures['specificity']:.2f} at {figures['threshold']:.2f} |"
    )


def _number(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    return f"{value:.4f}" if isinstance(value, int | float) else "?"


def _storage(parameters: Mapping[str, Any]) -> str:
    storage = parameters.get("weight_storage") or {}
    if storage.get("accepted"):
        return (
            f"convolution weights stored as int8 ({storage['weights_stored_int8']} tensors, one scale per output "
            f"channel), kept because no validation lesion's probability moved by 0.05 or more (largest shift "
            f"{storage['max_probability_shift']:.4f}) and the validation AUC did not drop by 0.005 or more "
            f"({storage['val_auc_float']:.4f} float, {storage['val_auc_int8']:.4f} int8)"
        )
    return f"{parameters.get('precision', 'float32')} weights (int8 storage was refused: it moved what is served)"


def three_plane_card(entry: ModelEntry, report: Mapping[str, Any], text: Mapping[str, str]) -> str:
    """The card of the ``abvs_three_plane`` entry: what it is, how its volumes were built, its held-out figures.

    ``text`` is the model's prose (:data:`models.families.abvs.card.TEXT`); ``report`` the held-out report.
    """
    parameters = entry.parameters
    training = parameters.get("training", {})
    network = parameters.get("network", {})
    three = report["three_plane"]
    lesions = training.get("lesions", {})
    arithmetic = "bfloat16 autocast" if training.get("autocast") == "bfloat16" else "fp32"
    lines = [
        "# Model card: ABVS three-plane model (`abvs_three_plane`) — trained on synthetic volumes, not validated on "
        "ABVS data",
        "",
        f"- **Paper:** {text.get('paper', 'Liu et al., Theranostics 2025')}.",
        f"- **Model:** {entry.name} {entry.version}, file `{entry.file}`, sha256 `{entry.sha256}`.",
        f"- **Storage:** {_storage(parameters)}.",
        f"- **Held-out AUC (test split's synthetic volumes):** {_auc(three)} on {three['n']} lesions. These are "
        "volumes built from 2-D images, **not ABVS volumes**.",
        "- **Intended use:** advisory decision support, not a diagnosis; not usable clinically in this version "
        "(see Known limits).",
        "",
        "## How the volumes were built",
        "",
        text.get("volumes", ""),
        "",
        "## Architecture",
        "",
        text.get("architecture", ""),
        "",
        f"Trunks: {network.get('trunks', '?')}; {network.get('parameters', '?')} weights.",
        "",
        "## Deviations from the paper",
        "",
        text.get("deviations", ""),
        "",
        "## Training",
        "",
        f"- Lesions: {lesions.get('train', '?')} training (2 volumes each), {lesions.get('val', '?')} validation "
        "(BUS-BRA, BUSI, BrEaST).",
        f"- Split: {training.get('split', '?')}.",
        f"- Epoch {int(training.get('best_epoch', -1)) + 1} of {training.get('epochs_run', '?')} run "
        f"({training.get('epochs', '?')} planned), chosen by validation AUC {_number(training, 'val_auc')} (central "
        f"frame alone {_number(training, 'val_auc_central_frame')}; through the served file "
        f"{_number(training, 'val_auc_as_served')}).",
        f"- {training.get('minutes', '?')} minutes on {training.get('threads', '?')} CPU thread(s), {arithmetic}; "
        f"seed {training.get('seed', '?')}; {training.get('initialisation', '')}.",
        "",
        "## Held-out figures",
        "",
        f"Test split, {three['n']} lesions, scored once after the export through the served file "
        "(`models.inference.three_plane.ThreePlaneScorer`). AUC with 95 % percentile bootstrap interval "
        f"({report['resamples']} resamples over patients, each patient's images drawn together).",
        "",
        "| Model, input | Lesions | AUC (95 % CI) | Sensitivity / specificity |",
        "|---|---|---|---|",
        _row("Three-plane, 3 transverse frames averaged (served rule)", three),
        _row("Three-plane, central frame only", report["three_plane_central_frame_only"]),
    ]
    consensus = report.get("consensus_central_frame")
    if consensus is not None:
        lines.append(
            _row(
                f"2-D consensus {consensus['model']['version']} on the central frame (the real image at 128 px)",
                consensus,
            )
        )
    lines += [
        "",
        "By dataset (three-plane, served rule):",
        "",
        "| Dataset | Lesions | AUC (95 % CI) | Sensitivity / specificity |",
        "|---|---|---|---|",
    ]
    for name, figures in report["by_dataset"].items():
        lines.append(_row(DATASET_NAMES.get(name, name), figures))
    if consensus is not None:
        lines += [
            "",
            "The consensus reads the central frame at the volume's 128 px, not the original image, and its operating "
            "point was fitted on full-resolution validation images, so its sensitivity / specificity here are not "
            "the ones it is served with.",
        ]
    difference = report.get("difference_three_plane_minus_consensus")
    if difference is not None:
        low, high = difference["ci"]
        lines += [
            "",
            f"Three-plane minus consensus, same lesions: ΔAUC {difference['auc_difference']:+.3f} ({low:+.3f} to "
            f"{high:+.3f}), p = {difference['p_value']:.3g} ({difference['test']}).",
        ]
    lines += [
        "",
        "What these figures say: how well the network tells the held-out 2-D lesions apart when it sees them "
        "through this construction. The sagittal and coronal planes are extrapolated from the same 2-D image, so "
        "they carry no information the image does not; the comparison with the 2-D consensus (which sees the real "
        "image, at the volume's 128 px) is a sanity check of the plumbing and the training, not evidence that three "
        "planes help. Nothing here measures accuracy on ABVS volumes.",
        "",
        "## Serving",
        "",
        "`models.inference.three_plane.load_three_plane_scorer()` gives the checksum-verified scorer (None where the "
        "manifest has no `abvs_three_plane` entry); `score(transverse, sagittal, coronal)` takes uint8 crops of any "
        f"size: one or more transverse frames around the lesion (trained and tested with {parameters.get('frames')} "
        f"frames, {parameters.get('frame_step')} slices apart) and one sagittal and one coronal crop through its "
        f"centre, each the plane's lesion box grown by {parameters.get('roi_expand', 0) * 100:.0f} % on every side. "
        f"Each crop is resized to {parameters.get('input_size')} px and z-scored; the lesion's probability is the "
        f"mean over its frames, malignant above {parameters.get('operating_point')}.",
        "",
        "## Known limits",
        "",
        text.get("limits", ""),
        "",
        "## Retrain",
        "",
        "`make train-abvs_three_plane` (`python -m models.training.train_abvs_three_plane`): builds the volumes, "
        "trains, exports into `models/weights` and, once, scores the test split and writes this card.",
    ]
    return "\n".join(lines) + "\n"
