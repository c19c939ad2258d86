"""The mammography lesion finder's recipe: working resolution, targets, schedule and the rules serving applies.

Not a catalogue family. :class:`models.families.spec.FamilySpec` describes a
classifier of lesion ROIs (an ROI rule, class-balanced batches, a checkpoint
by AUC, an operating point), while the finder reads whole images and answers
with a heat map. Like the segmenter (:mod:`models.families.segmentation`), it
is trained and exported by its own command,
:mod:`models.training.train_mg_finder`; ``SPECS`` is empty so that
:mod:`models.families.catalogue`, which reads every folder's recipe, finds no
family to train here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from models.datasets import ListedAbnormality
from models.families.mg_finder.network import SIDE_MULTIPLE
from models.families.spec import DEFAULT_SEED, FamilySpec
from models.inference.manifest import MG_FINDER_ROLE

SPECS: tuple[FamilySpec, ...] = ()


@dataclass(frozen=True)
class FinderRecipe:
    """Everything that makes the shipped finder: training settings and the serving rules its manifest entry records.

    Attributes
    ----------
    mm_per_pixel
        The working resolution: mini-MIAS's own pixel, so its images are read as stored.
    crop_px
        Side of the training crops (10 cm at 0.4 mm: most of a breast's width).
    crops_per_epoch
        Crops drawn per epoch (an epoch is a number of steps, not a pass over the images: crops are random).
    abnormality_crop_share
        Share of the crops centred near a listed abnormality; the rest anywhere on tissue, abnormal image or not.
    min_target_radius_px
        Target disks are at least this wide (a few mini-MIAS circles are 1-3 px, smaller than a calcification cluster
        can be told apart at 0.4 mm).
    threshold, min_area_mm2, max_findings
        The serving rules (:class:`models.inference.manifest.MammogramFinderSpec`).
    """

    role: str = MG_FINDER_ROLE
    model_name: str = "BreastAI-MG-Finder-BasicUNet"
    # The recipe's release: changes when the recipe does, so that a served finder is traceable to what made it.
    version: str = "0.1.0"
    mm_per_pixel: float = 0.4
    crop_px: int = 256
    epochs: int = 30
    batch_size: int = 8
    learning_rate: float = 2e-3
    crops_per_epoch: int = 384
    abnormality_crop_share: float = 0.5
    min_target_radius_px: float = 4.0
    threshold: float = 0.3
    min_area_mm2: float = 4.0
    max_findings: int = 5
    side_multiple: int = SIDE_MULTIPLE
    seed: int = DEFAULT_SEED


RECIPE = FinderRecipe()


def target_disks(
    shape: tuple[int, int], listed: Sequence[ListedAbnormality], min_radius_px: float
) -> npt.NDArray[np.uint8]:
    """The training target of one image: 1 inside every listed circle (at least ``min_radius_px``), 0 elsewhere.

    A normal image's target is all zero. Circles are in the image's own pixels (rows from the top).
    """
    target = np.zeros(shape, dtype=np.uint8)
    for abnormality in listed:
        centre = (round(abnormality.centre_xy[0]), round(abnormality.centre_xy[1]))
        radius = round(max(abnormality.radius_px, min_radius_px))
        cv2.circle(target, centre, radius, 1, thickness=-1)
    return target
