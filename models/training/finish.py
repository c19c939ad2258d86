"""The finish stages: what each paper adds after its network, named by :attr:`FamilySpec.finish`.

``age_mlp``
    DLR: the MLP over [128-d embedding, age] on frozen embeddings.
``svms``
    CLDLR: the clinical, DLR and CLDLR SVMs the paper compares, Platt-scaled.
``prototypes``
    MUP-Net: prototype projection and last-layer training, repeated in cycles.

Each writes what the family's serving graph and side files read into the
run folder (``mlp.pt``, ``svm_*.npz``, ``projected.pt`` and the prototypes)
and returns a summary that goes to ``finish.json``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from sklearn.svm import SVC
from torch.nn import functional

from models.evaluation.stats import auc
from models.families.dlr.network import AgeFusionMLP, clinical_vector
from models.families.mupnet import network as mupnet
from models.families.spec import FamilySpec
from models.inference.svm import SvmModel, fit_platt
from models.training.loop import mixed_precision, optimise_step, to_training_device, training_device
from models.training.run_config import RunConfig
from models.training.samples import (
    BalancedBatches,
    LesionSample,
    clinical_features,
    evaluation_input,
    load_best,
    network_outputs,
    positive_scores,
)

Tensor = torch.Tensor


def finish_dlr(spec: FamilySpec, config: RunConfig, samples: dict[str, list[LesionSample]]) -> dict[str, float]:
    """Train the paper's MLP over [128-d embedding, age] on frozen embeddings; best by validation AUC."""
    work = Path(config.work)
    model = load_best(spec, work)
    data = {}
    for split in ("train", "val"):
        embedding = torch.from_numpy(network_outputs(spec, model, samples[split], config.input_size))
        clinical = torch.tensor([clinical_vector(s.record.age_years) for s in samples[split]], dtype=torch.float32)
        data[split] = (embedding, clinical, torch.tensor([s.label for s in samples[split]]))
    mlp = AgeFusionMLP()
    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(config.seed)
    best, best_state = -1.0, mlp.state_dict()
    embedding, clinical, labels = data["train"]
    for _epoch in range(60):
        mlp.train()
        for index in torch.randperm(len(labels), generator=generator).split(32):
            optimise_step(optimizer, functional.cross_entropy(mlp(embedding[index], clinical[index]), labels[index]))
        mlp.eval()
        with torch.no_grad():
            score = auc(data["val"][2].numpy(), torch.softmax(mlp(data["val"][0], data["val"][1]), 1)[:, 1].numpy())
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in mlp.state_dict().items()}
    torch.save(best_state, work / "mlp.pt")
    return {"mlp_val_auc": best, "train_with_age": float(data["train"][1][:, 1].sum())}


def finish_cldlr(spec: FamilySpec, config: RunConfig, samples: dict[str, list[LesionSample]]) -> dict[str, float]:
    """Fit the three SVMs the paper compares (clinical, DLR, CLDLR) with Platt scaling on validation data."""
    work = Path(config.work)
    model = load_best(spec, work)
    deep = {split: network_outputs(spec, model, samples[split], config.input_size) for split in ("train", "val")}
    clinical = {
        split: np.array([clinical_features(s) for s in samples[split]], dtype=np.float32) for split in ("train", "val")
    }
    labels = {split: np.array([s.label for s in samples[split]]) for split in ("train", "val")}
    summary: dict[str, float] = {}
    for variant, features in (
        ("clinical", clinical),
        ("dlr", deep),
        ("cldlr", {split: np.concatenate([deep[split], clinical[split]], axis=1) for split in ("train", "val")}),
    ):
        mean = features["train"].mean(0)
        scale = features["train"].std(0) + 1e-6
        machine = SVC(kernel="rbf", C=1.0, gamma="scale").fit((features["train"] - mean) / scale, labels["train"])
        svm = SvmModel(
            mean=mean.astype(np.float64),
            scale=scale.astype(np.float64),
            support_vectors=np.asarray(machine.support_vectors_, dtype=np.float64),
            dual_coefficients=np.asarray(machine.dual_coef_[0], dtype=np.float64),
            intercept=float(machine.intercept_[0]),
            gamma=float(machine._gamma),
            platt_a=0.0,
            platt_b=0.0,
        )
        platt_a, platt_b = fit_platt(svm.decision(features["val"]), labels["val"])
        svm = SvmModel(**{**svm.__dict__, "platt_a": platt_a, "platt_b": platt_b})
        svm.save(work / f"svm_{variant}.npz")
        summary[f"{variant}_val_auc"] = auc(labels["val"], svm.probability(features["val"]))
    return summary


#: Joint-stage rates after a projection, as a fraction of stage 1's: the paper divides its rate by ten every 5 epochs.
PUSH_JOINT_RATE = 0.1
LAST_LAYER_EPOCHS = 8


def finish_mupnet(spec: FamilySpec, config: RunConfig, samples: dict[str, list[LesionSample]]) -> dict[str, Any]:
    """Paper stages 2 and 3, and the paper's repetition of all three stages.

    Each cycle projects every prototype onto an own-class training patch
    (:func:`models.families.mupnet.network.project_prototypes`, each prototype on a
    different image), then trains the last layer alone for
    :data:`LAST_LAYER_EPOCHS` epochs, keeping its best validation epoch. The
    paper: "These three stages were repeated throughout the whole training
    process." So every cycle after the first begins with ``config.push_epochs``
    joint epochs (stage 1 again: trunk, add-on layers and prototypes, last
    layer frozen) at :data:`PUSH_JOINT_RATE` of stage 1's rates, from the
    previous cycle's model, in the precision stage 1 trained in
    (``--bf16``: bfloat16 autocast). The last-layer epochs train on
    :class:`models.families.mupnet.network.FrozenEvidence` computed once after the
    projection, which gives the same updates as running the frozen trunk
    over the images every epoch. Of the ``config.push_cycles`` cycles, the one
    whose projected model scores highest on validation is kept, as ProtoPNet
    keeps its best post-projection checkpoint.

    Candidates follow the paper's BI-RADS rule for B-mode (benign from
    BI-RADS 3/4a, malignant from 4c/5; 2 counts as benign): only BUS-BRA and
    BrEaST images carry BI-RADS, so BUSI images are never prototypes.
    """
    work = Path(config.work)
    device = training_device(config.device)
    model = to_training_device(load_best(spec, work), device)  # its repeated joint epochs are whole-network training
    assert isinstance(model, mupnet.MUPNet)
    train, val_labels = samples["train"], [s.label for s in samples["val"]]
    images = torch.from_numpy(np.concatenate([evaluation_input(spec.roi, s, config.input_size) for s in train]))[
        :, None
    ]
    labels = torch.tensor([s.label for s in train])
    # Projection by pathology (the classes of the prototypes), restricted by BI-RADS as the paper does.
    eligible = mupnet.projection_eligibility([s.record.birads or None for s in train], labels, modalities=("bmode",))
    projection_batches = [
        (images[k : k + 32], labels[k : k + 32], eligible[k : k + 32]) for k in range(0, len(train), 32)
    ]
    val_inputs = [
        torch.from_numpy(
            np.concatenate([evaluation_input(spec.roi, s, config.input_size) for s in samples["val"][k : k + 32]])
        )
        for k in range(0, len(samples["val"]), 32)
    ]
    generator = np.random.default_rng(config.seed)
    sampler = BalancedBatches(spec, train, config.batch_size, config.input_size)
    cycles: list[dict[str, float]] = []
    best_score = -math.inf
    for cycle in range(max(1, config.push_cycles)):
        if cycle:
            optimizer = mupnet.joint_optimizer(model, rate_scale=PUSH_JOINT_RATE)
            for _ in range(config.push_epochs):
                batches = [sampler.draw(generator)[1:] for _ in range(sampler.steps_per_epoch)]
                mupnet.train_joint_epoch(
                    model,
                    [(x[:, None], y) for x, y in batches],
                    optimizer,
                    precision=lambda: mixed_precision(device, config.bf16),
                )
        after_joint = auc(val_labels, positive_scores(spec, model, samples["val"], config.input_size))
        record = mupnet.project_prototypes(model, projection_batches)
        # Only the last layer moves from here to the cycle's end: the trunks run once, not once per epoch.
        train_evidence = mupnet.frozen_evidence(model, (batch for batch, _, _ in projection_batches))
        val_evidence = mupnet.frozen_evidence(model, (x[:, None] for x in val_inputs))
        after_projection = auc(val_labels, mupnet.evidence_probability(model, val_evidence)[:, 1].cpu().numpy())
        best_layer, best_state = after_projection, copy.deepcopy(model.state_dict())
        optimizer = mupnet.last_layer_optimizer(model)
        for _ in range(LAST_LAYER_EPOCHS):
            order = torch.from_numpy(generator.permutation(len(train)))
            shuffled = [
                (train_evidence.take(order[k : k + 32]), labels[order[k : k + 32]]) for k in range(0, len(train), 32)
            ]
            mupnet.train_last_layer_epoch(model, shuffled, optimizer)
            score = auc(val_labels, mupnet.evidence_probability(model, val_evidence)[:, 1].cpu().numpy())
            if score > best_layer:
                best_layer, best_state = score, copy.deepcopy(model.state_dict())
        model.load_state_dict(best_state)
        cycles.append(
            {
                "val_auc_before_projection": after_joint,
                "val_auc_after_projection": after_projection,
                "val_auc_after_last_layer": best_layer,
            }
        )
        print(json.dumps({"family": spec.name, "cycle": cycle, **cycles[-1]}), flush=True)
        if best_layer > best_score:
            best_score = best_layer
            torch.save({"model": model.state_dict(), "cycle": cycle}, work / "projected.pt")
            _save_prototypes(record, train, images, work)
    chosen = int(torch.load(work / "projected.pt", map_location="cpu", weights_only=False)["cycle"])
    return {
        "cycles": cycles,
        "push_epochs": config.push_epochs,
        "chosen_cycle": chosen,
        "val_auc": best_score,
        "prototype_sources": "one image per prototype, per modality",
    }


def _save_prototypes(record: mupnet.ProjectionRecord, train: list[LesionSample], images: Tensor, work: Path) -> None:
    """``prototypes.json`` (where each prototype came from) and ``prototype_patches.npz`` (64 px pictures of them)."""

    def source_id(row: dict[str, Any]) -> str:
        source = train[int(row["source_index"])].record
        return f"{source.dataset}/{source.image_id}"

    sources = [{**row, "source_id": source_id(row)} for row in record.as_dicts()]
    (work / "prototypes.json").write_text(json.dumps(sources, indent=2))
    patches = []
    for row in sources:
        y0, x0, y1, x1 = (int(v) for v in row["activation_box"])
        picture = images[int(row["source_index"]), 0, 0].numpy()
        picture = (255 * (picture - picture.min()) / max(1e-6, float(picture.max() - picture.min()))).astype(np.uint8)
        patch = picture[y0:y1, x0:x1] if y1 > y0 and x1 > x0 else picture
        patches.append(cv2.resize(patch, (64, 64), interpolation=cv2.INTER_AREA))
    np.savez_compressed(
        work / "prototype_patches.npz", patches=np.stack(patches), classes=np.array([int(r["class"]) for r in sources])
    )


FINISHERS: dict[str, Callable[[FamilySpec, RunConfig, dict[str, list[LesionSample]]], dict[str, Any]]] = {
    "age_mlp": finish_dlr,
    "svms": finish_cldlr,
    "prototypes": finish_mupnet,
}
