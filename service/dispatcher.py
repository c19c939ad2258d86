"""Glue between listener and job queue: decides when a study becomes a job.

Owns the :class:`~service.tracker.StudyTracker` (the pure "is it
complete?" core) and a background thread that ticks every ``tick_s``:
each due study is sealed in the spool, turned into a StudyJob and
published. A publish that fails with QueueUnavailable is retried with
capped backoff; the sealed directory stays on disk meanwhile, so a broker
outage or a crash loses nothing (:meth:`recover` republishes at start).

After a confirmed publish the job gets the spool's ``published`` marker;
only jobs without it are republished, by :meth:`recover` at start and by
a sweep every :data:`RESCAN_INTERVAL_S` for a job whose seal failed half way.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import structlog

from service import metrics
from service.errors import BreastAIError, PermanentError, QueueUnavailable
from service.queue import JobQueue, retry_backoff
from service.schema import StudyJob
from service.settings import Settings
from service.spool import Spool
from service.tracker import StudyTracker

log = structlog.get_logger("service.dispatcher")


# How often sealed-but-unpublished jobs are looked for on disk (see _adopt_unpublished_jobs).
RESCAN_INTERVAL_S = 30.0


class Dispatcher:
    """Seal complete studies and publish them as jobs.

    Parameters
    ----------
    settings
        ``quiet_period_s`` and ``stable_age_s`` for the tracker.
    spool, queue
        Where studies are sealed, and where jobs go.
    tick_s
        Period of the background thread.
    publish_backoff_s, publish_backoff_cap_s
        Capped exponential delay between publish attempts of one job.
    clock
        Monotonic clock, replaceable in tests.
    """

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        queue: JobQueue,
        *,
        tick_s: float = 0.25,
        publish_backoff_s: float = 0.5,
        publish_backoff_cap_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._spool = spool
        self._queue = queue
        self._tick_s = tick_s
        self._backoff_s = publish_backoff_s
        self._backoff_cap_s = publish_backoff_cap_s
        self._clock = clock
        self._tracker = StudyTracker(settings.quiet_period_s, settings.stable_age_s)
        self._lock = threading.Lock()  # guards tracker, calling AEs and the unpublished map
        self._calling_ae: dict[str, set[str]] = {}
        self._unpublished: dict[str, StudyJob] = {}
        self._next_rescan = 0.0
        # The broker, not each job, is what is down: one backoff gate for every waiting job and one log line per
        # outage (publish thread only).
        self._broker_failures = 0
        self._broker_down_since: float | None = None
        self._publish_after = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- listener events (any association thread) -----------------------------------

    def instance_stored(self, study_uid: str, association_id: str, calling_ae: str = "") -> None:
        """An instance of ``study_uid`` is durable in the spool."""
        with self._lock:
            self._tracker.instance_received(study_uid, association_id, self._clock())
            if calling_ae:
                self._calling_ae.setdefault(study_uid, set()).add(calling_ae)

    def association_released(self, association_id: str) -> None:
        """An association ended (released, aborted or connection closed)."""
        with self._lock:
            self._tracker.association_released(association_id, self._clock())

    def association_interrupted(self, association_id: str) -> None:
        """An association was cut off with the receiver process that held it (service.receivers)."""
        with self._lock:
            self._tracker.association_interrupted(association_id, self._clock())

    # --- lifecycle ------------------------------------------------------------------

    def recover(self) -> None:
        """Pick up what a previous process left in the spool.

        Unsealed studies re-enter the tracker as interrupted from now, the
        restart, not from their files' times: their association died with
        the previous process, and a PACS re-sends an aborted association,
        often a minute later. They complete when a new association that
        delivered to them ends and the quiet period passes, or after
        ``stable_age_s``. Sealed jobs without the ``published`` marker are
        published again.
        """
        now = self._clock()
        studies = self._spool.unsealed_studies()
        jobs = [job for job in self._spool.sealed_jobs() if not self._spool.is_published(job.job_id)]
        with self._lock:
            for study in studies:
                self._tracker.restore(study.study_uid, now, interrupted=True)
            for job in jobs:
                self._unpublished.setdefault(job.job_id, job)
        log.info("spool_recovered", unsealed_studies=len(studies), unpublished_jobs=len(jobs))

    def adopt_unsealed(self) -> list[str]:
        """Track the unsealed studies the tracker does not know; returns their Study Instance UIDs.

        For a receiver process that died (service.receivers): an instance it
        stored may not have been announced (the process died between the
        rename and the message), and nothing else would seal that study
        before the next restart. Like :meth:`recover`, each is held open as
        interrupted from now: its sender, cut off with the process, likely
        re-sends it.
        """
        now = self._clock()
        studies = self._spool.unsealed_studies()
        with self._lock:
            known = set(self._tracker.tracked())
            adopted = [study.study_uid for study in studies if study.study_uid not in known]
            for study_uid in adopted:
                self._tracker.restore(study_uid, now, interrupted=True)
        if adopted:
            log.warning("unannounced_studies_adopted", studies=len(adopted))
        return adopted

    def start(self) -> None:
        """Start the background tick thread; returns at once."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="breastai-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop ticking. Unsealed studies and unpublished jobs stay on disk for recover()."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the thread must outlive any single bad study
                log.exception("dispatcher_tick_failed")
            self._stop.wait(self._tick_s)

    # --- the work -------------------------------------------------------------------

    def tick(self) -> list[str]:
        """Seal due studies and publish what is pending; returns published job ids."""
        now = self._clock()
        with self._lock:
            due = self._tracker.due(now)
        for study_uid in due:
            self._seal(study_uid, now)
        if now >= self._next_rescan:
            self._next_rescan = now + RESCAN_INTERVAL_S
            self._adopt_unpublished_jobs()
            self._spool.ensure_reserve()  # made again once a full disk has room (it may have been used up)
            self._spool.forget_old_deliveries()
        return self._publish_pending(self._clock())

    def _adopt_unpublished_jobs(self) -> None:
        """Queue sealed jobs that are neither published nor pending here.

        A seal that failed after its rename (disk full, I/O error) leaves a
        job directory that no study in the tracker points to any more; this
        periodic sweep publishes it instead of waiting for a restart.
        """
        jobs = [job for job in self._spool.sealed_jobs() if not self._spool.is_published(job.job_id)]
        with self._lock:
            adopted = [job.job_id for job in jobs if job.job_id not in self._unpublished]
            for job in jobs:
                self._unpublished.setdefault(job.job_id, job)
        if adopted:
            log.warning("unpublished_jobs_adopted", job_ids=adopted)

    def _seal(self, study_uid: str, now: float) -> None:
        with self._lock:
            last_seen = self._tracker.last_seen(study_uid)
            # Forget before sealing: an instance stored after the rename is
            # then tracked afresh and becomes the next job instead of being lost.
            self._tracker.forget(study_uid)
            calling = tuple(sorted(self._calling_ae.pop(study_uid, set())))
        try:
            job_id = self._spool.seal_study(study_uid, calling)
        except PermanentError as exc:
            job_id = getattr(exc, "job_id", None)
            log.error("sealed_study_invalid", study_uid=study_uid, reason=str(exc))
            if job_id is not None:
                self._spool.dead_letter(job_id, f"cannot build job: {exc}")
            return
        except OSError as exc:
            log.error("study_seal_retry", study_uid=study_uid, error=str(exc))
            with self._lock:
                self._tracker.restore(study_uid, last_seen if last_seen is not None else now)
                self._calling_ae.setdefault(study_uid, set()).update(calling)
            return
        if job_id is None:
            return  # its instances were already sealed into an earlier job
        job = self._spool.load_job(job_id)
        metrics.STUDIES_RECEIVED.inc()
        log.info("study_sealed", job_id=job_id, study_uid=study_uid, instances=len(job.instances))
        with self._lock:
            self._unpublished[job_id] = job

    def _publish_pending(self, now: float) -> list[str]:
        if now < self._publish_after:
            return []  # the broker is down: every waiting job waits out the same backoff
        with self._lock:
            ready = list(self._unpublished.values())
        published = []
        for job in ready:
            job_id = job.job_id
            try:
                self._queue.publish(job)
            except QueueUnavailable as exc:
                self._broker_unavailable(len(self._unpublished), exc)
                break
            except BreastAIError as exc:
                # Not retryable: the queue refuses this job (e.g. it was already
                # completed and removed meanwhile). Dead-letter if still on disk.
                log.error("publish_refused", job_id=job_id, reason=str(exc))
                with self._lock:
                    self._unpublished.pop(job_id, None)
                if self._spool.is_sealed(job_id):
                    self._spool.dead_letter(job_id, f"publish refused: {exc}")
                continue
            self._broker_available()
            with self._lock:
                self._unpublished.pop(job_id, None)
            with contextlib.suppress(OSError, BreastAIError):  # a fast consumer already completed it: nothing to mark
                self._spool.mark_published(job_id)
            published.append(job_id)
            log.info("job_published", job_id=job_id, study_uid=job.study_instance_uid)
        return published

    def _broker_unavailable(self, waiting: int, exc: QueueUnavailable) -> None:
        """The broker refused a publish: every waiting job waits one broker backoff; one warning per outage.

        Trying each pending job on its own connection, each with its own
        backoff and log line, turned a 20-second RabbitMQ outage into
        thousands of error lines and connections.
        """
        self._broker_failures += 1
        delay = retry_backoff(self._broker_failures, self._backoff_s, self._backoff_cap_s)
        self._publish_after = self._clock() + delay
        if self._broker_down_since is None:
            self._broker_down_since = self._clock()
            log.warning("queue_unavailable", waiting_jobs=waiting, retry_in_s=delay, reason=str(exc))
        else:
            log.debug("publish_retry", waiting_jobs=waiting, attempt=self._broker_failures, retry_in_s=delay)

    def _broker_available(self) -> None:
        """A publish went through: end the outage, if there was one, with one line."""
        if self._broker_down_since is not None:
            log.info("queue_available", down_s=round(self._clock() - self._broker_down_since, 1))
        self._broker_failures = 0
        self._broker_down_since = None

    @property
    def broker_available(self) -> bool:
        """Whether the last publish went through (or none failed yet): readiness of a listener over RabbitMQ."""
        return self._broker_down_since is None

    @property
    def running(self) -> bool:
        """Whether the tick thread is alive (liveness)."""
        return self._thread is not None and self._thread.is_alive()

    def oldest_receiving_age(self) -> float:
        """Seconds since the least recently active study still being received got an instance (0 if none)."""
        with self._lock:
            oldest = self._tracker.oldest_last_seen()
        return 0.0 if oldest is None else max(0.0, self._clock() - oldest)

    def pending_publish(self) -> list[str]:
        """Job ids sealed but not yet confirmed by the queue."""
        with self._lock:
            return sorted(self._unpublished)

    def tracked_studies(self) -> list[str]:
        """Studies still receiving (for status and tests)."""
        with self._lock:
            return self._tracker.tracked()
