"""The one tree of errors that ``models`` raises; the command line alone turns them into exit codes.

::

    ModelsError                      root: anything models/ refuses, with a message naming what and why
    ├── ModelRegistryError           a model folder cannot be served: manifest missing or malformed, a model
    │   │                            unlisted, a file missing or not matching its sha256
    │   └── ManifestError            a manifest entry lacks a field or holds a bad value (names model and field)
    ├── DatasetError                 a data folder is missing, holds no usable images, or a labels.csv,
    │                                image or mask in it cannot be read (names the folder or file)
    ├── TrainingError                a training, pretraining, export or fitting run cannot go on as asked
    │                                (bad option combination, unusable checkpoint, no data for a split)
    ├── EvaluationError              an evaluation cannot be scored as asked (unknown model, unusable data)
    └── BackendUnavailable           the inference backend asked for cannot run here (no GPU, TensorRT or
                                     CUDA provider missing), or one could not run a model (names which and why)

Library code raises these and never ``SystemExit``; ``workers.cli`` prints
the message and exits with status 2, as it does for bad settings
(``service.errors.ConfigurationError``). Serving start-up turns a
``ModelRegistryError`` into a refusal to start.
"""

from __future__ import annotations


class ModelsError(Exception):
    """Root of every error ``models`` raises on purpose."""


class ModelRegistryError(ModelsError):
    """A model folder cannot be served: manifest missing or malformed, a model unlisted, a file missing or altered."""


class ManifestError(ModelRegistryError):
    """A manifest entry lacks a field the model needs or holds a value it cannot use; the message names both."""


class DatasetError(ModelsError):
    """A data folder is missing or holds no usable images, or a file in it (labels.csv, image, mask) is malformed."""


class TrainingError(ModelsError):
    """A training, pretraining, export or fitting run cannot go on as asked."""


class EvaluationError(ModelsError):
    """An evaluation cannot be scored as asked."""


class BackendUnavailable(ModelsError):
    """An inference backend that was asked for cannot run here, or cannot run a given model (the message says why)."""
