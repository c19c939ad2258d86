"""Export a trained family to ONNX and list it in a model folder's manifest.

The network's best checkpoint (plus what the finish stage fitted) is
wrapped so that the graph also computes its explanation (CAM or closed-form
Grad-CAM), exported at opset 18, converted to float16 and kept in fp16 only
when its first output stays within :data:`FP16_TOLERANCE` of PyTorch on
real validation ROIs. The operating point (Youden's J) is chosen on the
validation split *through the exported file*, so the stored threshold is
the served model's.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnxconverter_common import float16
from torch import nn

from models.datasets import SPLIT_RULE
from models.errors import TrainingError
from models.evaluation.stats import auc, youden_threshold
from models.families.ensemble import MemberMean
from models.families.onnx_export import export_graph, int8_convolution_weights
from models.families.spec import FamilySpec
from models.inference.family_scorer import age_inputs
from models.inference.registry import ModelEntry, merge_into_manifest, sha256_of
from models.training.run_config import RunConfig, member_configs
from models.training.samples import LesionSample, evaluation_input, network_from, read_best

FP16_TOLERANCE = 0.05


def _feeds(
    spec: FamilySpec, samples: list[LesionSample], size: int, inputs: Sequence[str]
) -> list[dict[str, npt.NDArray[np.float32]]]:
    """The graph's feeds for ``samples``: the ROI, and ``[age / 100, known]`` where ``inputs`` name "clinical" (DLR)."""
    feeds = []
    for sample in samples:
        feed = {"image": evaluation_input(spec.roi, sample, size)}
        if "clinical" in inputs:  # as serving decides (models.inference.family_scorer.FamilyScorer.score)
            feed["clinical"] = np.array([age_inputs(sample.record.age_years)], dtype=np.float32)
        feeds.append(feed)
    return feeds


def _positive(spec: FamilySpec, first_output: npt.NDArray[np.float32]) -> float:
    if first_output.shape[-1] == 2:
        shifted = np.exp(first_output[0] - first_output[0].max())
        return float(shifted[1] / shifted.sum())
    return float(1.0 / (1.0 + np.exp(-first_output.reshape(-1)[0])))


def feed_for(session: Any, feed: dict[str, npt.NDArray[np.float32]]) -> dict[str, npt.NDArray[Any]]:
    """``feed`` cast to the graph's input types (float16 graphs take float16 inputs)."""
    types = {i.name: i.type for i in session.get_inputs()}
    return {k: v.astype(np.float16) if types[k] == "tensor(float16)" else v for k, v in feed.items()}


def first_outputs(
    path: Path, feeds: list[dict[str, npt.NDArray[np.float32]]], output: str
) -> list[npt.NDArray[np.float32]]:
    """The graph's ``output`` for every feed, as float32."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(session.run([output], feed_for(session, feed))[0], dtype=np.float32) for feed in feeds]


def largest_difference(
    path: Path, feeds: list[dict[str, npt.NDArray[np.float32]]], references: list[npt.NDArray[np.float32]], output: str
) -> float:
    """Largest absolute difference between the graph's ``output`` and ``references`` over ``feeds``."""
    return max(
        float(np.abs(got - reference).max())
        for got, reference in zip(first_outputs(path, feeds, output), references, strict=False)
    )


#: An int8 graph replaces the float one only if no validation lesion's served
#: probability moves by this much or more ...
INT8_PROBABILITY_TOLERANCE = 0.05
#: ... and the validation AUC does not drop by this much or more.
INT8_AUC_TOLERANCE = 0.005


def int8_storage(
    count: int, labels: list[int], as_float: list[float], as_int8: list[float], reference: str
) -> dict[str, Any]:
    """How far int8 convolution weights move the served probability on validation lesions, and whether that is accepted.

    The check is on the probability the SR reports, not on raw logits: int8
    noise of 0.1 on a logit of -9 changes nothing a reader sees, while the
    same on a logit near 0 moves the probability by 0.025.
    """
    shift = largest_probability_shift(as_float, as_int8)
    auc_float, auc_int8 = auc(labels, as_float), auc(labels, as_int8)
    return {
        "convolution_weights": "int8, symmetric, one float32 scale per output channel; dequantised once when the "
        "session starts",
        "weights_stored_int8": count,
        "compared_with": reference,
        "validation_lesions": len(labels),
        "max_probability_shift": shift,
        "val_auc_float": auc_float,
        "val_auc_int8": auc_int8,
        "accepted": serves_the_same(labels, as_float, as_int8),
    }


def largest_probability_shift(reference: list[float], candidate: list[float]) -> float:
    """The largest change of a served probability between two graphs of one model."""
    return float(np.abs(np.asarray(candidate) - np.asarray(reference)).max())


def serves_the_same(labels: list[int], reference: list[float], candidate: list[float]) -> bool:
    """Whether a smaller graph (int8 weights, fp16) may replace ``reference``: no served probability moves by
    :data:`INT8_PROBABILITY_TOLERANCE` or more, and validation AUC drops by less than :data:`INT8_AUC_TOLERANCE`."""
    return (
        largest_probability_shift(reference, candidate) < INT8_PROBABILITY_TOLERANCE
        and auc(labels, reference) - auc(labels, candidate) < INT8_AUC_TOLERANCE
    )


def initialisation(config: RunConfig) -> str:
    """How the network was initialised, for the manifest and the card."""
    if not config.init:
        return "random (from scratch; no pretrained weights available)"
    checkpoint = Path(config.init)
    settings_file = checkpoint.parent / "config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    if settings.get("objective") == "masks":
        recipe = (
            f"mask pretraining of this network (models.training.mask_pretraining; {settings.get('epochs', '?')} epochs "
            f"of Dice + "
            "cross-entropy on the lesion outlines of the training split's ultrasound images through a feature-pyramid "
            "decoder that "
            "was then dropped; normal images included, benign/malignant and BI-RADS labels unused, epoch chosen by "
            "validation Dice)"
        )
    elif settings.get("family"):
        recipe = (
            f"the network of {settings['family']} trained by its own recipe ({settings.get('epochs', '?')} epochs on "
            f"its train split, "
            "its checkpoint chosen on its validation split; the splits are the same for every family, so no test image "
            "was seen)"
        )
    else:
        recipe = "a checkpoint of this network"
    if settings.get("holdout"):
        recipe += f", without any image of {settings['holdout']}"
    return (
        f"{recipe}, then trained with its family's recipe (the card lists where it departs from the paper); start "
        f"checkpoint sha256 {sha256_of(checkpoint)}"
    )


def best_checkpoints(config: RunConfig) -> list[dict[str, Any]]:
    """Each seed-ensemble member's ``best.pt`` (one for a single network), read once for the graph and the record."""
    return [read_best(Path(member.work)) for member in member_configs(config)]


def serving_wrapper(
    spec: FamilySpec, config: RunConfig, checkpoints: Sequence[Mapping[str, Any]] | None = None
) -> tuple[nn.Module, list[str], list[str]]:
    """The family's serving graph: one network's, or the :class:`MemberMean` of a seed ensemble's members.

    ``checkpoints``: the members' ``best.pt`` already read (:func:`best_checkpoints`; None: read here).
    """
    members = member_configs(config)
    states = best_checkpoints(config) if checkpoints is None else checkpoints
    built = [
        spec.serving_graph(network_from(spec, state), Path(member.work))
        for member, state in zip(members, states, strict=True)
    ]
    if len(built) == 1:
        return built[0]
    _, inputs, outputs = built[0]
    return MemberMean([wrapper for wrapper, _, _ in built]), inputs, outputs


def weight_choice(config: RunConfig, checkpoints: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Which weights were exported: the best validation epoch, or each seed-ensemble member's.

    ``checkpoints``: the members' ``best.pt`` (:func:`best_checkpoints`).
    """
    members = member_configs(config)
    if len(members) > 1:
        return {
            "ensemble": {
                "members": len(members),
                "seeds": [member.seed for member in members],
                "best_epochs": [int(state["epoch"]) for state in checkpoints],
                "member_val_auc": [float(state["score"]) for state in checkpoints],
                "combination": "element-wise mean of the members' outputs (logits and maps), one ONNX graph",
            }
        }
    return {"best_epoch": int(checkpoints[0]["epoch"])}


def finish_record(spec: FamilySpec, config: RunConfig) -> dict[str, Any]:
    """What the manifest records of the family's finish stage (``FamilySpec.finish_record``; nothing for most)."""
    if spec.finish_record is None:
        return {}
    finish = Path(config.work) / "finish.json"
    if not finish.is_file():
        raise TrainingError(f"export {spec.name}: {finish} is missing; run the finish stage first")
    return spec.finish_record(json.loads(finish.read_text()))


def export_family(
    spec: FamilySpec, config: RunConfig, samples: dict[str, list[LesionSample]], output: Path
) -> ModelEntry:
    """Export, pick precision and operating point, copy side files, update ``output``'s manifest."""
    work = Path(config.work)
    size = config.input_size
    checkpoints = best_checkpoints(config)
    wrapper, inputs, outputs = serving_wrapper(spec, config, checkpoints)
    wrapper.eval()
    val_feeds = _feeds(spec, samples["val"], size, inputs)
    output.mkdir(parents=True, exist_ok=True)
    file_name = f"{spec.name}.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        example = tuple(torch.from_numpy(val_feeds[0][name]) for name in inputs)
        export_graph(wrapper, example, fp32, inputs, outputs)
        fp16 = Path(tmp) / "fp16.onnx"
        onnx.save(float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=False), str(fp16))
        with torch.no_grad():
            references = [
                wrapper(*(torch.from_numpy(feed[name]) for name in inputs))[0].numpy() for feed in val_feeds[:16]
            ]
        worst = {"fp32": largest_difference(fp32, val_feeds[:16], references, outputs[0])}
        try:
            worst["fp16"] = largest_difference(fp16, val_feeds[:16], references, outputs[0])
        except Exception as exc:
            print(f"fp16 graph of {spec.name} does not load ({exc}); keeping fp32", flush=True)
            worst["fp16"] = float("inf")
        chosen = fp16 if worst["fp16"] <= FP16_TOLERANCE else fp32
        precision = "float16" if chosen == fp16 else "float32"
        weight_storage: dict[str, Any] | None = None
        if spec.int8_weights:
            compressed, count = int8_convolution_weights(onnx.load(str(chosen)))
            int8 = Path(tmp) / "int8.onnx"
            onnx.save(compressed, str(int8))
            labels = [s.label for s in samples["val"]]
            as_float = [_positive(spec, first) for first in first_outputs(chosen, val_feeds, outputs[0])]
            as_int8 = [_positive(spec, first) for first in first_outputs(int8, val_feeds, outputs[0])]
            weight_storage = int8_storage(count, labels, as_float, as_int8, f"the {precision} graph")
            if weight_storage["accepted"]:
                chosen = int8
            else:
                print(
                    f"int8 weights of {spec.name} change what is served too much ({weight_storage}); keeping "
                    f"{precision}",
                    flush=True,
                )
        shutil.copyfile(chosen, output / file_name)
    val_scores = [_positive(spec, first) for first in first_outputs(output / file_name, val_feeds, outputs[0])]
    side_files: dict[str, str] = {}
    for source, key in spec.side_files:
        side_files[key] = f"{spec.name}_{source}"
        shutil.copyfile(work / source, output / side_files[key])
    if spec.served_scores is not None:  # the served score is not the graph's first output (CLDLR's SVM)
        val_scores = spec.served_scores(
            lambda name: first_outputs(output / file_name, val_feeds, name),
            {key: output / name for key, name in side_files.items()},
            samples["val"],
        )
    served_val_auc = auc([s.label for s in samples["val"]], val_scores)
    parameters: dict[str, Any] = {
        "family": spec.name,
        "task": spec.task,
        "modality": spec.modality,
        "input_size": size,
        "inputs": inputs,
        "outputs": outputs,
        "roi_normalisation": spec.roi.normalisation,
        "roi_expand": spec.roi.padding,
        "roi_expand_shortest_side": spec.roi.shortest_side,
        "operating_point": youden_threshold([s.label for s in samples["val"]], val_scores),
        "precision": precision,
        "weight_storage": weight_storage,
        "max_abs_diff_fp32": worst["fp32"],
        "max_abs_diff_fp16": worst["fp16"] if math.isfinite(worst["fp16"]) else None,
        "side_files": {k: {"file": v, "sha256": sha256_of(output / v)} for k, v in side_files.items()},
        "trained_without": config.holdout or None,
        "training": {
            # The datasets that actually took part (a --holdout or an absent folder drops one from the spec's list).
            "datasets": [d for d in spec.datasets if any(s.record.dataset == d for s in samples["train"])],
            "cases": {split: len(items) for split, items in samples.items()},
            "positives": {split: sum(item.label for item in items) for split, items in samples.items()},
            # Which split rule made these counts (models/datasets.py); absent: before near-duplicates were grouped.
            "split_rule": SPLIT_RULE,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
            "autocast": "bfloat16" if config.bf16 else None,
            **weight_choice(config, checkpoints),
            **finish_record(spec, config),
            "initialisation": initialisation(config),
            "val_auc_as_served": served_val_auc,
            "notes": spec.notes,
        },
    }
    entry = ModelEntry(
        role=spec.name,
        name=spec.model_name,
        version=spec.version,
        file=file_name,
        sha256=sha256_of(output / file_name),
        parameters=parameters,
    )
    merge_into_manifest(output, {spec.name: entry})
    storage = " with int8 convolution weights" if (parameters.get("weight_storage") or {}).get("accepted") else ""
    print(
        f"exported {spec.name}: {parameters['precision']}{storage}, operating point "
        f"{parameters['operating_point']:.3f}",
        flush=True,
    )
    return entry
