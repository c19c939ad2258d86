"""Train one paper family on the development datasets (``breastai train FAMILY``).

Usage::

    python -m models.training.train_family dlr_lh --datasets ../shared/datasets
    python -m models.training.train_family cldlr --stage finish

Stages, each resumable and recorded under ``--work`` (default
``runs/families/FAMILY``):

``network``
    The family's convolutional network on lesion ROIs cut around the
    ground-truth mask's largest region (the papers crop from segmentation
    masks), jittered as a segmenter's box would vary; seeded; one JSON log
    line per epoch; ``best.pt`` by validation AUC.
``finish``
    What the paper adds after the network: DLR's age MLP, CLDLR's SVMs
    (clinical / DLR / CLDLR), MUP-Net's prototype projection and last-layer
    training.
``export``
    ONNX (fp16 where the outputs hold within tolerance of PyTorch) into
    ``--output`` with a manifest entry; evaluation and the model card are
    ``breastai evaluate``'s job.

Split: :mod:`models.datasets` (BUS-BRA by patient fold, others by a
stable image hash). No pretrained weights exist here: every network starts
from scratch, as its card says.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.errors import TrainingError
from models.evaluation.stats import auc
from models.families.catalogue import family_specs
from models.families.spec import FamilySpec
from models.training.export_family import export_family
from models.training.finish import run_finish
from models.training.loop import (
    DEVICES,
    Checkpoints,
    begin_run,
    optimise_step,
    scheduled_step,
    to_training_device,
    training_device,
)
from models.training.run_config import RUN_DEFINING, RunConfig, member_configs
from models.training.samples import BalancedBatches, LesionSample, positive_scores, split_samples, with_roi_padding

#: Every family recipe by name (each folder's recipe.SPECS, models.families.catalogue).
FAMILIES = family_specs()


def train_network(spec: FamilySpec, config: RunConfig, samples: dict[str, list[LesionSample]]) -> None:
    """Class-balanced mini-batches, AdamW (or the recipe's optimiser) with warm-up + cosine decay, best by validation
    AUC.
    """
    train, val = samples["train"], samples["val"]
    model = spec.build()
    if config.init:
        load_initial_weights(model, Path(config.init))
    device = training_device(config.device)
    to_training_device(model, device)  # before the optimiser is built, so that it holds the moved parameters
    if spec.optimizer is not None:
        optimizer = spec.optimizer(model, config.learning_rate)
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=1e-4)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])  # per-group rates keep their ratios under the schedule
    checkpoints = Checkpoints(Path(config.work))
    start, best = checkpoints.resume(model, optimizer)
    rng = np.random.default_rng(config.seed + start)
    sampler = BalancedBatches(spec, train, config.batch_size, config.input_size)
    steps_per_epoch = sampler.steps_per_epoch
    began = time.monotonic()
    for epoch in range(start, config.epochs):
        model.train()
        losses = []
        for step in range(steps_per_epoch):
            _, x, y = sampler.draw(rng)
            x, y = x.to(device), y.to(device)
            with scheduled_step(optimizer, config, device, (epoch, step, steps_per_epoch)):
                loss = spec.loss(model, x, y)
            losses.append(optimise_step(optimizer, loss.float()))
        score = auc([s.label for s in val], positive_scores(spec, model, val, config.input_size))
        best, stop = checkpoints.end_epoch(model, optimizer, epoch, losses, "val_auc", score, best, began, config)
        if stop:
            break


def load_initial_weights(model: nn.Module, checkpoint: Path) -> None:
    """Start ``model`` from a checkpoint of the same network (``models.training.mask_pretraining``'s best.pt).

    Every tensor must match by name and shape: a checkpoint of another
    architecture is refused instead of half-loaded.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights = state.get("model", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise TrainingError(
            f"--init {checkpoint} does not fit this network: missing {list(missing)[:5]}, unexpected "
            f"{list(unexpected)[:5]}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("--stage", choices=("network", "finish", "export", "all"), default="all")
    parser.add_argument("--datasets", default="../shared/datasets")
    parser.add_argument(
        "--work", default=None, help="checkpoint folder (default runs/families/FAMILY[-without-HOLDOUT])"
    )
    parser.add_argument("--holdout", default="", help="leave this dataset out of training (external validation)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--input-size", type=int)
    parser.add_argument(
        "--output",
        default=str(Path(__file__).resolve().parents[1] / "weights"),
        help="model folder the export writes into (its manifest is updated)",
    )
    parser.add_argument("--seed", type=int, help="default: the seed the shipped model was trained from (the recipe's)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument(
        "--max-minutes", type=float, default=float("inf"), help="stop after the epoch that crosses this"
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="train the network under bfloat16 autocast (CPU with AVX512-BF16/AMX, or a GPU)",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: a CUDA GPU where torch sees one, else the CPU; checkpoints and the export stay device-independent",
    )
    parser.add_argument(
        "--push-cycles", type=int, help="MUP-Net: projection + last-layer cycles (default: the recipe's)"
    )
    parser.add_argument(
        "--push-epochs",
        type=int,
        help="MUP-Net: joint epochs before each projection after the first (default: the recipe's)",
    )
    parser.add_argument(
        "--roi-padding",
        type=float,
        help=(
            "grow the lesion box by this fraction on every side (default: the family's); the export records it for "
            "serving"
        ),
    )
    parser.add_argument(
        "--ensemble",
        type=int,
        help=(
            "train this many members from seeds SEED, SEED+1, ... (in WORK/member-K) and export their mean as one "
            "graph (dl_u, dl_m, dlr_bm, dlr_lh; default: the recipe's)"
        ),
    )
    parser.add_argument(
        "--init",
        default="",
        help=(
            "start the network from this checkpoint (e.g. runs/pretrain-masks/FAMILY/best.pt from "
            "models.training.mask_pretraining); "
            "default: random"
        ),
    )
    args = parser.parse_args(argv)
    spec = FAMILIES[args.family]
    suffix = f"-without-{args.holdout}" if args.holdout else ""
    config = RunConfig(
        part=spec.name,
        family=spec.name,
        datasets=args.datasets,
        work=args.work or f"runs/families/{spec.name}{suffix}",
        holdout=args.holdout,
        epochs=args.epochs or spec.epochs,
        batch_size=args.batch_size or spec.batch_size,
        learning_rate=args.learning_rate or spec.learning_rate,
        input_size=args.input_size or spec.input_size,
        seed=args.seed if args.seed is not None else spec.seed,
        threads=args.threads,
        max_minutes=args.max_minutes,
        bf16=args.bf16,
        device=args.device,
        init=args.init,
        push_cycles=args.push_cycles if args.push_cycles is not None else spec.push_cycles,
        push_epochs=args.push_epochs if args.push_epochs is not None else spec.push_epochs,
        roi_padding=args.roi_padding,
        ensemble=args.ensemble if args.ensemble is not None else spec.ensemble,
    )
    # Refused (TrainingError) before any training: an ensemble the recipe cannot take, an ROI padding out of range.
    members = member_configs(config)
    spec = with_roi_padding(spec, config.roi_padding)
    begin_run(config, RUN_DEFINING, spec.notes)
    samples = split_samples(spec, Path(config.datasets), config.holdout or None)
    print(json.dumps({"family": spec.name, **{k: len(v) for k, v in samples.items()}}), flush=True)
    for member in members:
        if member is not config:
            begin_run(member, RUN_DEFINING, spec.notes)
        if args.stage in ("network", "all"):
            train_network(spec, member, samples)
        if args.stage in ("finish", "all") and spec.finish is not None:
            summary = run_finish(spec, member, samples)
            print(json.dumps({"family": spec.name, "work": member.work, "finished": summary}), flush=True)
    if args.stage in ("export", "all"):
        export_family(spec, config, samples, Path(args.output))


if __name__ == "__main__":
    main()
