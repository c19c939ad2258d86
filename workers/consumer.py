"""Turn one StudyJob into results delivered to the PACS.

``process_study`` is the network-free core shared by the service and by
``breastai analyze``: headers and frames in, SR + secondary-capture
overlays out, with UIDs derived from (study, pipeline, model versions,
source instance) so that re-processing yields the very same objects.
``JobHandler`` adds what a queued job needs around it: checksum
verification against the job, metrics, and delivery.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import structlog
from pydicom import Dataset

from models.inference.pipeline import BModePipeline, family_view
from models.inference.preprocess import crop
from service import metrics
from service.durable import write_durably
from service.errors import InvalidInstance, PatientConflict, PermanentError, UnsupportedInput
from service.image_limits import DEFAULT_IMAGE_LIMITS, ImageLimits
from service.logging import bind_job
from service.schema import StudyJob
from service.spool import PREDECESSOR_FILE, REPORT_FILE, verify_instances
from service.study_identity import patient_key
from workers.clinical import clinical_context
from workers.dicom_reader import read_frames
from workers.routing import BMODE_PIPELINE, route
from workers.sc_writer import build_overlay_image
from workers.sender import ResultSender
from workers.sr_writer import AnalysedFrame, ReportContext, build_report
from workers.uids import derive_uid

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StudyResults:
    """The objects produced for one study: one SR and one overlay per analysed frame."""

    report: Dataset | None
    overlays: tuple[Dataset, ...]
    skipped: tuple[tuple[str, str], ...]  # (SOP Instance UID, reason) of instances not analysed

    @property
    def datasets(self) -> list[Dataset]:
        """Everything to deliver, the report last.

        The report refers to the overlays, so they should be in the PACS
        before it; and if the PACS refuses an overlay for good (the job is
        dead-lettered), no report is left standing without its images.
        """
        return list(self.overlays) + ([self.report] if self.report is not None else [])


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

    Raises
    ------
    PatientConflict
        If the instances belong to more than one patient: no report is built
        (one patient's findings must never be filed under another).
    """
    headers = [read_header(p) for p in paths]
    studies = {str(h.StudyInstanceUID) for h in headers}
    if len(studies) != 1:
        raise InvalidInstance(f"instances of {len(studies)} studies were given as one study")
    patients = {patient_key(h) for h in headers}
    if len(patients) != 1:
        # The listener refuses such instances; this guards what reached the spool another way (analyze, old spools).
        raise PatientConflict(f"the study holds instances of {len(patients)} patients: no report is built")
    study_uid = studies.pop()
    # Result UIDs change with any model or family list change, and only then (PS3.3 C.12.1.1.1: same content, same UID).
    model_key = "|".join(f"{m.name}/{m.version}" for m in pipeline.model_infos)
    analysed: list[AnalysedFrame] = []
    skipped: list[tuple[str, str]] = []
    for path, header in sorted(zip(paths, headers, strict=True), key=lambda item: str(item[1].SOPInstanceUID)):
        chosen = route(header)
        if chosen.pipeline != BMODE_PIPELINE:
            skipped.append((str(header.SOPInstanceUID), chosen.reason))
            continue
        try:
            frames = read_frames(path, limits=limits)
        except PermanentError as exc:
            # One undecodable image must not cost the study its report on the others.
            skipped.append((str(header.SOPInstanceUID), f"not readable: {exc}"))
            continue
        for frame in frames:
            started = time.monotonic()
            analysis = pipeline.analyse(crop(frame.pixels, frame.scan_region_xywh), clinical_context(frame))
            metrics.INFERENCE_SECONDS.observe(time.monotonic() - started)
            analysed.append(AnalysedFrame(frame=frame, analysis=analysis))
    if not analysed:
        unreadable = [reason for _, reason in skipped if reason.startswith("not readable")]
        if unreadable:
            raise UnsupportedInput(f"no image of the study could be analysed: {unreadable[0]}")
        return StudyResults(report=None, overlays=(), skipped=tuple(skipped))
    sources = [f"{a.frame.sop_instance_uid}#{a.frame.frame_number or 1}" for a in analysed]
    overlays: list[Dataset] = []
    # One overlay series per family, so a viewer lists "BreastAI <model> heat-map" series side by side.
    for position, family in enumerate(pipeline.families):
        overlay_series = derive_uid(study_uid, BMODE_PIPELINE, model_key, "overlay-series", family)
        for number, (item, source) in enumerate(zip(analysed, sources, strict=True), start=1):
            view = family_view(item.analysis, family)
            overlays.append(
                build_overlay_image(
                    item.frame,
                    view,
                    series_instance_uid=overlay_series,
                    sop_instance_uid=derive_uid(study_uid, BMODE_PIPELINE, model_key, "overlay", family, source),
                    instance_number=number,
                    context=context,
                    series_number=9902 + position,
                    series_description=f"BreastAI {family} heat-map (advisory)",
                )
            )
    report = build_report(
        analysed,
        evidence=headers,
        series_instance_uid=derive_uid(study_uid, BMODE_PIPELINE, model_key, "report-series"),
        sop_instance_uid=derive_uid(study_uid, BMODE_PIPELINE, model_key, "report", *sources),
        context=context,
        previous_versions=[predecessor] if predecessor is not None else (),
    )
    return StudyResults(report=report, overlays=tuple(overlays), skipped=tuple(skipped))


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
    ) -> None:
        self._spool_root = spool_root
        self._limits = limits
        self._pipeline = pipeline
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
