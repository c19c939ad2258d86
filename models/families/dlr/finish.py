"""DLR's finish stage: the paper's MLP over [128-d embedding, age], on frozen embeddings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn import functional

from models.families.dlr.network import AgeFusionMLP
from models.families.finish_run import FinishRun, Lesion
from models.inference.family_scorer import age_inputs

MLP_EPOCHS = 60
MLP_BATCH = 32


def finish_age_mlp(run: FinishRun, lesions: Mapping[str, Sequence[Lesion]]) -> dict[str, Any]:
    """Train the MLP on the best network's embeddings and age; keep its best validation epoch in ``mlp.pt``."""
    model = run.best_network()
    data = {}
    for split in ("train", "val"):
        embedding = torch.from_numpy(run.network_outputs(model, lesions[split]))
        clinical = torch.tensor([age_inputs(s.record.age_years) for s in lesions[split]], dtype=torch.float32)
        data[split] = (embedding, clinical, torch.tensor([s.label for s in lesions[split]]))
    mlp = AgeFusionMLP()
    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(run.seed)
    best, best_state = -1.0, mlp.state_dict()
    embedding, clinical, labels = data["train"]
    for _epoch in range(MLP_EPOCHS):
        mlp.train()
        for index in torch.randperm(len(labels), generator=generator).split(MLP_BATCH):
            loss = functional.cross_entropy(mlp(embedding[index], clinical[index]), labels[index])
            run.optimise_step(optimizer, loss)
        mlp.eval()
        with torch.no_grad():
            probability = torch.softmax(mlp(data["val"][0], data["val"][1]), 1)[:, 1]
            score = run.auc(data["val"][2].numpy(), probability.numpy())
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in mlp.state_dict().items()}
    torch.save(best_state, run.work / "mlp.pt")
    return {"mlp_val_auc": best, "train_with_age": float(data["train"][1][:, 1].sum())}
