"""MUP-Net's finish stage: paper stages 2 and 3, and the paper's repetition of all three."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from models.families.finish_run import FinishRun, Lesion
from models.families.mupnet import network as mupnet

#: Joint-stage rates after a projection, as a fraction of stage 1's: the paper divides its rate by ten every 5 epochs.
PUSH_JOINT_RATE = 0.1
LAST_LAYER_EPOCHS = 8
BATCH = 32


def finish_prototypes(run: FinishRun, lesions: Mapping[str, Sequence[Lesion]]) -> dict[str, Any]:
    """Project the prototypes and train the last layer, in cycles; keep the best cycle in ``projected.pt``.

    Each cycle projects every prototype onto an own-class training patch
    (:func:`models.families.mupnet.network.project_prototypes`, each prototype
    on a different image), then trains the last layer alone for
    :data:`LAST_LAYER_EPOCHS` epochs, keeping its best validation epoch. The
    paper: "These three stages were repeated throughout the whole training
    process." So every cycle after the first begins with ``run.push_epochs``
    joint epochs (stage 1 again: trunk, add-on layers and prototypes, last
    layer frozen) at :data:`PUSH_JOINT_RATE` of stage 1's rates, from the
    previous cycle's model, in the precision stage 1 trained in. The
    last-layer epochs train on :class:`models.families.mupnet.network.FrozenEvidence`
    computed once after the projection, which gives the same updates as
    running the frozen trunk over the images every epoch. Of the
    ``run.push_cycles`` cycles, the one whose projected model scores highest
    on validation is kept, as ProtoPNet keeps its best post-projection
    checkpoint.

    Candidates follow the paper's BI-RADS rule for B-mode (benign from
    BI-RADS 3/4a, malignant from 4c/5; 2 counts as benign): only BUS-BRA and
    BrEaST images carry BI-RADS, so BUSI images are never prototypes.
    """
    model = run.on_training_device(run.best_network())  # its repeated joint epochs are whole-network training
    assert isinstance(model, mupnet.MUPNet)
    train, val = lesions["train"], lesions["val"]
    val_labels = [s.label for s in val]
    images = torch.from_numpy(run.roi_inputs(train))[:, None]
    labels = torch.tensor([s.label for s in train])
    # Projection by pathology (the classes of the prototypes), restricted by BI-RADS as the paper does.
    eligible = mupnet.projection_eligibility([s.record.birads or None for s in train], labels, modalities=("bmode",))
    projection_batches = [
        (images[k : k + BATCH], labels[k : k + BATCH], eligible[k : k + BATCH]) for k in range(0, len(train), BATCH)
    ]
    val_inputs = [torch.from_numpy(run.roi_inputs(val[k : k + BATCH])) for k in range(0, len(val), BATCH)]
    generator = np.random.default_rng(run.seed)
    sampler = run.balanced_batches(train)
    cycles: list[dict[str, float]] = []
    best_score, chosen = -math.inf, 0
    for cycle in range(max(1, run.push_cycles)):
        if cycle:
            optimizer = mupnet.joint_optimizer(model, rate_scale=PUSH_JOINT_RATE)
            for _ in range(run.push_epochs):
                batches = [sampler.draw(generator)[1:] for _ in range(sampler.steps_per_epoch)]
                mupnet.train_joint_epoch(
                    model, [(x[:, None], y) for x, y in batches], optimizer, precision=run.precision
                )
        # P(malignant) of the validation ROIs as served: eval mode, no gradient, softmax of the logits.
        joint_evidence = mupnet.frozen_evidence(model, (x[:, None] for x in val_inputs))
        after_joint = run.auc(val_labels, mupnet.evidence_probability(model, joint_evidence)[:, 1].cpu().numpy())
        record = mupnet.project_prototypes(model, projection_batches)
        # Only the last layer moves from here to the cycle's end: the trunks run once, not once per epoch.
        train_evidence = mupnet.frozen_evidence(model, (batch for batch, _, _ in projection_batches))
        val_evidence = mupnet.frozen_evidence(model, (x[:, None] for x in val_inputs))
        after_projection = run.auc(val_labels, mupnet.evidence_probability(model, val_evidence)[:, 1].cpu().numpy())
        best_layer, best_state = after_projection, copy.deepcopy(model.state_dict())
        optimizer = mupnet.last_layer_optimizer(model)
        for _ in range(LAST_LAYER_EPOCHS):
            order = torch.from_numpy(generator.permutation(len(train)))
            shuffled = [
                (train_evidence.take(order[k : k + BATCH]), labels[order[k : k + BATCH]])
                for k in range(0, len(train), BATCH)
            ]
            mupnet.train_last_layer_epoch(model, shuffled, optimizer)
            score = run.auc(val_labels, mupnet.evidence_probability(model, val_evidence)[:, 1].cpu().numpy())
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
        print(json.dumps({"family": run.name, "cycle": cycle, **cycles[-1]}), flush=True)
        if best_layer > best_score:
            best_score, chosen = best_layer, cycle
            torch.save({"model": model.state_dict(), "cycle": cycle}, run.work / "projected.pt")
            _save_prototypes(record, train, images, run.work)
    return {
        "cycles": cycles,
        "push_epochs": run.push_epochs,
        "chosen_cycle": chosen,
        "val_auc": best_score,
        "prototype_sources": "one image per prototype, per modality",
    }


def _save_prototypes(
    record: mupnet.ProjectionRecord, train: Sequence[Lesion], images: torch.Tensor, work: Path
) -> None:
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
    classes = np.array([int(r["class"]) for r in sources])
    np.savez_compressed(work / "prototype_patches.npz", patches=np.stack(patches), classes=classes)


def cycles_record(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What the manifest records of the finish stage: the cycles that ran and the one kept (from finish.json).

    The finish stage's own record, not the export command's flags: an
    export-only run may have been given others.
    """
    return {
        "push_cycles": len(summary["cycles"]),
        "push_epochs": summary["push_epochs"],
        "chosen_cycle": summary["chosen_cycle"],
        "prototype_sources": summary["prototype_sources"],
        "contributions": "share of the malignancy log-odds",
    }
