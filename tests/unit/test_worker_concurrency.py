"""worker_concurrency: several jobs at once in one worker process, on the embedded queue and RabbitMQ consumers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from service.errors import ConfigurationError, QueueUnavailable
from service.queue import JobHandler, consume_concurrently
from service.queue.embedded import EmbeddedJobQueue
from service.queue.rabbitmq import RabbitMQJobQueue
from service.schema import StudyJob
from service.settings import Settings
from service.spool import Spool
from tests.dicom_factory import encode

STUDIES = ("1.2.826.0.1.3680043.8.498.71", "1.2.826.0.1.3680043.8.498.72")


def _sealed(spool: Spool, make: Callable[..., Dataset], study: str) -> StudyJob:
    ds = make(study_uid=study)
    spool.store_instance(study, str(ds.SOPInstanceUID), encode(ds))
    job_id = spool.seal_study(study)
    assert job_id
    return spool.load_job(job_id)


def test_two_consumers_of_the_embedded_queue_run_two_jobs_at_once(
    spool_dir: Path, us_dataset: Callable[..., Dataset], wait: Callable[..., bool]
) -> None:
    spool = Spool(spool_dir)
    queue = EmbeddedJobQueue(Settings(job_retry_limit=1), spool)
    jobs = [_sealed(spool, us_dataset, study) for study in STUDIES]
    for job in jobs:
        queue.publish(job)
    # Each job waits inside the handler for the other: one job at a time would break the barrier (and dead-letter).
    together = threading.Barrier(2, timeout=30)
    stop = threading.Event()
    consumer = threading.Thread(
        target=consume_concurrently, args=([queue, queue], lambda job: together.wait(), stop), daemon=True
    )
    consumer.start()
    try:
        assert wait(lambda: not any(spool.is_sealed(job.job_id) for job in jobs), 60)
    finally:
        stop.set()
        consumer.join(10)
    assert not consumer.is_alive()
    assert not (spool_dir / "dead").exists() or not any((spool_dir / "dead").iterdir())


class _Refusing:
    """A queue whose consumer fails at once, as RabbitMQ's does when it refuses the credentials."""

    def publish(self, job: StudyJob) -> None:
        raise AssertionError("not used")

    def consume(self, handler: JobHandler, stop: threading.Event) -> None:
        raise ConfigurationError("RabbitMQ refused the connection")

    def close(self) -> None:
        pass


def test_a_consumer_that_fails_stops_the_others_and_its_error_is_raised(spool_dir: Path) -> None:
    queue = EmbeddedJobQueue(Settings(), Spool(spool_dir))
    stop = threading.Event()
    with pytest.raises(ConfigurationError, match="refused"):
        consume_concurrently([queue, _Refusing()], lambda job: None, stop)
    assert stop.is_set()


def test_one_consumer_runs_on_the_calling_thread_as_before(spool_dir: Path) -> None:
    with pytest.raises(ConfigurationError):
        consume_concurrently([_Refusing()], lambda job: None, threading.Event())


def test_each_rabbitmq_consumer_gets_its_own_connection(spool_dir: Path) -> None:
    from workers.cli import _consumers

    settings = Settings(queue="rabbitmq", worker_concurrency=3)
    spool = Spool(spool_dir)
    first = RabbitMQJobQueue(settings, spool)
    consumers = _consumers(settings, spool, first)
    assert len(consumers) == 3 and consumers[0] is first
    assert len({id(c) for c in consumers}) == 3  # pika connections are not shared between threads
    assert all(isinstance(c, RabbitMQJobQueue) for c in consumers)
    names = {c._parameters("consumer").client_properties["connection_name"] for c in consumers}
    assert len(names) == 3


def test_the_embedded_queue_is_shared_by_its_consumers(spool_dir: Path) -> None:
    from workers.cli import _consumers

    settings = Settings(worker_concurrency=2)
    queue = EmbeddedJobQueue(settings, Spool(spool_dir))
    assert _consumers(settings, Spool(spool_dir), queue) == [queue, queue]


def test_queue_unavailable_in_one_consumer_is_not_lost(spool_dir: Path) -> None:
    class Gone(_Refusing):
        def consume(self, handler: JobHandler, stop: threading.Event) -> None:
            stop.wait(0.05)
            raise QueueUnavailable("broker closed the channel")

    with pytest.raises(QueueUnavailable):
        consume_concurrently([Gone(), Gone()], lambda job: None, threading.Event())
