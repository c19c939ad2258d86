"""Resumable training state: a network's companions (decoder, projection or auxiliary heads) resume with it."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from models.errors import TrainingError
from models.training.loop import Checkpoints


def _parts(seed: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    network, head = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW([*network.parameters(), *head.parameters()], lr=0.1)
    return network, head, optimizer


def _train_one_step(network: torch.nn.Module, head: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = head(network(torch.ones(5, 4))).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_companions_are_saved_and_resumed_with_the_network(tmp_path: Path) -> None:
    network, head, optimizer = _parts(0)
    _train_one_step(network, head, optimizer)
    Checkpoints(tmp_path).save(network, optimizer, epoch=3, score=0.7, best=0.6, companions={"head": head})

    fresh_network, fresh_head, fresh_optimizer = _parts(1)
    assert not torch.equal(fresh_head.weight, head.weight)
    start, best = Checkpoints(tmp_path).resume(fresh_network, fresh_optimizer, {"head": fresh_head})
    assert (start, best) == (4, 0.7)
    assert torch.equal(fresh_head.weight, head.weight) and torch.equal(fresh_network.weight, network.weight)


def test_a_checkpoint_without_a_companion_refuses_unless_an_old_side_file_has_it(tmp_path: Path) -> None:
    network, head, optimizer = _parts(0)
    _train_one_step(network, head, optimizer)
    Checkpoints(tmp_path).save(
        network, optimizer, epoch=0, score=0.5, best=-1.0
    )  # as the auxiliary heads were (not) kept

    fresh_network, fresh_head, fresh_optimizer = _parts(1)
    with pytest.raises(TrainingError, match="no weights for head"):
        Checkpoints(tmp_path).resume(fresh_network, fresh_optimizer, {"head": fresh_head})
    # Earlier mask-pretraining and SimCLR runs kept theirs beside last.pt.
    torch.save(head.state_dict(), tmp_path / "side.pt")
    assert Checkpoints(tmp_path).resume(
        fresh_network, fresh_optimizer, {"head": fresh_head}, legacy_files={"head": "side.pt"}
    ) == (1, 0.5)
    assert torch.equal(fresh_head.weight, head.weight)
