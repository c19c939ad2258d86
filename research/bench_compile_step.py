"""Measurement, not a recipe: one training step in eager mode against ``torch.compile``, at one thread.

    python research/bench_compile_step.py dlr compile bf16

NETWORK is ``dlr`` (DLR's ResNet-50, batch 16, 128 px), ``dlu`` (DL-U's
branch, 96 px) or ``seg`` (the segmenter, 160 px); MODE ``eager`` or
``compile`` (inductor, the default backend); PRECISION ``fp32`` or ``bf16``
(autocast, as ``--bf16`` trains). Random inputs: a step's cost does not
depend on the pixels. Prints the first step (which includes compilation)
and the median of steps 5-12. Run the two modes side by side, one thread
each, so that both see the same machine (``docs/history.md`` has the
figures).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.families.dlr import network as dlr
from models.families.dlum import network as dlum# noqa: E402
from models.families.segmentation.network import lesion_segmenter  # noqa: E402
from models.training.loop import mixed_precision, to_training_device  # noqa: E402


def network_and_loss(name: str) -> tuple[nn.Module, int, Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The network, its recipe's input size, and a loss of its kind (softmax, deep supervision, or pixel-wise)."""
    if name == "dlr":
        return dlr.DLRNet(depth=50), 128, lambda m, x, y: functional.cross_entropy(m(x)[0], y)
    if name == "dlu":
        return dlum.DLUMBranch(width=0.25), 96, lambda m, x, y: dlum.branch_loss(m(x)[0], y)
    if name == "seg":
        return lesion_segmenter(), 160, lambda m, x, y: functional.binary_cross_entropy_with_logits(m(x), (x > 0.5).float())
    raise SystemExit(f"unknown network {name!r}: dlr, dlu or seg")


def main() -> None:
    """Time twelve steps of ``sys.argv``'s network, mode and precision; print the median of the last eight."""
    name, mode, precision = sys.argv[1:4]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, size, loss_of = network_and_loss(name)
    model = to_training_device(model, torch.device("cpu"))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run: nn.Module = torch.compile(model) if mode == "compile" else model  # type: ignore[assignment]  # compile returns the wrapped module
    x, y = torch.randn(16, 1, size, size), torch.randint(0, 2, (16,))
    times = []
    for _ in range(12):
        began = time.perf_counter()
        with mixed_precision(torch.device("cpu"), precision == "bf16"):
            loss = loss_of(run, x, y)
        optimizer.zero_grad()
        loss.float().backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        times.append(time.perf_counter() - began)
    print(f"{name} {mode} {precision}: median step {statistics.median(times[4:]):.3f} s, first step {times[0]:.1f} s")


if __name__ == "__main__":
    main()
