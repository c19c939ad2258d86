"""Store an exported family's convolution weights as int8, in place, without its training run.

``breastai train`` does this itself for the families whose spec asks for it
(``FamilySpec.int8_weights``, the two ResNet-50s). This command applies the
same transform to a graph already in a model folder, for which the training
checkpoints may be gone:

    python -m models.training.compress_weights dlr_bm dlr_lh --model-dir models/weights

The new graph must serve what the old one served (every validation
lesion's probability within ``INT8_PROBABILITY_TOLERANCE``, the validation
AUC within ``INT8_AUC_TOLERANCE``), or nothing is written. Its
operating point is chosen again on the validation split through the new
file, as the export does. A consensus listing the family names the old
graph's sha256, so it refuses to run until ``breastai train consensus``
refits it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import onnx

from models.errors import TrainingError
from models.evaluation.stats import youden_threshold
from models.families.onnx_export import int8_convolution_weights
from models.inference.registry import ModelEntry, manifest_lock, merge_while_locked, read_manifest, sha256_of
from models.training.export_family import _feeds, _positive, first_outputs, int8_storage
from models.training.samples import split_samples, with_roi_padding
from models.training.train_family import FAMILIES


class CompressionRefused(TrainingError):
    """The int8 graph would not serve what the float graph serves, or there is nothing to compress."""


def compress_family(role: str, model_dir: Path, datasets: Path) -> ModelEntry:
    """Rewrite ``role``'s graph in ``model_dir`` with int8 convolution weights and update its manifest entry."""
    entries = read_manifest(model_dir)
    entry = entries[role]
    parameters = entry.parameters
    if (parameters.get("weight_storage") or {}).get("accepted"):
        raise CompressionRefused(f"{role}: its convolution weights are already stored as int8")
    spec = with_roi_padding(FAMILIES[parameters.get("family", role)], parameters.get("roi_expand"))
    if spec.served_scores is not None:
        raise CompressionRefused(
            f"{role}: its served score is not the graph's first output (CLDLR's SVM), which is all this check reads"
        )
    samples = split_samples(spec, datasets, parameters.get("trained_without"))
    feeds = _feeds(spec, samples["val"], int(parameters["input_size"]), parameters["inputs"])
    if not feeds:
        raise CompressionRefused(f"{role}: no validation lesions under {datasets} to check the int8 graph on")
    first = parameters["outputs"][0]
    graph = model_dir / entry.file
    compressed, count = int8_convolution_weights(onnx.load(str(graph)))
    if count == 0:
        raise CompressionRefused(f"{role}: no convolution weight is large enough to compress")
    labels = [sample.label for sample in samples["val"]]
    as_float = [_positive(spec, output) for output in first_outputs(graph, feeds, first)]
    candidate = graph.with_name(graph.name + ".int8-candidate")  # beside the graph, so the final rename is atomic
    try:
        onnx.save(compressed, str(candidate))
        as_int8 = [_positive(spec, output) for output in first_outputs(candidate, feeds, first)]
        storage = int8_storage(count, labels, as_float, as_int8, f"the previous graph, sha256 {entry.sha256}")
        if not storage["accepted"]:
            raise CompressionRefused(f"{role}: int8 weights change what is served too much: {storage}")
        training = dict(parameters.get("training", {}))
        training["val_auc_as_served"] = storage["val_auc_int8"]
        updated = dataclasses.replace(
            entry,
            # same network, different file: the SR's algorithm version must tell them apart
            version=f"{entry.version}+int8",
            sha256=sha256_of(candidate),
            parameters={
                **parameters,
                "operating_point": youden_threshold(labels, as_int8),
                "weight_storage": storage,
                "training": training,
            },
        )
        # The check above took a while; an export may have replaced the graph
        # meanwhile. Compare, replace and record under one lock, so a newer
        # network is never overwritten by the compressed copy of an older one.
        with manifest_lock(model_dir):
            now = read_manifest(model_dir).get(role)
            if now is None or now.sha256 != entry.sha256 or sha256_of(graph) != entry.sha256:
                raise CompressionRefused(
                    f"{role}: its graph was replaced while it was being checked; nothing was written, run the command "
                    f"again"
                )
            candidate.replace(graph)
            merge_while_locked(model_dir, {role: updated})
    finally:
        candidate.unlink(missing_ok=True)
    return updated


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roles", nargs="+", help="manifest roles to compress, e.g. dlr_bm dlr_lh")
    parser.add_argument("--model-dir", default=str(Path(__file__).resolve().parents[1] / "weights"))
    parser.add_argument("--datasets", default="../shared/datasets")
    args = parser.parse_args(argv)
    for role in args.roles:
        before = read_manifest(Path(args.model_dir))[role]
        size_before = (Path(args.model_dir) / before.file).stat().st_size
        after = compress_family(role, Path(args.model_dir), Path(args.datasets))
        print(
            json.dumps(
                {
                    "role": role,
                    "bytes_before": size_before,
                    "bytes_after": (Path(args.model_dir) / after.file).stat().st_size,
                    "operating_point_before": before.parameters.get("operating_point"),
                    "operating_point_after": after.parameters["operating_point"],
                    "val_auc_as_served": after.parameters["training"]["val_auc_as_served"],
                    "max_probability_shift": after.parameters["weight_storage"]["max_probability_shift"],
                    "val_auc_float": after.parameters["weight_storage"]["val_auc_float"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
