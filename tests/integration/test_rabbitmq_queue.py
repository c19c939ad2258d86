"""RabbitMQJobQueue against the real local broker (bounded waits only)."""

from __future__ import annotations

import re
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from pydicom.dataset import Dataset

from service.errors import ConfigurationError, InvalidInstance, QueueUnavailable, TransientError
from service.queue import JobQueue, open_queue
from service.queue.rabbitmq import FAILURE_HEADER, REASON_HEADER, RabbitMQJobQueue
from service.schema import InstanceRef, StudyJob
from service.settings import Settings
from service.spool import Spool
from tests.dicom_factory import encode

pytestmark = pytest.mark.integration


def make_job(job_id: str | None = None) -> StudyJob:
    job_id = job_id or f"test-{uuid.uuid4().hex[:12]}"
    ref = InstanceRef(
        path=f"studies/{job_id}/1.2.3.dcm",
        sha256="0" * 64,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
        sop_instance_uid="1.2.3",
        series_instance_uid="1.2.4",
        modality="US",
    )
    return StudyJob(job_id=job_id, study_instance_uid="1.2.5", created_at="2025-01-01T00:00:00+00:00", instances=(ref,))


class Consumer:
    """consume() on a thread; records handled job ids and any exception it raised."""

    def __init__(self, queue: RabbitMQJobQueue, handler: Callable[[StudyJob], None]) -> None:
        self.seen: list[str] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

        def record(job: StudyJob) -> None:
            self.seen.append(job.job_id)
            handler(job)

        def run() -> None:
            try:
                queue.consume(record, self.stop)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "consumer did not stop"
        assert self.error is None, repr(self.error)


@pytest.fixture
def make_queue(rabbitmq_url: str, queue_name: str) -> Iterator[Callable[..., RabbitMQJobQueue]]:
    made: list[RabbitMQJobQueue] = []

    def make(spool: Spool | None = None) -> RabbitMQJobQueue:
        settings = Settings(queue="rabbitmq", amqp_url=rabbitmq_url, queue_name=queue_name, job_retry_limit=3)
        queue = RabbitMQJobQueue(
            settings,
            spool,
            retry_backoff_s=0.05,
            retry_backoff_cap_s=0.2,
            reconnect_backoff_s=0.2,
            reconnect_backoff_cap_s=1.0,
            stop_grace_s=5.0,
            connection_name=f"breastai-test-{uuid.uuid4().hex[:8]}",
        )
        made.append(queue)
        return queue

    yield make
    for queue in made:
        queue.close()


@pytest.fixture
def broker(rabbitmq_url: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A plain channel for inspecting queues directly."""
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    yield conn.channel()
    conn.close()


def get_one(channel: Any, queue: str, wait: Callable[..., bool], timeout_s: float = 10.0) -> tuple[Any, Any, bytes]:
    got: list[tuple[Any, Any, bytes]] = []

    def poll() -> bool:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            got.append((method, properties, body))
        return bool(got)

    assert wait(poll, timeout_s), f"nothing arrived on {queue}"
    return got[0]


def ready_count(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def sealed_job(spool_dir: Path, us_dataset: Callable[..., Dataset]) -> tuple[Spool, str]:
    """A spool holding one sealed study of one real ultrasound instance, and its job id."""
    spool = Spool(spool_dir)
    ds = us_dataset()
    spool.store_instance(ds.StudyInstanceUID, ds.SOPInstanceUID, encode(ds))
    job_id = spool.seal_study(ds.StudyInstanceUID)
    assert job_id
    return spool, job_id


def test_open_queue_builds_rabbitmq(rabbitmq_url: str, queue_name: str, spool_dir: Path) -> None:
    queue = open_queue(Settings(queue="rabbitmq", amqp_url=rabbitmq_url, queue_name=queue_name), Spool(spool_dir))
    assert isinstance(queue, RabbitMQJobQueue) and isinstance(queue, JobQueue)
    queue.close()


def test_publish_is_confirmed_and_persistent(
    make_queue: Callable[..., RabbitMQJobQueue], broker: Any, queue_name: str, wait: Callable[..., bool]
) -> None:
    queue = make_queue()
    job = make_job()
    queue.publish(job)  # returns only after the broker's confirm
    queue.publish(job)  # a duplicate publish is harmless by contract
    assert ready_count(broker, queue_name) == 2
    _method, properties, body = get_one(broker, queue_name, wait)
    assert StudyJob.from_json(body) == job
    assert properties.delivery_mode == 2
    assert properties.content_type == "application/json"
    assert properties.message_id == job.job_id


def test_queue_is_quorum_with_dead_letter_topology(
    make_queue: Callable[..., RabbitMQJobQueue], broker: Any, queue_name: str
) -> None:
    make_queue().publish(make_job())
    result = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "type", "arguments"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    line = next(line for line in result.stdout.splitlines() if line.split("\t")[0] == queue_name)
    assert "quorum" in line
    assert f"{queue_name}.dlx" in line and "x-delivery-limit" in line
    assert ready_count(broker, f"{queue_name}.dead") == 0


def test_publish_to_unreachable_broker_raises_queue_unavailable(queue_name: str) -> None:
    settings = Settings(queue="rabbitmq", amqp_url="amqp://guest:guest@127.0.0.1:1/%2F", queue_name=queue_name)
    queue = RabbitMQJobQueue(settings)
    with pytest.raises(QueueUnavailable):
        queue.publish(make_job())
    queue.close()


def test_consume_and_ack(
    make_queue: Callable[..., RabbitMQJobQueue], broker: Any, queue_name: str, wait: Callable[..., bool]
) -> None:
    queue = make_queue()
    jobs = [make_job() for _ in range(3)]
    for job in jobs:
        queue.publish(job)
    handled: list[StudyJob] = []
    consumer = Consumer(queue, handled.append)
    try:
        assert wait(lambda: len(handled) == 3, 10)
    finally:
        consumer.close()
    assert handled == jobs  # prefetch 1, one worker: in order
    assert ready_count(broker, queue_name) == 0
    assert ready_count(broker, f"{queue_name}.dead") == 0
    # Nothing was left unacked: a new consumer receives nothing.
    again = Consumer(make_queue(), lambda job: None)
    try:
        assert not wait(lambda: bool(again.seen), 0.5)
    finally:
        again.close()


def test_transient_failure_is_redelivered(
    make_queue: Callable[..., RabbitMQJobQueue], broker: Any, queue_name: str, wait: Callable[..., bool]
) -> None:
    queue = make_queue()
    job = make_job()
    queue.publish(job)
    failures = [TransientError("PACS down")]
    done = threading.Event()

    def handler(job: StudyJob) -> None:
        if failures:
            raise failures.pop()
        done.set()

    consumer = Consumer(queue, handler)
    try:
        assert done.wait(10)
    finally:
        consumer.close()
    assert consumer.seen == [job.job_id, job.job_id]
    assert ready_count(broker, queue_name) == 0
    assert ready_count(broker, f"{queue_name}.dead") == 0


def test_transient_failures_dead_letter_after_retry_limit(
    make_queue: Callable[..., RabbitMQJobQueue], broker: Any, queue_name: str, wait: Callable[..., bool]
) -> None:
    queue = make_queue()
    job = make_job()
    queue.publish(job)

    def handler(job: StudyJob) -> None:
        raise TransientError("PACS down")

    consumer = Consumer(queue, handler)
    try:
        _method, properties, body = get_one(broker, f"{queue_name}.dead", wait)
    finally:
        consumer.close()
    assert consumer.seen == [job.job_id] * 3  # job_retry_limit deliveries
    assert properties.headers[FAILURE_HEADER] == "transient"
    assert "delivery 3 of 3" in properties.headers[REASON_HEADER]
    assert StudyJob.from_json(body) == job


def test_permanent_failure_goes_to_dead_queue_with_reason(
    make_queue: Callable[..., RabbitMQJobQueue],
    broker: Any,
    queue_name: str,
    wait: Callable[..., bool],
    spool_dir: Path,
    us_dataset: Callable[..., Dataset],
) -> None:
    spool, job_id = sealed_job(spool_dir, us_dataset)
    queue = make_queue(spool)
    queue.publish(spool.load_job(job_id))

    def handler(job: StudyJob) -> None:
        raise InvalidInstance("pixel data cannot be decoded")

    consumer = Consumer(queue, handler)
    try:
        _method, properties, body = get_one(broker, f"{queue_name}.dead", wait)
    finally:
        consumer.close()
    assert consumer.seen == [job_id]  # never retried
    assert properties.headers[FAILURE_HEADER] == "permanent"
    assert properties.headers[REASON_HEADER] == "InvalidInstance: pixel data cannot be decoded"
    assert properties.message_id == job_id
    assert StudyJob.from_json(body).job_id == job_id
    assert ready_count(broker, queue_name) == 0
    assert "pixel data cannot be decoded" in (spool_dir / "dead" / job_id / "reason.txt").read_text()


def test_a_job_whose_earlier_deliveries_never_finished_is_dead_lettered_unrun(
    make_queue: Callable[..., RabbitMQJobQueue],
    broker: Any,
    queue_name: str,
    wait: Callable[..., bool],
    spool_dir: Path,
    us_dataset: Callable[..., Dataset],
) -> None:
    """RabbitMQ 4.3 does not count a return after a consumer died.

    The spool's own count stops a job that kills workers.
    """
    spool, job_id = sealed_job(spool_dir, us_dataset)
    for _ in range(3):  # three deliveries that each took a worker down before it could settle (job_retry_limit=3)
        spool.increment_attempts(job_id)
    queue = make_queue(spool)
    queue.publish(spool.load_job(job_id))
    consumer = Consumer(queue, lambda job: None)
    try:
        _method, properties, _body = get_one(broker, f"{queue_name}.dead", wait)
    finally:
        consumer.close()
    assert consumer.seen == []  # not run a fourth time
    assert properties.headers[FAILURE_HEADER] == "permanent"
    assert "delivered 4 times, 3 allowed" in properties.headers[REASON_HEADER]
    assert "delivered 4 times" in (spool_dir / "dead" / job_id / "reason.txt").read_text()


def test_a_duplicate_of_a_completed_job_is_acknowledged_without_running(
    make_queue: Callable[..., RabbitMQJobQueue],
    broker: Any,
    queue_name: str,
    wait: Callable[..., bool],
    spool_dir: Path,
    us_dataset: Callable[..., Dataset],
) -> None:
    """A second copy (a publish retried after a lost confirm) arrives after the first was done and its folder gone."""
    spool, job_id = sealed_job(spool_dir, us_dataset)
    job = spool.load_job(job_id)
    queue = make_queue(spool)
    queue.publish(job)
    consumer = Consumer(queue, lambda job: None)
    try:
        assert wait(lambda: spool.is_completed(job_id), 10.0)
        queue.publish(job)  # the duplicate
        sentinel = make_job()
        queue.publish(sentinel)  # prefetch 1: it is delivered only once the duplicate was settled
        assert wait(lambda: sentinel.job_id in consumer.seen, 10.0)
    finally:
        consumer.close()
    assert consumer.seen == [job_id, sentinel.job_id]  # the duplicate never ran
    assert ready_count(broker, queue_name) == 0
    assert ready_count(broker, f"{queue_name}.dead") == 0 and not (spool_dir / "dead" / job_id).exists()


def test_an_acknowledgement_timeout_reconnects_but_a_queue_mismatch_stops(
    make_queue: Callable[..., RabbitMQJobQueue], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pika import exceptions as pex

    queue = make_queue()
    stop = threading.Event()
    sessions: list[int] = []

    def session(handler: Any, stop_event: threading.Event) -> None:
        sessions.append(1)
        if len(sessions) == 1:
            raise pex.ChannelClosedByBroker(
                406,
                "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. "
                "Timeout value used: 1800000 ms.",
            )
        stop_event.set()

    monkeypatch.setattr(queue, "_consume_session", session)
    queue.consume(lambda job: None, stop)  # returns once the second session ends, instead of raising
    assert len(sessions) == 2

    def mismatch(handler: Any, stop_event: threading.Event) -> None:
        raise pex.ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'jobs'")

    monkeypatch.setattr(queue, "_consume_session", mismatch)
    with pytest.raises(ConfigurationError, match="other arguments"):
        queue.consume(lambda job: None, threading.Event())


def test_malformed_body_goes_to_dead_queue(
    make_queue: Callable[..., RabbitMQJobQueue], broker: Any, queue_name: str, wait: Callable[..., bool]
) -> None:
    queue = make_queue()
    queue.declare(broker)
    broker.basic_publish(
        "",
        queue_name,
        b'{"schema": "breastai.studyjob", "version": 99}',
        pika.BasicProperties(delivery_mode=2, message_id="bad-1"),
    )
    consumer = Consumer(queue, lambda job: None)
    try:
        _method, properties, body = get_one(broker, f"{queue_name}.dead", wait)
    finally:
        consumer.close()
    assert consumer.seen == []
    assert properties.headers[FAILURE_HEADER] == "malformed"
    assert "version" in properties.headers[REASON_HEADER]
    assert body == b'{"schema": "breastai.studyjob", "version": 99}'


def _connection_pids(name_prefix: str) -> list[str]:
    result = subprocess.run(
        ["rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    pids = []
    for line in result.stdout.splitlines():
        if re.search(r'\{"connection_name","' + re.escape(name_prefix), line):
            pids.append(line.split("\t")[0])
    return pids


def test_consumer_survives_forced_connection_close(
    make_queue: Callable[..., RabbitMQJobQueue], broker: Any, queue_name: str, wait: Callable[..., bool]
) -> None:
    queue = make_queue()
    consumer = Consumer(queue, lambda job: None)
    try:
        assert wait(lambda: queue.connections_opened == 1, 10)
        prefix = f"{queue._connection_name}-consumer"
        pids: list[str] = []
        assert wait(lambda: bool(pids.extend(_connection_pids(prefix)) or pids), 10)
        # Close only this test's connection: other sessions may share the broker.
        subprocess.run(
            ["rabbitmqctl", "close_connection", pids[0], "test: forced close"],
            capture_output=True,
            timeout=30,
            check=True,
        )
        assert wait(lambda: queue.connections_opened >= 2, 10), "consumer did not reconnect"
        job = make_job()
        make_queue().publish(job)
        assert wait(lambda: consumer.seen == [job.job_id], 10)
    finally:
        consumer.close()
    assert ready_count(broker, queue_name) == 0


def test_publisher_recovers_after_its_connection_was_closed(
    make_queue: Callable[..., RabbitMQJobQueue], broker: Any, queue_name: str, wait: Callable[..., bool]
) -> None:
    queue = make_queue()
    queue.publish(make_job())
    prefix = f"{queue._connection_name}-publisher"
    pids: list[str] = []
    assert wait(lambda: bool(pids.extend(_connection_pids(prefix)) or pids), 10)
    subprocess.run(
        ["rabbitmqctl", "close_connection", pids[0], "test: forced close"], capture_output=True, timeout=30, check=True
    )
    queue.publish(make_job())  # the stale connection is replaced within the call
    assert ready_count(broker, queue_name) == 2


def test_the_jobs_tool_lists_shows_re_drives_and_purges_dead_letters_in_spool_and_broker(
    make_queue: Callable[..., RabbitMQJobQueue],
    broker: Any,
    queue_name: str,
    rabbitmq_url: str,
    wait: Callable[..., bool],
    spool_dir: Path,
    us_dataset: Callable[..., Dataset],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue 37, 'Tools operations need': breastai jobs, for the embedded queue (the spool's dead/) and RabbitMQ.
    from workers.cli import main

    spool, first = sealed_job(spool_dir, us_dataset)
    second = sealed_job(spool_dir, us_dataset)[1]
    queue = make_queue(spool)
    for job_id in (first, second):
        queue.publish(spool.load_job(job_id))

    def handler(job: StudyJob) -> None:
        raise InvalidInstance("pixel data cannot be decoded")

    consumer = Consumer(queue, handler)
    try:
        assert wait(lambda: ready_count(broker, f"{queue_name}.dead") == 2, 15)
    finally:
        consumer.close()
    flags = ["--spool-dir", str(spool_dir), "--queue", "rabbitmq", "--amqp-url", rabbitmq_url]
    with monkeypatch.context() as patched:
        patched.setenv("BREASTAI_QUEUE_NAME", queue_name)
        assert main(["jobs", "list", *flags]) == 0
        listed = capsys.readouterr().out
        assert "2 dead-lettered job(s)" in listed and first in listed and "pixel data cannot be decoded" in listed
        assert main(["jobs", "show", first, *flags]) == 0
        assert "InvalidInstance: pixel data cannot be decoded" in capsys.readouterr().out
        assert main(["jobs", "retry", first, *flags]) == 0
        assert f"re-driven {first}" in capsys.readouterr().out
        assert spool.is_sealed(first) and not spool.is_published(first)
        # The other dead letter goes back by a nack the broker applies after the tool's call returns: waited for.
        assert wait(lambda: ready_count(broker, f"{queue_name}.dead") == 1, 10), "only the re-driven job's copy is gone"
        assert main(["jobs", "retry", "no-such-job", *flags]) == 2, "an unknown job is refused by name"
        assert main(["jobs", "purge", "--all", *flags]) == 0
        assert not (spool_dir / "dead" / second).exists() and ready_count(broker, f"{queue_name}.dead") == 0
    # The re-driven job runs again like any published one.
    done: list[str] = []
    queue = make_queue(spool)
    queue.publish(spool.load_job(first))
    consumer = Consumer(queue, lambda job: done.append(job.job_id))
    try:
        assert wait(lambda: done == [first], 15)
    finally:
        consumer.close()
