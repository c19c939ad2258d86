"""The embedded job queue: in-process, durable through the spool.

For a single process that runs listener and workers together. The spool
is the only durable record: a job is "published" once its sealed
directory and fsynced ``job.json`` exist, "acked" by removing the
directory, "dead-lettered" by moving it to ``dead/``. The in-memory queue
holds only job ids, so a restart re-enqueues every job still under
``studies/`` and loses nothing. Delivery counts live in the job's
``attempts`` file, so a job that crashes the process on every try still
reaches ``job_retry_limit`` and is dead-lettered.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from service import metrics
from service.errors import BreastAIError, JobSchemaError, TransientError
from service.logging import bind_job
from service.queue import JobHandler, retry_backoff
from service.schema import StudyJob

if TYPE_CHECKING:
    from service.settings import Settings
    from service.spool import Spool

log = structlog.get_logger("service.queue.embedded")


class EmbeddedJobQueue:
    """In-process :class:`~service.queue.JobQueue` over the spool.

    Parameters
    ----------
    settings
        ``job_retry_limit`` is read from here.
    spool
        The spool whose ``studies/`` directory is the queue's durable state.
    retry_backoff_s, retry_backoff_cap_s
        Capped exponential delay before a transiently failed job is redelivered.
    recover
        Enqueue every sealed job found in the spool now (a restart).
    clock
        Monotonic clock, replaceable in tests.
    """

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        *,
        retry_backoff_s: float = 1.0,
        retry_backoff_cap_s: float = 300.0,
        recover: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._spool = spool
        self._retry_limit = settings.job_retry_limit
        self._backoff_s = retry_backoff_s
        self._backoff_cap_s = retry_backoff_cap_s
        self._clock = clock
        self._cond = threading.Condition()
        self._ready: list[tuple[float, int, str]] = []  # (ready_at, seq, job_id) heap
        self._pending: set[str] = set()
        self._seq = itertools.count()
        self._closed = False
        if recover:
            for job in spool.sealed_jobs():
                self._enqueue(job.job_id, delay_s=0.0)
            if self._pending:
                log.info("jobs_recovered", count=len(self._pending))

    def _enqueue(self, job_id: str, delay_s: float) -> None:
        with self._cond:
            if job_id in self._pending:
                return  # republishing a queued job is a no-op (publish is idempotent)
            self._pending.add(job_id)
            heapq.heappush(self._ready, (self._clock() + delay_s, next(self._seq), job_id))
            self._cond.notify_all()

    def publish(self, job: StudyJob) -> None:
        """Enqueue a sealed job; durable once its job.json is on disk.

        Raises
        ------
        JobSchemaError
            If ``job`` is not a sealed job of this spool (it could never be
            delivered, so there is nothing to retry).
        """
        start = time.perf_counter()
        if not self._spool.is_sealed(job.job_id):
            raise JobSchemaError(f"job {job.job_id} is not sealed in the spool; cannot be queued")
        if not (self._spool.studies_dir / job.job_id / "job.json").is_file():
            self._spool.write_job(job)
        self._enqueue(job.job_id, delay_s=0.0)
        metrics.QUEUE_PUBLISH_SECONDS.observe(time.perf_counter() - start)

    def pending(self) -> int:
        """Jobs enqueued and not yet settled (for status and tests)."""
        with self._cond:
            return len(self._pending)

    def _next(self, stop: threading.Event, timeout_s: float) -> str | None:
        deadline = self._clock() + timeout_s
        with self._cond:
            while not stop.is_set() and not self._closed:
                now = self._clock()
                if self._ready and self._ready[0][0] <= now:
                    return heapq.heappop(self._ready)[2]
                if now >= deadline:
                    return None
                wake = deadline if not self._ready else min(deadline, self._ready[0][0])
                self._cond.wait(max(0.0, wake - now))
        return None

    def consume(self, handler: JobHandler, stop: threading.Event) -> None:
        """Deliver jobs to ``handler`` on this thread until ``stop`` is set."""
        while not stop.is_set() and not self._closed:
            job_id = self._next(stop, timeout_s=0.2)
            if job_id is not None:
                self._deliver(job_id, handler)

    def _settle(self, job_id: str) -> None:
        with self._cond:
            self._pending.discard(job_id)

    def _deliver(self, job_id: str, handler: JobHandler) -> None:
        if not self._spool.is_sealed(job_id):
            self._settle(job_id)  # completed or dead-lettered elsewhere meanwhile
            return
        try:
            job = self._spool.load_job(job_id)
        except BreastAIError as exc:
            self._dead_letter(job_id, f"job cannot be loaded: {exc}")
            return
        attempt = self._spool.increment_attempts(job_id)
        with bind_job(job_id=job_id, study_uid=job.study_instance_uid):
            if attempt > self._retry_limit:
                # Earlier deliveries ended without a verdict (the process died).
                self._dead_letter(
                    job_id, f"delivered {attempt - 1} times without finishing (retry limit {self._retry_limit})"
                )
                return
            log.info("job_started", attempt=attempt)
            try:
                handler(job)
            except TransientError as exc:
                metrics.JOBS_FAILED.labels(kind="transient").inc()
                if attempt >= self._retry_limit:
                    self._dead_letter(
                        job_id,
                        f"transient failure on delivery {attempt} of {self._retry_limit}: {type(exc).__name__}: {exc}",
                    )
                    return
                delay = retry_backoff(attempt, self._backoff_s, self._backoff_cap_s)
                log.warning("job_retry", attempt=attempt, retry_in_s=delay, error=type(exc).__name__, reason=str(exc))
                self._settle(job_id)
                self._enqueue(job_id, delay_s=delay)
                return
            except Exception as exc:  # PermanentError and anything unexpected: never loop
                metrics.JOBS_FAILED.labels(kind="permanent").inc()
                self._dead_letter(job_id, f"{type(exc).__name__}: {exc}")
                return
            self._spool.complete(job_id)
            self._settle(job_id)
            metrics.JOBS_DONE.inc()
            log.info("job_done", attempt=attempt)

    def _dead_letter(self, job_id: str, reason: str) -> None:
        self._spool.dead_letter(job_id, reason)
        self._settle(job_id)
        log.error("job_dead_lettered", job_id=job_id, reason=reason)

    def close(self) -> None:
        """Wake and end any consume loop; queued jobs stay durable in the spool."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
