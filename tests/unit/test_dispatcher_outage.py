"""A broker outage costs one backoff and one log line, not one per pending job (issue 37, failure 5)."""

from __future__ import annotations

from pathlib import Path

import structlog

from service.dispatcher import Dispatcher
from service.errors import QueueUnavailable
from service.schema import StudyJob
from service.settings import Settings
from service.spool import Spool
from tests.conftest import make_us_dataset
from tests.dicom_factory import encode


class Broker:
    """A JobQueue whose broker is down until ``up`` is set; counts every publish attempt."""

    def __init__(self) -> None:
        self.up = False
        self.attempts = 0
        self.published: list[str] = []

    def publish(self, job: StudyJob) -> None:
        self.attempts += 1
        if not self.up:
            raise QueueUnavailable("connection refused")
        self.published.append(job.job_id)

    def consume(self, handler: object, stop: object) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


def _sealed_jobs(spool: Spool, count: int) -> None:
    for _ in range(count):
        ds = make_us_dataset()
        spool.store_instance(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), encode(ds))
        assert spool.seal_study(str(ds.StudyInstanceUID)) is not None


def test_pending_jobs_wait_out_an_outage_together_and_it_is_logged_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    _sealed_jobs(spool, 30)
    broker = Broker()
    now = [1000.0]
    settings = Settings(spool_dir=spool.root, metrics_port=0)
    dispatcher = Dispatcher(
        settings, spool, broker, publish_backoff_s=0.5, publish_backoff_cap_s=4.0, clock=lambda: now[0]
    )
    dispatcher.recover()
    with structlog.testing.capture_logs() as logs:
        for _ in range(200):  # 20 s of a broker outage at the dispatcher's 0.1 s ticks
            dispatcher.tick()
            now[0] += 0.1
        attempts_while_down = broker.attempts
        broker.up = True
        now[0] += 5.0
        dispatcher.tick()
    events = [entry["event"] for entry in logs]
    # One attempt per backoff step (0.5, 1, 2, 4, 4, ... s), not one per job and tick: 30 jobs x 200 ticks before.
    assert attempts_while_down <= 12
    assert events.count("queue_unavailable") == 1 and events.count("queue_available") == 1
    assert not any(entry["log_level"] in ("error", "critical") for entry in logs)
    assert len(broker.published) == 30 and dispatcher.pending_publish() == []
