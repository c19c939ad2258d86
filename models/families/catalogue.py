"""Every trainable family model, found by folder: a family is a sub-package with a ``recipe`` module listing ``SPECS``.

Adding a family means adding a folder (network, recipe, finish stage, card
text): the training loop, the export and the cards find it here. Only the
consensus recipes (``models.training.fit_consensus``) name the families
they combine.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import models.families

if TYPE_CHECKING:  # the card texts are read where torch is absent (breastai evaluate --cards)
    from models.families.spec import FamilySpec


def _family_packages() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(models.families.__path__) if info.ispkg)


def _family_modules(module: str) -> list[Any]:
    """Each family folder's ``module`` (``recipe``, ``card``), in folder order; folders without one are skipped."""
    found: list[Any] = []
    for package in _family_packages():
        name = f"models.families.{package}.{module}"
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            # a folder without it (the segmenter's has no recipe: models.training.train_reference trains it)
    return found


@cache
def family_specs() -> MappingProxyType[str, FamilySpec]:
    """Every family recipe's specs by name, read from each folder's ``recipe.SPECS`` (in folder order)."""
    specs: dict[str, FamilySpec] = {}
    for recipe in _family_modules("recipe"):
        for spec in recipe.SPECS:
            if spec.name in specs:
                raise ValueError(f"two recipes declare the family {spec.name!r}")
            specs[spec.name] = spec
    return MappingProxyType(specs)


@cache
def card_texts() -> MappingProxyType[str, dict[str, str]]:
    """Each model's card prose (paper, architecture, deviations, limits) from its folder's ``card.TEXT``."""
    texts: dict[str, dict[str, str]] = {}
    for card in _family_modules("card"):
        texts.update(card.TEXT)
    return MappingProxyType(texts)
