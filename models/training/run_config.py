"""The settings of one training run: :class:`TrainConfig` (segmenter, refiner) and :class:`RunConfig` (a family).

Frozen, built once by a command's ``main`` from its flags and the recipe's
defaults, written to the run folder's ``config.json`` and passed down.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from models.errors import TrainingError
from models.families.ensemble import ENSEMBLE_FAMILIES
from models.families.spec import DEFAULT_SEED as DEFAULT_SEED  # re-exported: the reference parts' default seed


@dataclass(frozen=True)
class TrainConfig:
    """A reference run's settings (the segmenter, the refiner, and the base of every family run)."""

    part: str
    datasets: str
    work: str
    epochs: int
    batch_size: int
    learning_rate: float
    input_size: int
    seed: int
    threads: int
    max_minutes: float
    # bfloat16 autocast on the training device (CPU: about 1.6x faster with AVX512-BF16/AMX; a GPU needs native bf16),
    # weights stay fp32
    bf16: bool
    # auto: a CUDA GPU where torch sees one, else the CPU (loop.training_device); keyword-only so subclasses may add
    # fields
    device: str = field(default="auto", kw_only=True)


@dataclass(frozen=True)
class RunConfig(TrainConfig):
    """A family run: a reference run's settings plus the family and the dataset left out (external validation)."""

    family: str
    holdout: str
    init: str = ""  # checkpoint the network starts from (a pretraining run's best.pt); "" = random
    push_cycles: int = 1  # MUP-Net: projection + last-layer cycles (FamilySpec.push_cycles)
    push_epochs: int = 0  # MUP-Net: joint epochs before each projection after the first
    roi_padding: float | None = None  # box growth on every side at serving (None: the family's RoiStyle.padding)
    ensemble: int = 1  # seed-ensemble members (1: one network, the paper's recipe); see member_configs


# Settings that make a different network: a checkpoint trained under other values must not be resumed under these
# (its export would name the new start or recipe while holding the old weights). Epochs may grow, threads and
# time limits may change between sessions.
RUN_DEFINING = ("family", "holdout", "init", "seed", "batch_size", "learning_rate", "input_size", "roi_padding")


def member_configs(config: RunConfig) -> list[RunConfig]:
    """One run per seed-ensemble member: ``config`` itself when ``ensemble`` is 1.

    Member ``k`` trains in ``WORK/member-k`` with seed ``seed + k``, so member
    0 is the single-network run of the same seed, every member resumes on its
    own, and adding members later leaves the trained ones untouched.

    Raises
    ------
    TrainingError
        For fewer than one member, or a family whose side models belong to one network.
    """
    if config.ensemble < 1:
        raise TrainingError(f"an ensemble needs at least one member, not {config.ensemble}")
    if config.ensemble == 1:
        return [config]
    if config.family not in ENSEMBLE_FAMILIES:
        raise TrainingError(
            f"{config.family} cannot be a seed ensemble: its side models (SVMs, projected prototypes) belong to one "
            f"network; ensembles are built for {', '.join(sorted(ENSEMBLE_FAMILIES))}"
        )
    return [
        replace(config, work=str(Path(config.work) / f"member-{k}"), seed=config.seed + k, ensemble=1)
        for k in range(config.ensemble)
    ]
