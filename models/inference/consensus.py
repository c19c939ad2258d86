"""Consensus of the paper families: one headline malignancy score from several independent models.

The paper families (docs/models.md) look at the same lesion through different
networks (ResNet-50 + MLP, VGG11 + SVM, VGG19-style deep supervision,
prototypes). Their errors are only partly shared, so the mean of their
log-odds ranks lesions better than any one of them; this is the simplest
ensemble there is, and it is chosen *because* nothing in it is fitted to
data except the operating point:

* equal weights (no per-member weights that could be tuned to the
  validation split);
* ``p = sigmoid(mean_i logit(p_i))``, each ``p_i`` clipped to
  ``[1e-4, 1 - 1e-4]`` so one over-confident member cannot decide alone;
* the operating point is Youden's J on the validation split, like every
  family's.

The consensus file (``consensus.json``) pins the sha256 of each member's
graph and side files, and the consensus identity (TID 4019) is that file's sha256: a
report's headline score is traceable to the exact member models, and a
model folder whose members changed after the consensus was fitted is
refused at start-up rather than served with a stale operating point.

The explanation map is the mean of the members' maps over the region every
member looked at (their ROI boxes differ: DL-U grows the box by 30 % of its
shortest side, the others by 20 % on every side), scaled to peak 1.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.inference.cam import paste
from models.inference.findings import FamilyScore, ModelInfo
from models.inference.manifest import ConsensusSpec, Task
from models.inference.preprocess import Box
from models.inference.registry import ModelEntry, ModelRegistryError, sha256_of, verified_path
from models.inference.scorers import LesionView

PROBABILITY_CLIP = 1e-4


def mean_log_odds(probabilities: Sequence[float]) -> float:
    """``sigmoid(mean(logit(p)))`` with each ``p`` clipped to ``[1e-4, 1 - 1e-4]``.

    Raises
    ------
    ValueError
        No probabilities were given.
    """
    if not probabilities:
        raise ValueError("a consensus needs at least one member probability")
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
    mean = float(np.mean(np.log(clipped / (1.0 - clipped))))
    return float(1.0 / (1.0 + np.exp(-mean)))


def common_box(boxes: Sequence[Box]) -> Box | None:
    """The (x, y, w, h) region inside every box, or None when they do not overlap."""
    left = max(b[0] for b in boxes)
    top = max(b[1] for b in boxes)
    right = min(b[0] + b[2] for b in boxes)
    bottom = min(b[1] + b[3] for b in boxes)
    if right <= left or bottom <= top:
        return None
    return (left, top, right - left, bottom - top)


def consensus_map(scores: Sequence[FamilyScore], image_shape: tuple[int, int]) -> tuple[npt.NDArray[np.float32], Box]:
    """Mean of the members' maps where every member looked, scaled to peak 1, and that region.

    Members whose boxes do not overlap (which the shared lesion box rules
    out) fall back to the first member's map and box.
    """
    region = common_box([s.roi_box for s in scores])
    if region is None:
        return scores[0].cam, scores[0].roi_box
    x, y, w, h = region
    stacked = np.stack([paste(s.cam, s.roi_box, image_shape)[y : y + h, x : x + w] for s in scores])
    mean = stacked.mean(axis=0)
    peak = float(mean.max())
    scaled = (mean / peak if peak > 1e-8 else np.zeros_like(mean)).astype(np.float32)
    return scaled, region


@dataclass(frozen=True)
class ConsensusScorer:
    """Combines member families' scores of one lesion into the consensus score.

    Attributes
    ----------
    entry
        The consensus manifest entry (``kind: consensus``); its spec must be
        a complete :class:`~models.inference.manifest.ConsensusSpec`.
    members
        Member roles, in the order their scores are averaged.

    Raises
    ------
    ManifestError
        The entry is not a complete consensus entry (no operating point, an unknown task, ...).
    """

    entry: ModelEntry
    members: tuple[str, ...]
    spec: ConsensusSpec = field(init=False, repr=False, compare=False)  # the entry's typed spec

    def __post_init__(self) -> None:
        # Resolved once, when made: an incomplete entry is refused here, not at the first lesion.
        object.__setattr__(self, "spec", self.entry.spec_as(ConsensusSpec))

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def task(self) -> Task:
        return self.spec.task

    @property
    def threshold(self) -> float:
        return self.spec.operating_point

    @property
    def info(self) -> ModelInfo:
        return self.entry.info

    def score_lesion(self, lesion: LesionView, scored: Mapping[str, FamilyScore]) -> FamilyScore:
        """:meth:`combine` of the members' scores of the lesion (the scorer protocol)."""
        return self.combine(scored, lesion.shape)

    def combine(self, member_scores: Mapping[str, FamilyScore], image_shape: tuple[int, int]) -> FamilyScore:
        """The consensus of ``member_scores`` (keyed by role; every member must be there).

        Raises
        ------
        KeyError
            A member's score is missing.
        """
        scores = [member_scores[role] for role in self.members]
        probability = mean_log_odds([s.probability for s in scores])
        cam, region = consensus_map(scores, image_shape)
        return FamilyScore(
            family=self.family,
            task=self.task.value,
            model=self.info,
            probability=probability,
            threshold=self.threshold,
            positive=probability >= self.threshold,
            cam=cam,
            roi_box=region,
            notes=(),
            details={"members": ", ".join(self.members), "rule": "mean log-odds, equal weights"},
        )


def member_digests(entry: ModelEntry) -> dict[str, str]:
    """What pins a member: its graph's sha256 and each side file's (CLDLR's SVMs, MUP-Net's prototypes).

    Raises
    ------
    ManifestError
        The member's spec does not parse.
    """
    digests = {"graph": entry.sha256}
    for name, side in sorted(entry.spec.side_files.items()):
        digests[f"side_file:{name}"] = side.sha256
    return digests


def read_consensus_file(path: Path) -> dict[str, dict[str, str]]:
    """Member role -> :func:`member_digests` as they were when the consensus was fitted.

    Raises
    ------
    ModelRegistryError
        The file is not a consensus file.
    """
    try:
        body = json.loads(path.read_text())
        members = {str(role): {str(k): str(v) for k, v in digests.items()} for role, digests in body["members"].items()}
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise ModelRegistryError(f"{path} is not a readable consensus file: {exc}") from exc
    if not members:
        raise ModelRegistryError(f"{path} names no member models")
    return members


def load_consensus_scorer(entry: ModelEntry, entries: Mapping[str, ModelEntry], model_dir: Path) -> ConsensusScorer:
    """The consensus of ``entry``, after checking its file and that its members are the ones it was fitted on.

    Raises
    ------
    ManifestError
        The entry or a member's entry is incomplete.
    ModelRegistryError
        The consensus file fails its checksum, a member is missing from the
        manifest, or a member's graph is not the one the consensus was fitted on.
    """
    spec = entry.spec_as(ConsensusSpec)
    pinned = read_consensus_file(verified_path(entry, model_dir))
    listed = list(spec.members)
    if listed != list(pinned):
        raise ModelRegistryError(
            f"{entry.role} (a consensus): the manifest lists members {listed}, its file {list(pinned)}"
        )
    for role, digests in pinned.items():
        member = entries.get(role)
        if member is None:
            raise ModelRegistryError(f"{entry.role} (a consensus) needs member {role}, which is not in {model_dir}")
        current = member_digests(member)
        changed = sorted(k for k in digests.keys() | current.keys() if digests.get(k) != current.get(k))
        if changed:
            raise ModelRegistryError(
                f"{entry.role} (a consensus) was fitted on another {role} ({', '.join(changed)} differ): "
                "refit it (breastai train consensus, or make train-consensus)"
            )
    return ConsensusScorer(entry, tuple(pinned))


def write_consensus_file(path: Path, members: Mapping[str, ModelEntry]) -> str:
    """Write the consensus file pinning each member's sha256; returns the file's own sha256."""
    body: dict[str, Any] = {
        "rule": "sigmoid(mean(logit(clip(p, 1e-4, 1 - 1e-4)))) over the members, equal weights",
        "members": {role: member_digests(entry) for role, entry in members.items()},
    }
    path.write_text(json.dumps(body, indent=2) + "\n")
    return sha256_of(path)
