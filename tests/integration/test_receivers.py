"""Several receiver processes on one port with one tracker (service.receivers, ``listener_processes``).

Real processes: a :class:`ReceiverPool` of two receivers in front of the
real dispatcher, spool and embedded queue; pynetdicom senders; a receiver
killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.association import Association

from service.dispatcher import Dispatcher
from service.errors import ConfigurationError
from service.queue.embedded import EmbeddedJobQueue
from service.receivers import ReceiverPool
from service.schema import StudyJob
from service.settings import Settings
from service.spool import Spool
from tests.conftest import make_us_dataset, wait_until
from tests.integration.listener_harness import SCP_AE, scu, sealed_jobs

pytestmark = pytest.mark.integration


@dataclass
class PooledService:
    spool: Spool
    queue: EmbeddedJobQueue
    dispatcher: Dispatcher
    pool: ReceiverPool

    def jobs(self) -> list[StudyJob]:
        return sealed_jobs(self.spool)


@pytest.fixture
def pooled(spool_dir: Path, port: int) -> Iterator[Callable[..., PooledService]]:
    started: list[PooledService] = []

    def start(**overrides: object) -> PooledService:
        values: dict[str, object] = dict(
            port=port,
            bind_address="127.0.0.1",
            quiet_period_s=0.5,
            stable_age_s=60.0,
            spool_dir=spool_dir,
            metrics_port=0,
            spool_reserve_mb=0,
            log_level="WARNING",
        )
        values.update(overrides)
        settings = Settings(**values)  # type: ignore[arg-type]
        spool = Spool.from_settings(settings)
        queue = EmbeddedJobQueue(settings, spool)
        dispatcher = Dispatcher(settings, spool, queue, tick_s=0.05)
        dispatcher.recover()
        dispatcher.start()
        pool = ReceiverPool(settings, 2, dispatcher)
        service = PooledService(spool, queue, dispatcher, pool)
        started.append(service)
        pool.start()
        return service

    yield start
    for service in started:
        service.pool.stop()
        service.dispatcher.stop()
        service.queue.close()


def _open(port: int, instances: list[Dataset]) -> Association:
    """An association that stored ``instances`` (each answered 0x0000) and is left open."""
    assoc = scu("TESTSCU").associate("127.0.0.1", port, ae_title=SCP_AE)
    assert assoc.is_established
    for ds in instances:
        status = assoc.send_c_store(ds)
        assert status and status.Status == 0x0000
    return assoc


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    assert wait_until(condition, timeout), f"timed out waiting for {what}"


def test_studies_sent_over_four_associations_are_each_sealed_once_with_every_instance(
    pooled: Callable[..., PooledService],
) -> None:
    service = pooled()
    studies = [generate_uid() for _ in range(12)]
    received_before = REGISTRY.get_sample_value("breastai_instances_received_total", {"modality": "US"}) or 0.0

    def send(share: list[str]) -> None:
        assoc = _open(service.pool.port, [make_us_dataset(study_uid=study) for study in share for _ in range(2)])
        assoc.release()

    threads = [threading.Thread(target=send, args=(studies[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    _wait(lambda: len(service.jobs()) == len(studies), 30, "a job per study")
    jobs = service.jobs()
    assert sorted(job.study_instance_uid for job in jobs) == sorted(studies)
    assert all(len(job.instances) == 2 for job in jobs)
    # The receivers' counts are served by this process's metrics.
    received = REGISTRY.get_sample_value("breastai_instances_received_total", {"modality": "US"}) or 0.0
    assert received - received_before == 2 * len(studies)


def test_a_study_sent_over_associations_in_both_receivers_is_sealed_once_after_the_last_ends(
    pooled: Callable[..., PooledService],
) -> None:
    """The case one tracker per process would get wrong: it would seal the study twice."""
    service = pooled()
    study = generate_uid()
    open_associations: list[Association] = []
    # Associations land where the kernel hands them: open them until both receivers hold one of the study's.
    while min(service.pool.open_associations()) == 0:
        assert len(open_associations) < 30, "every association went to the same receiver"
        open_associations.append(_open(service.pool.port, [make_us_dataset(study_uid=study)]))
        _wait(lambda: sum(service.pool.open_associations()) == len(open_associations), 10, "the stored message")
    first, *others = open_associations
    for assoc in others:
        assoc.release()
    time.sleep(1.5)  # three quiet periods
    assert service.jobs() == [], "sealed while an association that delivered to it was still open"
    first.release()
    _wait(lambda: len(service.jobs()) == 1, 10, "the study's job")
    time.sleep(1.0)  # a second seal would come now
    [job] = service.jobs()
    assert job.study_instance_uid == study
    assert len(job.instances) == len(open_associations)


def test_a_killed_receivers_study_waits_for_the_re_send_and_makes_one_job_and_the_receiver_comes_back(
    pooled: Callable[..., PooledService],
) -> None:
    service = pooled()
    study = generate_uid()
    first = make_us_dataset(study_uid=study)
    assoc = _open(service.pool.port, [first])
    _wait(lambda: sum(service.pool.open_associations()) == 1, 10, "the stored message")
    holder = service.pool.open_associations().index(1)
    victim = service.pool.pids()[holder]
    os.kill(victim, signal.SIGKILL)
    assoc.abort()
    _wait(lambda: service.pool.alive() == 2 and victim not in service.pool.pids(), 30, "the receiver started again")
    # Cut off with its receiver, as by a restart: the study waits for the sender's re-send, not the quiet period.
    time.sleep(1.5)
    assert service.jobs() == []
    second = make_us_dataset(study_uid=study)
    _open(service.pool.port, [first, second]).release()  # the PACS re-sends the whole association
    _wait(lambda: len(service.jobs()) == 1, 15, "the study's job")
    time.sleep(1.0)  # a second job would come now
    [job] = service.jobs()
    assert sorted(ref.sop_instance_uid for ref in job.instances) == sorted(
        [str(first.SOPInstanceUID), str(second.SOPInstanceUID)]
    )


def test_a_receiver_that_cannot_start_fails_the_start_and_frees_the_port(
    pooled: Callable[..., PooledService], tmp_path: Path, port: int
) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigurationError, match="TLS files"):
        pooled(tls_cert_file=missing, tls_key_file=missing)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "nothing listens after the failed start"
