"""Prometheus metrics of the service, on the default registry.

Labels never carry patient data: only modality, a fixed rejection reason
vocabulary and the transient/permanent split. UIDs are not labels either
(unbounded cardinality); they belong in logs.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import Counter, Gauge, Histogram

# Buckets in seconds: C-STORE round trips and inference are sub-second to
# minutes; the end-to-end path includes the quiet period and result sends.
_INFERENCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_END_TO_END_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
_PUBLISH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

INSTANCES_RECEIVED = Counter(
    "breastai_instances_received_total",
    "DICOM instances stored durably and acknowledged with status 0x0000 (PS3.4 B.2.3)",
    ["modality"],
)
INSTANCES_REJECTED = Counter(
    "breastai_instances_rejected_total",
    "C-STORE requests answered with a failure status, by reason",
    ["reason"],
)
ASSOCIATIONS_REJECTED = Counter(
    "breastai_associations_rejected_total",
    "Associations refused before they were established by our checks (the allow-list and its host bindings), by reason",
    ["reason"],
)
INSTANCES_DUPLICATE = Counter(
    "breastai_instances_duplicate_total",
    "Instances dropped at sealing because an earlier job of their study holds them: the same bytes (a re-send) "
    "or other bytes under the same SOP Instance UID (a conflict; the first is kept)",
    ["outcome"],
)
STUDIES_RECEIVED = Counter(
    "breastai_studies_received_total",
    "Studies sealed as complete and handed to the job queue",
)
JOBS_DONE = Counter("breastai_jobs_done_total", "Jobs whose results were accepted and that were acknowledged")
JOBS_FAILED = Counter(
    "breastai_jobs_failed_total",
    "Job deliveries that failed, by kind (transient = retried, permanent = dead-lettered)",
    ["kind"],
)
INFERENCE_SECONDS = Histogram(
    "breastai_inference_seconds",
    "Analysis time per analysed instance (segmenting, scoring, explaining), waits for shared models included",
    buckets=_INFERENCE_BUCKETS,
)
END_TO_END_SECONDS = Histogram(
    "breastai_end_to_end_seconds",
    "From study dispatch (StudyJob.created_at) to results accepted by the destination",
    buckets=_END_TO_END_BUCKETS,
)
QUEUE_PUBLISH_SECONDS = Histogram(
    "breastai_queue_publish_seconds",
    "Time until a published job is durable (broker confirm or job.json fsync)",
    buckets=_PUBLISH_BUCKETS,
)

RESULT_SEND_FAILURES = Counter(
    "breastai_result_send_failures_total",
    "Result C-STOREs a destination did not accept (each attempt), by destination AE title",
    ["destination"],
)
# Read at each scrape from the objects of the running process (wired in workers.cli).
SPOOL_FREE_BYTES = Gauge("breastai_spool_free_bytes", "Free bytes on the spool's file system")
JOBS_WAITING_PUBLISH = Gauge("breastai_jobs_waiting_publish", "Studies sealed but not yet confirmed by the job queue")
OLDEST_RECEIVING_STUDY_SECONDS = Gauge(
    "breastai_oldest_receiving_study_seconds", "Age of the oldest study still being received (0 if none)"
)
DEAD_LETTERED_JOBS = Gauge("breastai_dead_lettered_jobs", "Jobs in the spool's dead/ folder, kept for an operator")
MODEL_INFO = Gauge(
    "breastai_model_info", "The models this worker serves (value 1), by name and version", ["name", "version"]
)
INFERENCE_BACKEND_INFO = Gauge(
    "breastai_inference_backend_info",
    "Where each served model runs (value 1): tensorrt, cuda (ONNX Runtime's CUDA provider) or cpu, by model name",
    ["model", "backend"],
)

# The closed vocabulary of INSTANCES_REJECTED's reason label.
REJECT_REASONS = (
    "too_large",
    "too_large_decoded",
    "patient_conflict",
    "undecodable",
    "truncated",
    "missing_uid",
    "sop_class_mismatch",
    "sop_instance_mismatch",
    "disk_full",
    "spool_quota",
    "io_error",
    "internal",
)


def observe_end_to_end(created_at: str, now: datetime | None = None) -> float:
    """Record the end-to-end time of a job from its ISO 8601 ``created_at``.

    Returns the observed seconds (0 when the timestamp is unreadable, so a
    bad clock never raises on the result path).
    """
    try:
        start = datetime.fromisoformat(created_at)
    except ValueError:
        return 0.0
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    seconds = max(0.0, ((now or datetime.now(UTC)) - start).total_seconds())
    END_TO_END_SECONDS.observe(seconds)
    return seconds
