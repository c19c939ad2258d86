"""Turn one StudyJob into results delivered to the PACS.

``process_study`` is the network-free core shared by the service and by
``breastai analyze``: headers and frames in, SR + secondary-capture
overlays out, with UIDs derived from (study, pipeline, model versions,
source instance) so that re-processing yields the very same objects.
``JobHandler`` adds what a queued job needs around it: checksum
verification against the job, metrics, and delivery.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
import structlog
from pydicom import Dataset

from models.inference.findings import FamilyScore, Lesion
from models.inference.fusion import fuse_breasts
from models.inference.mammography_pipeline import MammographyPipeline
from models.inference.manifest import ABVS_THREE_PLANE_ROLE
from models.inference.pipeline import BModePipeline, ParallelMap, family_view
from models.inference.preprocess import crop
from models.inference.three_plane import ThreePlaneScorer
from models.inference.volume import VolumeLesion, lesion_planes, sagittal_plane, seen_on_sagittal, track_lesions
from service import metrics
from service.durable import write_durably
from service.errors import InvalidInstance, PatientConflict, PermanentError, UnsupportedInput
from service.image_limits import DEFAULT_IMAGE_LIMITS, ImageLimits
from service.logging import bind_job
from service.schema import StudyJob
from service.spool import PREDECESSOR_FILE, REPORT_FILE, verify_instances
from service.study_identity import patient_key
from workers.clinical import clinical_context
from workers.dicom_reader import SourceFrame, chest_wall_on_left, read_frames
from workers.frame_geometry import frame_plane
from workers.mammo_cad_sr import build_mammography_cad_report
from workers.routing import ABVS_PIPELINE, BMODE_PIPELINE, MAMMOGRAPHY_PIPELINE, Route, check_pixels, route
from workers.sc_writer import build_overlay_image
from workers.seg_writer import build_segmentation
from workers.sender import ResultSender
from workers.sr_writer import (
    AnalysedFrame,
    MeasurementGroup,
    ReportContext,
    build_report,
    image_laterality,
    measurement_groups,
    patient_study_header,
)
from workers.uids import derive_uid

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StudyResults:
    """The objects produced for one study: one SR and one overlay per analysed frame."""

    report: Dataset | None
    overlays: tuple[Dataset, ...]
    skipped: tuple[tuple[str, str], ...]  # (SOP Instance UID, reason) of instances not analysed
    segmentations: tuple[Dataset, ...] = ()  # one SEG per analysed image with lesions (workers.seg_writer)
    cad_report: Dataset | None = None  # Mammography CAD SR of the analysed mammograms (workers.mammo_cad_sr)

    @property
    def datasets(self) -> list[Dataset]:
        """Everything to deliver, the report last.

        The report refers to the overlays, so they should be in the PACS
        before it; and if the PACS refuses an overlay or a segmentation for
        good (the job is dead-lettered), no report is left standing without
        its images. The Mammography CAD SR goes just before the report: the
        report's arrival is what the bench and tests take as "all results in".
        """
        cad = [self.cad_report] if self.cad_report is not None else []
        return [*self.overlays, *self.segmentations, *cad, *([self.report] if self.report is not None else [])]


def read_header(path: Path) -> Dataset:
    """Read a DICOM header without pixel data (PS3.10 file)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise InvalidInstance(f"{path.name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def process_study(
    paths: Sequence[Path],
    pipeline: BModePipeline,
    context: ReportContext,
    limits: ImageLimits = DEFAULT_IMAGE_LIMITS,
    predecessor: Dataset | None = None,
    mammography: MammographyPipeline | None = None,
    three_plane: ThreePlaneScorer | None = None,
    image_concurrency: int = 1,
) -> StudyResults:
    """Analyse every routable instance of one study and build its SR and overlays.

    Parameters
    ----------
    paths
        All instances of one study (DICOM PS3.10 files).
    pipeline
        The B-mode analysis pipeline (models package).
    context
        Device identity written into the results.
    limits
        The largest image decoded (service.image_limits); larger ones are skipped, named in the SR.
    predecessor
        The report this study's earlier delivery sent, which the new one revises (it names it).
    mammography
        The mammography pipeline, where the model folder has one; without it mammograms are listed as not analysed.
    three_plane
        The ABVS three-plane family, where the model folder has it: each lesion tracked through a volume is then also
        scored on its three orthogonal planes, beside the B-mode families' scores of its central frame.
    image_concurrency
        Instances analysed at once, each with its overlays and segmentation, on as many threads; and as many lesions
        of an image (a mammogram's regions) or frames of a volume at once. The models run outside the GIL, so one
        image's host work (decoding, maps, building its DICOM objects) runs beside another's networks, and a
        :class:`~models.inference.batching.BatchingBackend` gathers the images' and lesions' calls into batches.
        1 analyses them one after the other. The results are the same either way, in the same order (byte for
        byte without batching; a batched run may differ from a single one in a float's last bits).

    Raises
    ------
    PatientConflict
        If the instances belong to more than one patient: no report is built
        (one patient's findings must never be filed under another).
    ValueError
        ``image_concurrency`` below 1.
    """
    if image_concurrency < 1:
        raise ValueError(f"image_concurrency must be >= 1: {image_concurrency!r}")
    headers = [read_header(p) for p in paths]
    studies = {str(h.StudyInstanceUID) for h in headers}
    if len(studies) != 1:
        raise InvalidInstance(f"instances of {len(studies)} studies were given as one study")
    patients = {patient_key(h) for h in headers}
    if len(patients) != 1:
        # The listener refuses such instances; this guards what reached the spool another way (analyze, old spools).
        raise PatientConflict(f"the study holds instances of {len(patients)} patients: no report is built")
    study_uid = studies.pop()
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    ordered = sorted(zip(paths, headers, strict=True), key=lambda item: str(item[1].SOPInstanceUID))
    with _parallel_map(image_concurrency) as frames_map, _parallel_map(image_concurrency) as images_map:
        # Two pools: an image's task hands its lesions (or its volume's frames) to the second and waits for them, so
        # they must not queue behind the image tasks that wait for them. Those steps use no pool themselves.
        analysers = _Analysers(pipeline, mammography, limits, three_plane, frames_map)
        outcomes = list(
            images_map(lambda item: _analyse_instance(item[0], item[1], analysers, study_uid, context), ordered)
        )
    skipped = [(outcome.sop_instance_uid, outcome.skipped) for outcome in outcomes if outcome.skipped is not None]
    analysed = [(outcome.pipeline, item) for outcome in outcomes for item in outcome.frames]
    if not analysed:
        unreadable = [reason for _, reason in skipped if reason.startswith("not readable")]
        if unreadable:
            raise UnsupportedInput(f"no image of the study could be analysed: {unreadable[0]}")
        return StudyResults(report=None, overlays=(), skipped=tuple(skipped))
    # Result UIDs change with any model or family list change, and only then (PS3.3 C.12.1.1.1: same content, same
    # UID); each pipeline's overlays with its own models, the report with every pipeline that ran.
    ran = sorted({name for name, _ in analysed}, key=lambda name: (name != BMODE_PIPELINE, name))
    report_key = "|".join(analysers.model_key(name) for name in ran)
    frames = [item for _, item in analysed]
    sources = [_source(item) for item in frames]
    # Series and instance numbers count over the whole study, known once every image is analysed: one overlay
    # series per pipeline and family (a viewer lists "BreastAI <model> heat-map" series side by side), the
    # pipeline's frames numbered in it in SOP Instance UID order.
    overlays: list[Dataset] = []
    series_number = 9902
    for name in ran:
        per_frame = [by_family for outcome in outcomes if outcome.pipeline == name for by_family in outcome.overlays]
        for index in range(len(analysers.families(name))):
            for number, by_family in enumerate(per_frame, start=1):
                overlay = by_family[index]
                overlay.SeriesNumber = series_number
                overlay.InstanceNumber = number
                overlays.append(overlay)
            series_number += 1
    report = build_report(
        frames,
        evidence=headers,
        series_instance_uid=derive_uid(study_uid, BMODE_PIPELINE, report_key, "report-series"),
        sop_instance_uid=derive_uid(study_uid, BMODE_PIPELINE, report_key, "report", *sources),
        context=context,
        previous_versions=[predecessor] if predecessor is not None else (),
        breast_fusions=fuse_breasts(
            [(item.analysis.modality, image_laterality(item.frame.dataset), item.analysis) for item in frames]
        ),
        not_analysed=[_not_analysed_sentence(by_uid[uid], reason) for uid, reason in skipped if uid in by_uid],
        frame_groups=[groups for outcome in outcomes for groups in outcome.measurement_groups],
    )
    # The same mammography findings as a Mammography CAD SR (TID 4000), which several MG consumers read; its UIDs
    # are derived like the report's, from the mammography models and the mammograms analysed.
    mammograms = [
        (item, source) for (name, item), source in zip(analysed, sources, strict=True) if name == MAMMOGRAPHY_PIPELINE
    ]
    cad_report = None
    if mammograms:
        mg_key = analysers.model_key(MAMMOGRAPHY_PIPELINE)
        cad_report = build_mammography_cad_report(
            [item for item, _ in mammograms],
            evidence=headers,
            series_uid=derive_uid(study_uid, MAMMOGRAPHY_PIPELINE, mg_key, "cad-report-series"),
            sop_uid=derive_uid(study_uid, MAMMOGRAPHY_PIPELINE, mg_key, "cad-report", *(s for _, s in mammograms)),
            context=context,
        )
    return StudyResults(
        report=report,
        overlays=tuple(overlays),
        skipped=tuple(skipped),
        segmentations=tuple(seg for outcome in outcomes for seg in outcome.segmentations),
        cad_report=cad_report,
    )


@contextlib.contextmanager
def _parallel_map(threads: int) -> Iterator[ParallelMap]:
    """``map`` itself for one thread; else a map over a pool of ``threads`` (results in the order given).

    Each call runs in a copy of the caller's context variables, as a call on the caller's thread would: the job's
    log bindings (``bind_job``: job and study) stay on what a task logs. A failing call is raised by the caller's
    iteration; on the way out, calls not yet started are cancelled and the pool is ended.
    """
    if threads == 1:
        yield map
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="study")

    def in_pool(function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        futures = [pool.submit(contextvars.copy_context().run, function, item) for item in items]
        return (future.result() for future in futures)

    try:
        yield in_pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class _InstanceOutcome:
    """One instance of a study analysed, with what is built from it alone; or why it was not analysed."""

    sop_instance_uid: str
    pipeline: str = ""  # the pipeline that analysed it
    frames: tuple[AnalysedFrame, ...] = ()
    overlays: tuple[tuple[Dataset, ...], ...] = ()  # per frame, one per family (series and instance numbers unset)
    measurement_groups: tuple[tuple[MeasurementGroup, ...], ...] = ()  # per frame, for the report (tracking unset)
    segmentations: tuple[Dataset, ...] = ()
    skipped: str | None = None


def _analyse_instance(
    path: Path, header: Dataset, analysers: _Analysers, study_uid: str, context: ReportContext
) -> _InstanceOutcome:
    """Analyse one instance and build what comes of it alone: overlays (not yet numbered), segmentations, and the
    report's measurement groups (not yet tracked).

    What a thread of ``process_study`` does for one image, beside the others'.
    """
    uid = str(header.SOPInstanceUID)
    chosen = route(header)
    try:
        found = analysers.analyse(path, chosen)
    except PermanentError as exc:
        # One undecodable image must not cost the study its report on the others.
        return _InstanceOutcome(uid, skipped=f"not readable: {exc}")
    if isinstance(found, str):
        return _InstanceOutcome(uid, skipped=found)
    name = str(chosen.pipeline)
    model_key = analysers.model_key(name)
    families = analysers.families(name)
    overlays = []
    segmentations = []
    groups = []
    for item in found:
        source = _source(item)
        # The source's patient/study header, repaired once for the overlays of all the families.
        repaired = patient_study_header(item.frame.dataset)
        overlays.append(
            tuple(
                build_overlay_image(
                    item.frame,
                    family_view(item.analysis, family),
                    series_instance_uid=derive_uid(study_uid, name, model_key, "overlay-series", family),
                    sop_instance_uid=derive_uid(study_uid, name, model_key, "overlay", family, source),
                    instance_number=1,  # numbered with the study's other overlays in process_study
                    context=context,
                    series_description=f"BreastAI {family} heat-map (advisory)",
                    header=repaired,
                )
                for family in families
            )
        )
        masks = [_lesion_mask(lesion, item.frame) for lesion in item.analysis.lesions]
        labels = [f"Lesion {number}" for number in range(1, len(masks) + 1)]
        segmentation = build_segmentation(item.frame, masks, labels, item.analysis.segmenter, context, model_key)
        if segmentation is not None:  # None: no lesion, which the report states
            segmentations.append(segmentation)
        groups.append(measurement_groups(item))
    return _InstanceOutcome(
        uid,
        name,
        frames=tuple(found),
        overlays=tuple(overlays),
        measurement_groups=tuple(groups),
        segmentations=tuple(segmentations),
    )


def _source(item: AnalysedFrame) -> str:
    """The analysed frame as UIDs are derived from it: instance and frame number."""
    return f"{item.frame.sop_instance_uid}#{item.frame.frame_number or 1}"


def _not_analysed_sentence(header: Dataset, reason: str) -> str:
    """Which instance was not analysed, as a radiologist finds it in the viewer, and why."""
    series = str(header.get("SeriesDescription") or "").strip()
    where = f"series {header.get('SeriesNumber', '?')}" + (f" ({series})" if series else "")
    return f"Not analysed: image {header.get('InstanceNumber', '?')} of {where}: {reason}."


def _lesion_mask(lesion: Lesion, frame: SourceFrame) -> npt.NDArray[np.bool_]:
    """The lesion's outline filled in the whole frame's pixels (outlines are drawn in the analysed crop)."""
    mask = np.zeros(frame.pixels.shape[:2], dtype=np.uint8)
    offset = np.asarray(frame.scan_region_xywh[:2], dtype=np.float64)
    cv2.fillPoly(mask, [np.rint(lesion.outline_xy.astype(np.float64) + offset).astype(np.int32)], 1)
    return mask.astype(bool)


# Transverse frames of an ABVS volume that are decoded and segmented: every frame of a short volume, evenly spaced
# ones of a long one (a 300-frame sweep at about 0.5 mm: one frame in three, 1.5 mm apart, under the size of the
# smallest lesion the segmenter outlines reliably).
VOLUME_SAMPLED_FRAMES = 100


class _Analysers:
    """The pipelines a worker runs, by route: one image in, its analysed frames (or the reason it was not analysed)."""

    def __init__(
        self,
        bmode: BModePipeline,
        mammography: MammographyPipeline | None,
        limits: ImageLimits,
        three_plane: ThreePlaneScorer | None = None,
        frames_map: ParallelMap = map,
    ) -> None:
        self._bmode = bmode
        self._mammography = mammography
        self._limits = limits
        self._three_plane = three_plane
        self._frames_map = frames_map

    def families(self, name: str) -> tuple[str, ...]:
        if name == MAMMOGRAPHY_PIPELINE and self._mammography is not None:
            return self._mammography.families
        return self._bmode.families

    def model_key(self, name: str) -> str:
        pipeline = self._mammography if name == MAMMOGRAPHY_PIPELINE else self._bmode
        assert pipeline is not None
        models = list(pipeline.model_infos)
        if name == ABVS_PIPELINE and self._three_plane is not None:
            models.append(self._three_plane.model_info)
        return "|".join(f"{m.name}/{m.version}" for m in models)

    def analyse(self, path: Path, chosen: Route) -> list[AnalysedFrame] | str:
        """The instance's analysed frames, or why it was not analysed (a sentence for the report).

        Raises
        ------
        PermanentError
            The image cannot be read (the study goes on without it).
        """
        if chosen.pipeline == BMODE_PIPELINE:
            frames = read_frames(path, max_frames=chosen.max_frames, limits=self._limits)
            # A colour image without a colour flag in its header: its pixels decide (never fed to B-mode as grey).
            chosen = check_pixels(chosen, path, frames)
            if chosen.pipeline != BMODE_PIPELINE:
                return chosen.reason
            analysed = []
            for frame in frames:
                started = time.monotonic()
                gray = crop(frame.pixels, frame.scan_region_xywh)
                analysis = self._bmode.analyse(gray, clinical_context(frame), self._frames_map)
                metrics.INFERENCE_SECONDS.observe(time.monotonic() - started)
                analysed.append(AnalysedFrame(frame=frame, analysis=analysis))
            return analysed
        if chosen.pipeline == MAMMOGRAPHY_PIPELINE:
            if self._mammography is None:
                return "mammography: this worker's model folder has no mammography lesion finder"
            (frame,) = read_frames(path, limits=self._limits)
            rows, columns = frame.pixels.shape
            # The whole film is analysed: no ultrasound scan region, outlines in the image's own pixels.
            whole = dataclasses.replace(frame, scan_region_xywh=(0, 0, int(columns), int(rows)))
            spacings = [s for s in (frame.row_spacing_mm, frame.column_spacing_mm) if s is not None]
            started = time.monotonic()
            analysis = self._mammography.analyse(
                frame.pixels,
                sum(spacings) / len(spacings) if spacings else None,
                chest_wall_on_left(frame.dataset),
                clinical_context(frame),
                self._frames_map,
            )
            metrics.INFERENCE_SECONDS.observe(time.monotonic() - started)
            return [AnalysedFrame(frame=whole, analysis=analysis)]
        if chosen.pipeline == ABVS_PIPELINE:
            return self._analyse_volume(path)
        return chosen.reason

    def _analyse_volume(self, path: Path) -> list[AnalysedFrame]:
        """An ABVS volume: lesions tracked through its sampled transverse frames, each scored on its largest section.

        At most :data:`VOLUME_SAMPLED_FRAMES` frames are decoded (evenly spaced), one at a time by the reader, so a
        300-frame volume costs that many segmenter runs and frames in memory, whatever its length. Lesions sharing
        a central frame are reported together on it; a volume without a lesion is reported on its middle frame.
        """
        frames = read_frames(path, max_frames=VOLUME_SAMPLED_FRAMES, limits=self._limits)
        by_number = {frame.frame_number or 1: frame for frame in frames}
        started = time.monotonic()
        crops = {number: crop(frame.pixels, frame.scan_region_xywh) for number, frame in by_number.items()}
        # The frames segmented side by side where the study's analysis runs on several threads (batched on a GPU).
        segmented = self._frames_map(self._bmode.segment, crops.values())
        lesions = track_lesions(dict(zip(crops, segmented, strict=True)))
        central: dict[int, list[VolumeLesion]] = {}
        for lesion in lesions:
            central.setdefault(lesion.central_frame, []).append(lesion)
        if not central:
            central = {sorted(by_number)[len(by_number) // 2]: []}
        analysed = []
        for number, tracked in sorted(central.items()):
            frame = by_number[number]
            analysis = self._bmode.analyse_lesions(
                crops[number], [lesion.component for lesion in tracked], clinical_context(frame), self._frames_map
            )
            # Each lesion's sagittal check (and three-plane score) side by side, as its B-mode scores were.
            checked = tuple(
                self._frames_map(
                    functools.partial(self._volume_checked, crops, frame), zip(analysis.lesions, tracked, strict=True)
                )
            )
            analysis = dataclasses.replace(analysis, lesions=checked)
            analysed.append(AnalysedFrame(frame=frame, analysis=analysis))
        metrics.INFERENCE_SECONDS.observe(time.monotonic() - started)
        return analysed

    def _volume_checked(
        self, crops: Mapping[int, npt.NDArray[np.uint8]], frame: SourceFrame, pair: tuple[Lesion, VolumeLesion]
    ) -> Lesion:
        """The scored lesion of ``pair`` with what the volume adds of the tracked one: its sagittal check and, where
        the model folder has the family, its three-plane score."""
        scored, lesion = pair
        scored = dataclasses.replace(scored, seen_on_sagittal=self._seen_on_sagittal(crops, lesion, frame))
        return scored if self._three_plane is None else self._with_three_planes(scored, crops, lesion)

    def _seen_on_sagittal(
        self, crops: Mapping[int, npt.NDArray[np.uint8]], lesion: VolumeLesion, frame: SourceFrame
    ) -> bool | None:
        """Whether the segmenter outlines ``lesion`` on the sagittal plane through its centre as well.

        ``None`` where the sampled frames differ in shape (no plane can be cut across them).
        """
        if len({gray.shape for gray in crops.values()}) != 1:
            return None
        x, _y, w, _h = lesion.component.box
        plane = sagittal_plane(crops, x + w // 2, _sweep_step_over_row_spacing(frame, len(crops)))
        return seen_on_sagittal(plane, self._bmode.segment(plane.pixels), lesion)

    def _with_three_planes(
        self, scored: Lesion, crops: Mapping[int, npt.NDArray[np.uint8]], lesion: VolumeLesion
    ) -> Lesion:
        """``scored`` with the three-plane family's score of ``lesion`` added after the B-mode families'."""
        assert self._three_plane is not None
        # The margin it was trained with; the neighbours are sampled frames, not the trainer's 2-slice step.
        planes = lesion_planes(crops, lesion, margin=self._three_plane.spec.roi_expand)
        probability = self._three_plane.score(planes.transverse, planes.sagittal, planes.coronal)
        _x, _y, w, h = lesion.component.box
        score = FamilyScore(
            family=ABVS_THREE_PLANE_ROLE,
            task="malignancy",
            model=self._three_plane.model_info,
            probability=probability,
            threshold=self._three_plane.spec.operating_point,
            positive=self._three_plane.is_malignant(probability),
            cam=np.zeros((max(1, h), max(1, w)), np.float32),  # the family explains nothing: no heat-map
            roi_box=lesion.component.box,
            notes=(f"planes cut from the volume's sampled frames {lesion.frames[0]}-{lesion.frames[-1]}",),
        )
        return dataclasses.replace(scored, family_scores=(*scored.family_scores, score))


def _sweep_step_over_row_spacing(frame: SourceFrame, sampled: int) -> float:
    """Distance between two sampled frames of a volume over the distance between two rows of a frame.

    An Enhanced US Volume places its frames (workers.frame_geometry): the step is the distance between the first
    and last frames' positions over their count. A US Multi-frame from an ABVS says neither; the sweep is then
    taken to be as long as a frame is wide, as an ABVS's is (about 15 cm both ways), which may be wrong by a
    factor of two for another scanner: the sagittal check, not the transverse analysis, depends on it.
    """
    ds = frame.dataset
    count = int(ds.get("NumberOfFrames") or 1)
    first, last = frame_plane(ds, 1), frame_plane(ds, count)
    row_mm = frame.row_spacing_mm
    if first is not None and last is not None and count > 1 and row_mm:
        sweep_mm = float(np.linalg.norm(np.subtract(last.image_position, first.image_position)))
        return sweep_mm / max(1, sampled - 1) / row_mm
    width_px = frame.scan_region_xywh[2] * (frame.column_spacing_mm or 1.0) / (row_mm or 1.0)
    return width_px / max(1, sampled - 1)


def _read_predecessor(path: Path) -> Dataset | None:
    """The SR a revision names as its predecessor, if the spool linked one into the job (service.spool)."""
    if not path.is_file():
        return None
    try:
        return pydicom.dcmread(path)
    except Exception:
        log.warning("predecessor_report_unreadable")
        return None


def _keep_report(report: Dataset, path: Path) -> None:
    """Leave the delivered SR in the job folder, where the spool keeps it for a later revision."""
    try:
        write_durably(path, functools.partial(report.save_as, enforce_file_format=True), path.parent, hidden=True)
    except OSError as exc:  # the results are delivered: a later revision will only lack its predecessor
        log.warning("delivered_report_not_kept", error=type(exc).__name__)


class JobHandler:
    """The queue consumer's handler: process a job and return only once every result was accepted.

    Errors propagate typed (service.errors): the queue adapter requeues
    TransientError and dead-letters PermanentError.
    """

    def __init__(
        self,
        spool_root: Path,
        pipeline: BModePipeline,
        sender: ResultSender,
        context: ReportContext,
        limits: ImageLimits = DEFAULT_IMAGE_LIMITS,
        mammography: MammographyPipeline | None = None,
        three_plane: ThreePlaneScorer | None = None,
        image_concurrency: int = 1,
    ) -> None:
        self._spool_root = spool_root
        self._image_concurrency = image_concurrency
        self._three_plane = three_plane
        self._limits = limits
        self._pipeline = pipeline
        self._mammography = mammography
        self._sender = sender
        self._context = context

    def __call__(self, job: StudyJob) -> None:
        with bind_job(job_id=job.job_id, study_uid=job.study_instance_uid):
            paths = verify_instances(job, self._spool_root)
            job_dir = paths[0].parent  # the job's folder in the spool, where its side files are
            results = process_study(
                paths,
                self._pipeline,
                self._context,
                self._limits,
                predecessor=_read_predecessor(job_dir / PREDECESSOR_FILE),
                mammography=self._mammography,
                three_plane=self._three_plane,
                image_concurrency=self._image_concurrency,
            )
            for sop_instance_uid, reason in results.skipped:
                log.info("instance_not_analysed", sop_instance_uid=sop_instance_uid, reason=reason)
            if results.report is None:
                log.info("study_without_analysable_images", instances=len(job.instances))
            else:
                self._sender.send(results.datasets)
                _keep_report(results.report, job_dir / REPORT_FILE)
                log.info("results_delivered", objects=len(results.datasets), overlays=len(results.overlays))
            metrics.observe_end_to_end(job.created_at)
