"""The breast ultrasound B-mode pipeline: segment, classify each lesion, explain.

Arrays in, findings out. Given the grayscale scan region of one frame:

1. the UNet segmenter (EfficientNet-b0 encoder) gives a lesion probability map;
2. threshold + connected components give lesion candidates; where the
   model folder has one, the close-up refiner (:mod:`models.inference.refine`)
   re-outlines each at about its native resolution, and the outlines, boxes
   and areas come from the refined masks;
3. each lesion's box, expanded as each paper expands it, is scored by every
   configured family (:mod:`models.inference.family_scorer`): benign/malignant or
   BI-RADS-risk probability, decision at the model's operating point, and
   its explanation map computed inside the exported graph;
4. a consensus entry (:mod:`models.inference.consensus`) combines its member
   families' scores of the lesion into one;
5. the first malignancy family is the primary score (legend, overlay); with
   DLR_BM and an LH score (the LH consensus, or DLR_LH alone) the BI-RADS
   4A co-decision is added.

Which families run is configuration: a list of manifest roles, by default
the manifest's ``default_pipelines`` entry for the modality. A consensus in
the list brings its members with it (appended, in its own order, when the
list does not name them), so every score it averages is also reported.

Every served entry is read through its typed spec
(:mod:`models.inference.manifest`), and each scorer is loaded by the loader
of its kind (:func:`load_scorer`): an incomplete entry or an altered file
stops loading, so the service refuses to start.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from models.inference.backend import Backend
from models.inference.backends import CPU_RUNTIME, InferenceRuntime
from models.inference.cam import paste
from models.inference.consensus import load_consensus_scorer
from models.inference.decisions import BM_ROLE, co_decision, lh_score
from models.inference.family_scorer import FamilyScorer, load_family_scorer
from models.inference.findings import FamilyScore, ImageAnalysis, Lesion, ModelInfo
from models.inference.lesions import Component, find_components, outline_of, resize_probability
from models.inference.lexicon import load_lexicon_scorer
from models.inference.manifest import REFINER_ROLE as REFINER_ROLE  # defined with the manifest's kinds
from models.inference.manifest import SEGMENTATION_ROLES as SEGMENTATION_ROLES
from models.inference.manifest import SEGMENTER_ROLE as SEGMENTER_ROLE
from models.inference.manifest import (
    ConsensusSpec,
    Modality,
    ModelKind,
    RefinerSpec,
    ScorerSpec,
    SegmenterSpec,
    Task,
)
from models.inference.preprocess import Box, standardise
from models.inference.refine import refine_mask
from models.inference.registry import (
    BUNDLED_MODEL_DIR,
    MANIFEST_NAME,
    ModelEntry,
    ModelRegistryError,
    read_manifest,
    read_manifest_and_pipelines,
)
from models.inference.scorers import NO_CLINICAL_CONTEXT, ClinicalContext, LesionView
from models.inference.scorers import Scorer as Scorer  # the protocol every served scorer follows

Refiner = tuple[Backend, ModelEntry]
#: ``map`` or a thread pool's: how a pipeline applies one step to each lesion of an image (results in order). With a
#: pool the lesions' graph calls run at once, and a :class:`~models.inference.batching.BatchingBackend` batches them.
#: Its tasks must not use the same pool again (they would wait for threads that wait for them).
ParallelMap = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]
Segmentation = tuple[Backend, ModelEntry, Refiner | None]  # the segmenter, its entry, and the refiner if any


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    result: npt.NDArray[np.float32] = (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    return result


def lesion_probability(segmenter: Backend, entry: ModelEntry, gray: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """The segmenter's per-pixel lesion probability for ``gray``, at the image's own size."""
    return _probability(segmenter, entry.spec_as(SegmenterSpec), gray)


def _probability(segmenter: Backend, spec: SegmenterSpec, gray: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    logits = segmenter.run({"image": standardise(gray, spec.input_size)})["logits"][0, 0]
    return resize_probability(_sigmoid(logits), (int(gray.shape[0]), int(gray.shape[1])))


def load_segmenter(
    model_dir: Path | None = None, runtime: InferenceRuntime = CPU_RUNTIME
) -> tuple[Backend, ModelEntry]:
    """The checksum-verified lesion segmenter alone (no classification family is loaded).

    Raises
    ------
    ModelRegistryError
        The manifest lists no segmenter, its entry is incomplete
        (:class:`~models.errors.ManifestError`), or its file fails its checksum.
    """
    return _segmenter_of(read_manifest(model_dir), model_dir, runtime)


def _segmenter_of(
    entries: Mapping[str, ModelEntry], model_dir: Path | None, runtime: InferenceRuntime
) -> tuple[Backend, ModelEntry]:
    if SEGMENTER_ROLE not in entries:
        raise ModelRegistryError(f"the manifest of {model_dir or BUNDLED_MODEL_DIR} lists no {SEGMENTER_ROLE}")
    entry = entries[SEGMENTER_ROLE]
    entry.spec_as(SegmenterSpec)  # refused at load, not at the first image
    return runtime.open(entry, model_dir), entry


def load_refiner(model_dir: Path | None = None, runtime: InferenceRuntime = CPU_RUNTIME) -> Refiner | None:
    """The checksum-verified close-up refiner, or None when the model folder has none.

    Raises
    ------
    ModelRegistryError
        Its entry is incomplete (:class:`~models.errors.ManifestError`) or its file fails its checksum.
    """
    return _refiner_of(read_manifest(model_dir), model_dir, runtime)


def load_segmentation(
    entries: Mapping[str, ModelEntry], model_dir: Path | None, runtime: InferenceRuntime = CPU_RUNTIME
) -> Segmentation:
    """:func:`load_segmenter` and :func:`load_refiner` from entries already read: the lesion outlines as served.

    Raises
    ------
    ModelRegistryError
        As :func:`load_segmenter` and :func:`load_refiner`.
    """
    segmenter, entry = _segmenter_of(entries, model_dir, runtime)
    return segmenter, entry, _refiner_of(entries, model_dir, runtime)


def _refiner_of(entries: Mapping[str, ModelEntry], model_dir: Path | None, runtime: InferenceRuntime) -> Refiner | None:
    entry = entries.get(REFINER_ROLE)
    if entry is None:
        return None
    entry.spec_as(RefinerSpec)
    return runtime.open(entry, model_dir), entry


def segment_lesions(
    segmenter: Backend, entry: ModelEntry, refiner: Refiner | None, gray: npt.NDArray[np.uint8]
) -> list[Component]:
    """The lesion components of ``gray`` as served: coarse components, each re-outlined by the refiner if there is one.

    Largest first, at most as many as the coarse stage found.
    """
    segmentation = entry.spec_as(SegmenterSpec)
    refining = None if refiner is None else (refiner[0], refiner[1].spec_as(RefinerSpec))
    return _segment(segmenter, segmentation, refining, gray)


def _segment(
    segmenter: Backend,
    segmentation: SegmenterSpec,
    refiner: tuple[Backend, RefinerSpec] | None,
    gray: npt.NDArray[np.uint8],
    lesions_map: ParallelMap = map,
) -> list[Component]:
    probability = _probability(segmenter, segmentation, gray)
    components = find_components(
        probability, threshold=segmentation.threshold, min_area_fraction=segmentation.min_area_fraction
    )
    if refiner is None:
        return components
    backend, spec = refiner

    def refined(component: Component) -> Component:
        mask = refine_mask(backend, spec.input_size, gray, component.mask, spec.threshold, spec.window_expand)
        x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
        return Component(mask, (x, y, w, h), int(mask.sum()), outline_of(mask), float(probability[mask].mean()))

    return sorted(lesions_map(refined, components), key=lambda c: c.area_px, reverse=True)


class BModePipeline:
    """Lesion segmentation + every configured family's score and explanation for one B-mode image.

    Parameters
    ----------
    segmenter, segmenter_entry
        The segmentation backend and its manifest entry (its
        :class:`~models.inference.manifest.SegmenterSpec`: input size,
        threshold, smallest lesion).
    scorers
        The families to run on each lesion, in report order; at least one
        must answer the malignancy task (the primary score), and every
        consensus's members must be among them.
    """

    def __init__(
        self, segmenter: Backend, segmenter_entry: ModelEntry, scorers: Sequence[Scorer], refiner: Refiner | None = None
    ) -> None:
        primary = [s for s in scorers if s.task is Task.MALIGNANCY]
        if not primary:
            raise ModelRegistryError(
                "the B-mode pipeline needs at least one benign/malignant family; got "
                + ", ".join(s.family for s in scorers)
            )
        # Scorers that read pixels are run first; those combining other scores (a consensus) after, from theirs.
        graphs = {s.entry.role for s in scorers if not s.members}
        for combining in (s for s in scorers if s.members):
            missing = [role for role in combining.members if role not in graphs]
            if missing:
                raise ModelRegistryError(f"consensus {combining.entry.role} needs {', '.join(missing)} in the pipeline")
        self._segmenter = segmenter
        self._seg = segmenter_entry
        self._refiner = refiner
        # Specs resolved once here, not per image.
        self._seg_spec = segmenter_entry.spec_as(SegmenterSpec)
        self._refining = None if refiner is None else (refiner[0], refiner[1].spec_as(RefinerSpec))
        self._scorers = tuple(primary[:1]) + tuple(s for s in scorers if s is not primary[0])

    @property
    def segmenter_info(self) -> ModelInfo:
        """Identity of what drew the outlines (TID 4019 of every measurement drawn on them).

        With a refiner, both stages drew them: names, versions and sha256
        digests of the segmenter and the refiner, each pair joined by " + ".
        """
        if self._refiner is None:
            return self._seg.info
        segmenter, refiner = self._seg.info, self._refiner[1].info
        return ModelInfo(
            f"{segmenter.name} + {refiner.name}",
            f"{segmenter.version} + {refiner.version}",
            f"{segmenter.sha256} + {refiner.sha256}",
        )

    @property
    def classifier_info(self) -> ModelInfo:
        """Identity of the primary classification model."""
        return self._scorers[0].info

    @property
    def model_infos(self) -> tuple[ModelInfo, ...]:
        """Every model that contributes to a result: segmenter (and refiner) first, then the families in order."""
        refiner = () if self._refiner is None else (self._refiner[1].info,)
        return (self._seg.info, *refiner, *(s.info for s in self._scorers))

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(s.family for s in self._scorers)

    @property
    def backends(self) -> Mapping[str, Backend]:
        """Every graph the pipeline runs, by manifest role, read-only: the segmenter, the refiner, each family's.

        Consensus and lexicon scorers hold no graph and are not listed. For measuring the pipeline against its
        graphs run bare (bench/analysis.py); the analysis itself does not read it.
        """
        held: dict[str, Backend] = {self._seg.role: self._segmenter}
        if self._refiner is not None:
            held[self._refiner[1].role] = self._refiner[0]
        for scorer in self._scorers:
            if isinstance(scorer, FamilyScorer):
                held[scorer.entry.role] = scorer._backend
        return MappingProxyType(held)

    def analyse(
        self,
        gray: npt.NDArray[np.uint8],
        context: ClinicalContext = NO_CLINICAL_CONTEXT,
        lesions_map: ParallelMap = map,
    ) -> ImageAnalysis:
        """Find, score and explain the lesions of one grayscale image (each lesion's steps through ``lesions_map``)."""
        return self.analyse_lesions(gray, self.segment(gray, lesions_map), context, lesions_map)

    def segment(self, gray: npt.NDArray[np.uint8], lesions_map: ParallelMap = map) -> list[Component]:
        """The lesion outlines of one image as :meth:`analyse` finds them, without scoring them (largest first)."""
        return _segment(self._segmenter, self._seg_spec, self._refining, gray, lesions_map)

    def analyse_lesions(
        self,
        gray: npt.NDArray[np.uint8],
        components: Sequence[Component],
        context: ClinicalContext = NO_CLINICAL_CONTEXT,
        lesions_map: ParallelMap = map,
    ) -> ImageAnalysis:
        """Score and explain given outlines of one image (found elsewhere, e.g. tracked through a volume)."""
        shape = (int(gray.shape[0]), int(gray.shape[1]))
        lesions = tuple(
            lesions_map(lambda c: self.score_lesion(gray, c.box, c.outline_xy, c.area_px, context, c.mask), components)
        )
        return ImageAnalysis(
            lesions=lesions, segmenter=self.segmenter_info, classifier=self.classifier_info, image_shape=shape
        )

    def lesion_probability(self, gray: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """Per-pixel lesion probability at the image's own size."""
        return _probability(self._segmenter, self._seg_spec, gray)

    def score_lesion(
        self,
        gray: npt.NDArray[np.uint8],
        box: Box,
        outline: npt.NDArray[np.float32],
        area: int,
        context: ClinicalContext = NO_CLINICAL_CONTEXT,
        mask: npt.NDArray[np.bool_] | None = None,
    ) -> Lesion:
        """Score the lesion in ``box`` (outlined by ``mask``) with every family; the first gives headline and map."""
        return score_lesion(self._scorers, gray, box, outline, area, context, mask)


def score_lesion(
    scorers: Sequence[Scorer],
    gray: npt.NDArray[np.uint8],
    box: Box,
    outline: npt.NDArray[np.float32],
    area: int,
    context: ClinicalContext = NO_CLINICAL_CONTEXT,
    mask: npt.NDArray[np.bool_] | None = None,
) -> Lesion:
    """Score one lesion with ``scorers`` (the primary first); any pipeline, whatever found the lesion.

    Scorers reading pixels run first, those combining other scores (a
    consensus) after, from theirs; the BI-RADS 4A co-decision is made when
    both of its scores are among them.
    """
    view = LesionView(gray, box, mask, context)
    by_role: dict[str, FamilyScore] = {}
    for scorer in scorers:
        if not scorer.members:
            by_role[scorer.entry.role] = scorer.score_lesion(view, by_role)
    for scorer in scorers:
        if scorer.members:
            by_role[scorer.entry.role] = scorer.score_lesion(view, by_role)
    scores = tuple(by_role[s.entry.role] for s in scorers)
    primary = scores[0]
    by_family = {s.family: s for s in scores}
    decision = None
    lh, bm = lh_score(by_family), by_family.get(BM_ROLE)
    if lh is not None and bm is not None:
        decision = co_decision(lh.probability, bm.probability, lh.threshold, bm.threshold)
    return Lesion(
        outline_xy=outline,
        bbox_xywh=box,
        area_px=area,
        malignancy_probability=primary.probability,
        cam=paste(primary.cam, primary.roi_box, gray.shape[:2]),
        family_scores=scores,
        co_decision=decision,
    )


TASK_LABELS = {"malignancy": "malignancy", "birads_high": "BI-RADS 4/5"}


def family_view(analysis: ImageAnalysis, family: str) -> ImageAnalysis:
    """The analysis as one family saw it: that family's probability and map per lesion (for its overlay).

    Raises
    ------
    KeyError
        A lesion has no score from ``family``.
    """
    lesions = []
    model = analysis.classifier
    task = "malignancy"
    for lesion in analysis.lesions:
        score = next(s for s in lesion.family_scores if s.family == family)
        model, task = score.model, score.task
        lesions.append(
            dataclasses.replace(
                lesion,
                malignancy_probability=score.probability,
                cam=paste(score.cam, score.roi_box, analysis.image_shape),
                prototypes=score.prototypes,
            )
        )
    return dataclasses.replace(
        analysis, lesions=tuple(lesions), classifier=model, score_label=TASK_LABELS.get(task, task)
    )


def default_families(model_dir: Path | None = None, modality: str = "US") -> tuple[str, ...]:
    """The manifest's ``default_pipelines[modality]`` list (roles), or else every classifier of that modality.

    Raises
    ------
    ManifestError
        Without a list, a classifier's entry is incomplete (its modality cannot be trusted).
    """
    directory = model_dir or BUNDLED_MODEL_DIR
    body: dict[str, Any] = json.loads((directory / MANIFEST_NAME).read_text())
    pipelines = body.get("default_pipelines", {})
    # The entries are read only where the manifest lists no pipeline for the modality.
    entries = {} if pipelines.get(modality) else read_manifest(directory)
    return default_families_of(pipelines, entries, modality)


def default_families_of(pipelines: Any, entries: Mapping[str, ModelEntry], modality: str) -> tuple[str, ...]:
    """:func:`default_families` from the manifest's ``default_pipelines`` and entries, already read."""
    listed = pipelines.get(modality)
    if listed:
        return tuple(str(role) for role in listed)
    wanted = Modality(modality)
    return tuple(
        role
        for role, entry in sorted(entries.items())
        if role not in SEGMENTATION_ROLES and isinstance(entry.spec, ScorerSpec) and entry.spec.modality is wanted
    )


def load_bmode_pipeline(
    model_dir: Path | None = None, runtime: InferenceRuntime = CPU_RUNTIME, families: Sequence[str] = ()
) -> BModePipeline:
    """Load the segmenter and the configured families (default: the manifest's US list) on ``runtime``'s backend.

    Raises
    ------
    ModelRegistryError
        A configured family is not in the manifest, or a file fails its checksum.
    """
    entries, pipelines = read_manifest_and_pipelines(model_dir)
    directory = model_dir or BUNDLED_MODEL_DIR
    chosen = tuple(families) or default_families_of(pipelines, entries, "US")
    missing = [f for f in chosen if f not in entries]
    if missing:
        raise ModelRegistryError(
            f"configured families {', '.join(missing)} are not in {directory / MANIFEST_NAME} "
            f"(it has {', '.join(sorted(entries))})"
        )
    scorers: list[Scorer] = []
    for role in with_consensus_members(chosen, entries):
        scorers.append(load_scorer(entries[role], entries, directory, runtime))
    segmenter, seg = _segmenter_of(entries, model_dir, runtime)
    return BModePipeline(
        segmenter=segmenter, segmenter_entry=seg, scorers=scorers, refiner=_refiner_of(entries, model_dir, runtime)
    )


def load_scorer(
    entry: ModelEntry,
    entries: Mapping[str, ModelEntry],
    model_dir: Path,
    runtime: InferenceRuntime = CPU_RUNTIME,
) -> Scorer:
    """The scorer a manifest entry describes, by the loader of its kind (ONNX family, consensus, lexicon).

    Raises
    ------
    ModelRegistryError
        The entry is incomplete (:class:`~models.errors.ManifestError`), is
        not a scorer, or a file it needs fails its checksum.
    """
    kind = entry.spec.kind
    if kind is ModelKind.FAMILY:
        return load_family_scorer(entry, model_dir, runtime)
    if kind is ModelKind.CONSENSUS:
        return load_consensus_scorer(entry, entries, model_dir)
    if kind is ModelKind.LEXICON:
        return load_lexicon_scorer(entry, entries, model_dir)
    raise ModelRegistryError(f"model {entry.role} is a {kind.value} model: it does not score lesions")


def with_consensus_members(chosen: Sequence[str], entries: Mapping[str, ModelEntry]) -> tuple[str, ...]:
    """``chosen`` followed by the members of any consensus in it that ``chosen`` does not name.

    Raises
    ------
    ManifestError
        A chosen entry is incomplete.
    """
    roles = list(chosen)
    for role in chosen:
        spec = entries[role].spec
        if isinstance(spec, ConsensusSpec):
            roles += [m for m in spec.members if m not in roles]
    return tuple(roles)
