"""Embedded queue: ack removes, permanent dead-letters, transient retries, restart recovers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from service.errors import InvalidInstance, QueueUnavailable, TransientError
from service.queue import JobQueue, open_queue
from service.queue.embedded import EmbeddedJobQueue
from service.schema import StudyJob
from service.settings import Settings
from service.spool import Spool
from tests.dicom_factory import encode

STUDY = "1.2.826.0.1.3680043.8.498.2"


def sealed_job(spool: Spool, make: Callable[..., Dataset]) -> StudyJob:
    ds = make(study_uid=STUDY)
    spool.store_instance(STUDY, str(ds.SOPInstanceUID), encode(ds))
    job_id = spool.seal_study(STUDY)
    assert job_id
    return spool.load_job(job_id)


class Runner:
    """Runs consume() on a thread; records the jobs the handler saw."""

    def __init__(self, queue: EmbeddedJobQueue, handler: Callable[[StudyJob], None]) -> None:
        self.seen: list[str] = []
        self.stop = threading.Event()

        def record(job: StudyJob) -> None:
            self.seen.append(job.job_id)
            handler(job)

        self.thread = threading.Thread(target=queue.consume, args=(record, self.stop), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


def make_queue(spool: Spool, **kwargs: object) -> EmbeddedJobQueue:
    settings = Settings(job_retry_limit=3)
    return EmbeddedJobQueue(settings, spool, retry_backoff_s=0.01, retry_backoff_cap_s=0.05, **kwargs)  # type: ignore[arg-type]


def test_open_queue_builds_embedded(spool_dir: Path) -> None:
    queue = open_queue(Settings(), Spool(spool_dir))
    assert isinstance(queue, EmbeddedJobQueue) and isinstance(queue, JobQueue)
    queue.close()


def test_ack_removes_job(spool_dir: Path, us_dataset: Callable[..., Dataset], wait: Callable[..., bool]) -> None:
    spool = Spool(spool_dir)
    queue = make_queue(spool)
    job = sealed_job(spool, us_dataset)
    queue.publish(job)
    runner = Runner(queue, lambda job: None)
    try:
        assert wait(lambda: not spool.is_sealed(job.job_id), 5)
    finally:
        runner.close()
    assert runner.seen == [job.job_id]
    assert queue.pending() == 0
    assert not (spool_dir / "dead" / job.job_id).exists()


def test_publish_is_idempotent_and_refuses_unsealed(spool_dir: Path, us_dataset: Callable[..., Dataset]) -> None:
    spool = Spool(spool_dir)
    queue = make_queue(spool)
    job = sealed_job(spool, us_dataset)
    queue.publish(job)
    queue.publish(job)
    assert queue.pending() == 1
    spool.complete(job.job_id)
    with pytest.raises(Exception) as info:
        queue.publish(job)
    assert "not sealed" in str(info.value)
    assert not isinstance(info.value, QueueUnavailable)  # retrying cannot help


def test_permanent_error_dead_letters_with_reason(
    spool_dir: Path, us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    spool = Spool(spool_dir)
    queue = make_queue(spool)
    job = sealed_job(spool, us_dataset)
    queue.publish(job)

    def handler(job: StudyJob) -> None:
        raise InvalidInstance("pixel data cannot be decoded")

    runner = Runner(queue, handler)
    reason = spool_dir / "dead" / job.job_id / "reason.txt"
    try:
        assert wait(reason.is_file, 5)
    finally:
        runner.close()
    assert "InvalidInstance: pixel data cannot be decoded" in reason.read_text()
    assert runner.seen == [job.job_id]  # never retried


def test_unexpected_exception_is_permanent(
    spool_dir: Path, us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    spool = Spool(spool_dir)
    queue = make_queue(spool)
    job = sealed_job(spool, us_dataset)
    queue.publish(job)

    def handler(job: StudyJob) -> None:
        raise ZeroDivisionError("bug")

    runner = Runner(queue, handler)
    reason = spool_dir / "dead" / job.job_id / "reason.txt"
    try:
        assert wait(reason.is_file, 5)
    finally:
        runner.close()
    assert "ZeroDivisionError" in reason.read_text()
    assert runner.seen == [job.job_id]


def test_transient_error_is_retried_then_succeeds(
    spool_dir: Path, us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    spool = Spool(spool_dir)
    queue = make_queue(spool)
    job = sealed_job(spool, us_dataset)
    queue.publish(job)
    failures = [TransientError("PACS down"), TransientError("PACS still down")]

    def handler(job: StudyJob) -> None:
        if failures:
            raise failures.pop(0)

    runner = Runner(queue, handler)
    try:
        assert wait(lambda: not spool.is_sealed(job.job_id), 5)
    finally:
        runner.close()
    assert runner.seen == [job.job_id] * 3
    assert not (spool_dir / "dead" / job.job_id).exists()


def test_transient_error_dead_letters_after_retry_limit(
    spool_dir: Path, us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    spool = Spool(spool_dir)
    queue = make_queue(spool)
    job = sealed_job(spool, us_dataset)
    queue.publish(job)

    def handler(job: StudyJob) -> None:
        raise TransientError("PACS down")

    runner = Runner(queue, handler)
    reason = spool_dir / "dead" / job.job_id / "reason.txt"
    try:
        assert wait(reason.is_file, 5)
    finally:
        runner.close()
    assert runner.seen == [job.job_id] * 3  # job_retry_limit deliveries, then dead
    assert "delivery 3 of 3" in reason.read_text()


def test_restart_recovers_unacked_job(
    spool_dir: Path, us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    spool = Spool(spool_dir)
    first = make_queue(spool)
    job = sealed_job(spool, us_dataset)
    first.publish(job)
    first.close()  # the process dies before any worker ran the job

    (spool_dir / "studies" / job.job_id / "job.json").unlink()  # and even job.json was lost
    restarted_spool = Spool(spool_dir)
    second = make_queue(restarted_spool)
    assert second.pending() == 1
    runner = Runner(second, lambda job: None)
    try:
        assert wait(lambda: not restarted_spool.is_sealed(job.job_id), 5)
    finally:
        runner.close()
    assert runner.seen == [job.job_id]


def test_job_that_kept_crashing_the_process_is_dead_lettered(
    spool_dir: Path, us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    spool = Spool(spool_dir)
    job = sealed_job(spool, us_dataset)
    for _ in range(3):  # three deliveries that never reached a verdict
        spool.increment_attempts(job.job_id)
    queue = make_queue(spool)
    runner = Runner(queue, lambda job: None)
    reason = spool_dir / "dead" / job.job_id / "reason.txt"
    try:
        assert wait(reason.is_file, 5)
    finally:
        runner.close()
    assert runner.seen == []
    assert "without finishing" in reason.read_text()


def test_consume_returns_when_stopped(spool_dir: Path) -> None:
    queue = make_queue(Spool(spool_dir))
    runner = Runner(queue, lambda job: None)
    runner.close()
    assert runner.seen == []
