"""Serving side of the paper families: score one lesion ROI with one exported model.

Torch-free: every family runs as an ONNX graph behind :class:`models.inference.backend.Backend`,
described by its manifest entry's typed spec (:class:`models.inference.manifest.NetworkSpec`: input
size, ROI padding and normalisation, input names, operating point, side files). What differs between families
is only how the graph's outputs become a probability:

* two-way logits -> softmax (DLR, CLDLR's network, the ROI ResNet);
* one logit -> sigmoid (DL-U / DL-M);
* CLDLR -> the deep features plus the clinical variables DICOM carries ->
  the SVM of :mod:`models.inference.svm` (the paper's "AI score");
* MUP-Net -> two-way logits plus per-prototype contributions.

Missing clinical inputs are not guessed: the model runs without them (its
training taught it the "unknown" flag) and the result says so in ``notes``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.inference.backend import Backend
from models.inference.backends import CPU_RUNTIME, InferenceRuntime
from models.inference.cam import normalise_cam
from models.inference.findings import FamilyScore, ModelInfo, PrototypeEvidence
from models.inference.manifest import NetworkSpec, Task
from models.inference.preprocess import Box, roi_input
from models.inference.registry import ModelEntry, verified_side_files
from models.inference.scorers import NO_CLINICAL_CONTEXT as NO_CLINICAL_CONTEXT  # defined with the scorer protocol
from models.inference.scorers import ClinicalContext as ClinicalContext
from models.inference.scorers import LesionView
from models.inference.svm import SvmModel

AGE_SCALE_YEARS = 100.0
CLDLR_VARIANTS = ("dlr", "clinical")  # side-file keys of CLDLR's comparison SVMs
TOP_PROTOTYPES = 3  # prototypes shown per lesion: the strongest contributions
DIAMETER_SCALE_MM = 50.0


def age_inputs(age_years: float | None) -> list[float]:
    """``[age / 100, known]`` as DLR's MLP and CLDLR's SVM were trained with."""
    return [0.0, 0.0] if age_years is None else [age_years / AGE_SCALE_YEARS, 1.0]


def diameter_inputs(box: Box, pixel_spacing_mm: float | None) -> list[float]:
    """``[max box side mm / 50, known]``: CLDLR's lesion-size variable."""
    if pixel_spacing_mm is None:
        return [0.0, 0.0]
    return [max(box[2], box[3]) * pixel_spacing_mm / DIAMETER_SCALE_MM, 1.0]


def _softmax_positive(logits: npt.NDArray[np.float32]) -> float:
    row = logits.reshape(-1).astype(np.float64)
    shifted = np.exp(row - row.max())
    return float(shifted[1] / shifted.sum())


class FamilyScorer:
    """Runs one family's exported graph on lesion ROIs.

    Parameters
    ----------
    entry
        The model's manifest entry; its spec must be a :class:`~models.inference.manifest.NetworkSpec`.
    backend
        The graph behind the Backend protocol.
    model_dir
        Folder holding side files (CLDLR's SVM), checked against their sha256.

    Raises
    ------
    ManifestError
        The entry is not a complete family entry (no operating point, an unknown task, ...).
    ModelRegistryError
        A side file is missing or does not match its sha256.
    """

    members: tuple[str, ...] = ()  # reads pixels: needs no other model's score

    def __init__(self, entry: ModelEntry, backend: Backend, model_dir: Path) -> None:
        self.entry = entry
        self._backend = backend
        self.spec = entry.spec_as(NetworkSpec)
        self.family = self.spec.family
        self.task: Task = self.spec.task
        self.input_size = self.spec.input_size
        self.threshold = self.spec.operating_point
        side_files = verified_side_files(entry, model_dir)
        self._svm = SvmModel.load(side_files["cldlr"]) if "cldlr" in side_files else None
        # The paper's comparison models: image features alone (DLR) and clinical variables alone.
        self._variant_svms = {name: SvmModel.load(side_files[name]) for name in CLDLR_VARIANTS if name in side_files}
        self._patches: npt.NDArray[np.uint8] | None = None
        self._prototype_sources: list[dict[str, Any]] = []
        if "prototype_patches" in side_files and "prototypes" in side_files:
            with np.load(side_files["prototype_patches"]) as data:
                self._patches = np.asarray(data["patches"], dtype=np.uint8)
            self._prototype_sources = json.loads(side_files["prototypes"].read_text())

    @property
    def info(self) -> ModelInfo:
        return self.entry.info

    def roi_input(self, gray: npt.NDArray[np.uint8], box: Box) -> tuple[Box, npt.NDArray[np.float32]]:
        """The ROI box around ``box`` and the graph's image input, cut and scaled as the family's paper does.

        The one rule training cuts by too (:func:`models.inference.preprocess.roi_input`), read from the manifest.
        """
        roi = self.spec.roi
        return roi_input(
            gray,
            box,
            normalisation=roi.normalisation,
            padding=roi.expand,
            shortest_side=roi.expand_shortest_side,
            size=self.input_size,
        )

    def score_lesion(self, lesion: LesionView, scored: Mapping[str, FamilyScore]) -> FamilyScore:
        """:meth:`score` of the lesion's box with the study's clinical context (the scorer protocol)."""
        return self.score(lesion.gray, lesion.box, lesion.context)

    def score(
        self, gray: npt.NDArray[np.uint8], box: Box, context: ClinicalContext = NO_CLINICAL_CONTEXT
    ) -> FamilyScore:
        """Score the lesion in ``box`` of the grayscale image ``gray``."""
        window, pixels = self.roi_input(gray, box)
        feed = {"image": pixels}
        notes: list[str] = []
        if "clinical" in self.spec.inputs:
            feed["clinical"] = np.array([age_inputs(context.age_years)], dtype=np.float32)
            if context.age_years is None:
                notes.append("patient age not available: scored from the image alone")
        outputs = self._backend.run(feed)
        details: dict[str, float | str] = {}
        if self._svm is not None:
            clinical = age_inputs(context.age_years) + diameter_inputs(box, context.pixel_spacing_mm)
            if context.age_years is None:
                notes.append("patient age not available to the SVM")
            if context.pixel_spacing_mm is None:
                notes.append("pixel spacing unknown: lesion size not used")
            deep = outputs["deep_features"].reshape(-1)
            clinical_array = np.asarray(clinical, dtype=np.float32)
            probability = float(self._svm.probability(np.concatenate([deep, clinical_array]))[0])
            details["network_probability"] = _softmax_positive(outputs["logits"])
            variant_inputs = {"dlr": deep, "clinical": clinical_array}
            for name, machine in self._variant_svms.items():
                details[f"{name}_only_probability"] = float(machine.probability(variant_inputs[name])[0])
        elif "logit" in outputs:
            probability = float(1.0 / (1.0 + np.exp(-float(outputs["logit"].reshape(-1)[0]))))
        else:
            probability = _softmax_positive(outputs["logits"])
        prototypes: list[PrototypeEvidence] = []
        if "contributions" in outputs:
            contributions = outputs["contributions"].reshape(-1)
            for index in np.argsort(-np.abs(contributions))[:TOP_PROTOTYPES]:
                source = self._prototype_sources[index] if index < len(self._prototype_sources) else {}
                prototypes.append(
                    PrototypeEvidence(
                        index=int(index),
                        malignant=bool(source.get("class", 0)),
                        contribution=float(contributions[index]),
                        patch=self._patches[index] if self._patches is not None else np.zeros((64, 64), np.uint8),
                        source=str(source.get("source_id", "unknown")),
                    )
                )
        raw = outputs["cam"][0]
        if raw.ndim == 3:  # per-class maps (B, classes, h, w): the positive class
            raw = raw[-1]
        cam = normalise_cam(raw, (window[3], window[2]))
        return FamilyScore(
            family=self.family,
            task=self.task.value,
            model=self.info,
            probability=min(1.0, max(0.0, probability)),
            threshold=self.threshold,
            positive=probability >= self.threshold,
            cam=cam,
            roi_box=window,
            notes=tuple(notes),
            details=details,
            prototypes=tuple(prototypes),
        )


def load_family_scorer(entry: ModelEntry, model_dir: Path, runtime: InferenceRuntime = CPU_RUNTIME) -> FamilyScorer:
    """A scorer over the checksum-verified ONNX file of ``entry`` on ``runtime``'s backend (ONNX Runtime's CPU one
    by default).

    Raises
    ------
    ManifestError
        The entry is not a complete family entry.
    ModelRegistryError
        The model file or a side file is missing or does not match its sha256.
    """
    entry.spec_as(NetworkSpec)  # refuse an incomplete entry before the graph is read
    return FamilyScorer(entry, runtime.open(entry, model_dir), model_dir)
