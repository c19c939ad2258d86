"""The ABVS three-plane classifier as served (Liu et al., Theranostics 2025): plane crops of one lesion in, one
probability out.

Arrays in, a probability out; ONNX Runtime, no torch. For one lesion of an
automated breast volume:

1. every crop (one or more transverse frames around the lesion, one sagittal
   and one coronal crop through its centre) is resized to the graph's input
   side and z-scored on its own (:func:`models.inference.preprocess.standardise`),
   as in training;
2. each transverse frame is paired with the sagittal and the coronal crop and
   the graph (:class:`models.families.abvs.network.ThreePlaneExportWrapper`)
   gives that frame's malignancy probability (softmax of its two logits);
3. the lesion's probability is the mean over the frames
   (:func:`models.inference.decisions.average_frame_probabilities`), the
   paper's test-time rule; above ``spec.operating_point`` (0.5, the paper's) it
   is called malignant.

How the crops should be cut is in the manifest entry (:class:`~models.inference.manifest.ThreePlaneSpec`):
each plane's lesion box grown by ``roi_expand`` on every side, and
``frames`` transverse frames ``frame_step`` voxels apart, as in validation
and test. The shipped weights were trained on volumes *built* from 2-D
B-mode lesions (:mod:`models.training.abvs_volumes`), never on ABVS data:
read ``models/cards/abvs_three_plane.md`` before serving them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.inference.backend import Backend
from models.inference.backends import CPU_RUNTIME, InferenceRuntime
from models.inference.decisions import average_frame_probabilities
from models.inference.findings import ModelInfo
from models.inference.manifest import ABVS_THREE_PLANE_ROLE, ThreePlaneSpec
from models.inference.preprocess import standardise
from models.inference.registry import ModelEntry, read_manifest

MALIGNANT = 1  # class index of the graph's logits, as in models.families.abvs.network


def _plane(crop: npt.NDArray[np.uint8], name: str) -> npt.NDArray[np.uint8]:
    """``crop`` checked: a non-empty 2-D uint8 array."""
    array = np.asarray(crop)
    if array.ndim != 2 or array.dtype != np.uint8 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D uint8 grayscale crop, got {array.dtype} {array.shape}")
    return array


def _frames(transverse: Sequence[npt.NDArray[np.uint8]] | npt.NDArray[np.uint8]) -> list[npt.NDArray[np.uint8]]:
    """The transverse frames as a list; a single 2-D array is taken as one frame, a 3-D one as (frames, rows, cols)."""
    if isinstance(transverse, np.ndarray) and transverse.ndim == 2:
        return [_plane(transverse, "the transverse crop")]
    frames = [_plane(frame, f"transverse crop {index}") for index, frame in enumerate(transverse)]
    if not frames:
        raise ValueError("at least one transverse crop is needed")
    return frames


def malignancy_of(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Per-frame malignancy probability (softmax, class :data:`MALIGNANT`) of (N, 2) logits."""
    values = np.asarray(logits, dtype=np.float64).reshape(-1, 2)
    shifted = np.exp(values - values.max(axis=1, keepdims=True))
    probabilities: npt.NDArray[np.float64] = shifted[:, MALIGNANT] / shifted.sum(axis=1)
    return probabilities


class ThreePlaneScorer:
    """The served three-plane classifier: one graph and the rules of its manifest entry.

    Parameters
    ----------
    backend
        Runs the graph: inputs ``spec.inputs`` (transverse, sagittal, coronal),
        each (N, 1, S, S) float32 with S = ``spec.input_size``; first output the (N, 2) logits.
    spec
        The entry's typed parameters (input side, how crops are cut, operating point).
    model_info
        Name, version and sha256 for reports.
    """

    model_info: ModelInfo

    def __init__(self, backend: Backend, spec: ThreePlaneSpec, model_info: ModelInfo) -> None:
        self._backend = backend
        self.spec = spec
        self.model_info = model_info

    def frame_probabilities(
        self,
        transverse: Sequence[npt.NDArray[np.uint8]],
        sagittal: npt.NDArray[np.uint8],
        coronal: npt.NDArray[np.uint8],
    ) -> npt.NDArray[np.float64]:
        """The malignancy probability of every transverse frame, each paired with the sagittal and coronal crop.

        Raises
        ------
        ValueError
            No transverse crop, or a crop that is not a non-empty 2-D uint8 array.
        """
        frames = _frames(transverse)
        size = self.spec.input_size
        side = _plane(sagittal, "the sagittal crop")
        top = _plane(coronal, "the coronal crop")
        count = len(frames)
        batch = {
            self.spec.inputs[0]: np.concatenate([standardise(frame, size) for frame in frames]),
            self.spec.inputs[1]: np.repeat(standardise(side, size), count, axis=0),
            self.spec.inputs[2]: np.repeat(standardise(top, size), count, axis=0),
        }
        logits = self._backend.run(batch)[self.spec.outputs[0]]
        return malignancy_of(logits)

    def score(
        self,
        transverse: Sequence[npt.NDArray[np.uint8]],
        sagittal: npt.NDArray[np.uint8],
        coronal: npt.NDArray[np.uint8],
    ) -> float:
        """Probability of malignancy of one lesion.

        Parameters
        ----------
        transverse
            One or more transverse crops around the lesion (the central frame
            and its neighbours; the paper averages per-frame probabilities
            over them). A single 2-D array counts as one frame.
        sagittal, coronal
            Crops through the lesion centre.

        Any sizes; uint8 grey; each crop is resized to ``spec.input_size`` and
        z-scored as in training.

        Returns
        -------
        float
            The mean of the frames' probabilities, in [0, 1].

        Raises
        ------
        ValueError
            No transverse crop, or a crop that is not a non-empty 2-D uint8 array.
        """
        probabilities = np.clip(self.frame_probabilities(transverse, sagittal, coronal), 0.0, 1.0)
        return average_frame_probabilities(probabilities)

    def is_malignant(self, probability: float) -> bool:
        """The paper's call: malignant when the lesion's probability *exceeds* the operating point."""
        return bool(probability > self.spec.operating_point)


def three_plane_scorer_of(
    entry: ModelEntry, model_dir: Path | None = None, runtime: InferenceRuntime = CPU_RUNTIME
) -> ThreePlaneScorer:
    """The scorer a manifest entry describes, its file verified against the entry's sha256.

    Raises
    ------
    ModelRegistryError
        The entry is incomplete (:class:`~models.errors.ManifestError`) or of another kind, or its file is missing
        or fails its checksum.
    """
    spec = entry.spec_as(ThreePlaneSpec)  # refused at load, not at the first lesion
    return ThreePlaneScorer(runtime.open(entry, model_dir), spec, entry.info)


def load_three_plane_scorer(
    model_dir: Path | None = None, runtime: InferenceRuntime = CPU_RUNTIME
) -> ThreePlaneScorer | None:
    """The checksum-verified three-plane scorer of a model folder (the bundled models when None).

    Returns
    -------
    ThreePlaneScorer or None
        None when the manifest has no ``abvs_three_plane`` entry (the volume
        is then read by the 2-D B-mode families on its central frames only).

    Raises
    ------
    ModelRegistryError
        The folder has no readable manifest, the entry is incomplete
        (:class:`~models.errors.ManifestError`), or its file fails its checksum.
    """
    entry = read_manifest(model_dir).get(ABVS_THREE_PLANE_ROLE)
    if entry is None:
        return None
    return three_plane_scorer_of(entry, model_dir, runtime)
