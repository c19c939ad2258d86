"""The close-up refiner's window rule, its choice among refined components, and its fallbacks.

A small in-test backend stands in for the graph here (the rule around it
is what is tested); the bundled refiner itself runs in
``test_registry_and_pipeline.py`` and through every pipeline test.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from models.inference.refine import WINDOW_EXPAND, refine_mask, refiner_window, window_probability


class DarkRegions:
    """Outlines what is dark in its (z-scored) input: a refiner that knows lesions are hypoechoic."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("logits",)

    def run(self, inputs: Mapping[str, npt.NDArray[np.float32]]) -> dict[str, npt.NDArray[np.float32]]:
        image = inputs["image"]
        self.seen.append(tuple(image.shape))
        return {"logits": (-8.0 * image).astype(np.float32)}


class Nothing(DarkRegions):
    def run(self, inputs: Mapping[str, npt.NDArray[np.float32]]) -> dict[str, npt.NDArray[np.float32]]:
        return {"logits": np.full(inputs["image"].shape, -10.0, np.float32)}


def _image_with(*lesions: tuple[int, int, int, int]) -> npt.NDArray[np.uint8]:
    image = np.full((300, 400), 150, np.uint8)
    for cx, cy, a, b in lesions:
        cv2.ellipse(image, (cx, cy), (a, b), 0, 0, 360, 30, -1)
    return image


def test_window_grows_the_box_by_the_training_rule() -> None:
    assert refiner_window((100, 100, 40, 20), (300, 400)) == (90, 95, 60, 30)
    assert WINDOW_EXPAND == 0.25
    assert refiner_window((0, 0, 40, 20), (300, 400)) == (0, 0, 50, 25)  # clipped at the image edge


def test_refined_mask_follows_the_lesion_the_coarse_blob_only_approximated() -> None:
    image = _image_with((200, 150, 40, 25))
    truth = image < 100
    coarse = np.zeros(image.shape, bool)
    coarse[130:172, 165:240] = True  # a box-like blob, off by a few pixels
    backend = DarkRegions()
    refined = refine_mask(backend, 64, image, coarse)
    assert backend.seen == [(1, 1, 64, 64)]
    dice = 2 * (refined & truth).sum() / (refined.sum() + truth.sum())
    coarse_dice = 2 * (coarse & truth).sum() / (coarse.sum() + truth.sum())
    assert dice > 0.9 > coarse_dice
    probability = window_probability(backend, 64, image, (150, 110, 100, 80))
    assert probability.shape == (80, 100) and probability.dtype == np.float32


def test_of_two_refined_lesions_the_one_under_the_coarse_mask_is_kept() -> None:
    image = _image_with((150, 150, 30, 20), (215, 150, 12, 12))  # a neighbour inside the window
    coarse = np.zeros(image.shape, bool)
    coarse[135:165, 125:175] = True
    refined = refine_mask(DarkRegions(), 96, image, coarse)
    assert refined[150, 150] and not refined[150, 215]


def test_falls_back_to_the_coarse_mask_when_the_refiner_finds_nothing() -> None:
    image = _image_with((200, 150, 40, 25))
    coarse = image < 100
    assert (refine_mask(Nothing(), 64, image, coarse) == coarse).all()
    with pytest.raises(ValueError):
        refine_mask(DarkRegions(), 64, image, np.zeros(image.shape, bool))
