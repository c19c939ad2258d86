"""The pure parts behind several receiver processes (service.receivers): the channel, adoption, the setting, audit."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from service.audit import AuditTrail
from service.dispatcher import Dispatcher
from service.errors import ConfigurationError
from service.receivers import AUTO_MAX_PROCESSES, Channel, receiver_processes, usable_cpus
from service.schema import StudyJob
from service.settings import Settings
from service.spool import Spool
from tests.conftest import make_us_dataset
from tests.dicom_factory import encode


class Collecting:
    """A JobQueue that keeps what is published."""

    def __init__(self) -> None:
        self.published: list[StudyJob] = []

    def publish(self, job: StudyJob) -> None:
        self.published.append(job)

    def consume(self, handler: object, stop: object) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


def test_channel_messages_arrive_whole_and_in_order_from_concurrent_senders() -> None:
    ours, theirs = socket.socketpair()
    sender, receiver = Channel(ours), Channel(theirs)
    big = "x" * 300_000  # larger than a socket buffer: sent in pieces, read back whole

    def send(thread: int) -> None:
        for index in range(50):
            sender.send(("stored", f"{thread}.{index}", big if index == 25 else "", ""))

    threads = [threading.Thread(target=send, args=(thread,)) for thread in range(4)]
    for thread in threads:
        thread.start()
    received = [receiver.recv() for _ in range(200)]
    for thread in threads:
        thread.join()
    assert sorted(message[1] for message in received) == sorted(f"{t}.{i}" for t in range(4) for i in range(50))
    for thread in range(4):  # each sender's messages in its order
        mine = [message[1] for message in received if message[1].startswith(f"{thread}.")]
        assert mine == [f"{thread}.{index}" for index in range(50)]
    assert sum(1 for message in received if message[2] == big) == 4
    sender.close()
    with pytest.raises(EOFError):
        receiver.recv()


def test_unannounced_unsealed_studies_are_adopted_as_interrupted_and_tracked_ones_left_alone(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    now = [1000.0]
    settings = Settings(spool_dir=spool.root, metrics_port=0, quiet_period_s=5.0, stable_age_s=600.0)
    queue = Collecting()
    dispatcher = Dispatcher(settings, spool, queue, clock=lambda: now[0])
    announced, unannounced = make_us_dataset(), make_us_dataset()
    for ds in (announced, unannounced):  # both on disk; only the first reached the tracker
        spool.store_instance(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), encode(ds))
    dispatcher.instance_stored(str(announced.StudyInstanceUID), "association-1")
    assert dispatcher.adopt_unsealed() == [str(unannounced.StudyInstanceUID)]
    assert dispatcher.adopt_unsealed() == []  # once tracked, not adopted again
    dispatcher.association_released("association-1")
    now[0] += 10.0
    dispatcher.tick()
    # The announced study's association ended: sealed after the quiet period. The adopted one is held open as
    # interrupted (its sender was cut off with the receiver and likely re-sends), until stable_age_s.
    assert [job.study_instance_uid for job in queue.published] == [str(announced.StudyInstanceUID)]
    now[0] += 600.0
    dispatcher.tick()
    assert [job.study_instance_uid for job in queue.published][1:] == [str(unannounced.StudyInstanceUID)]


@pytest.mark.parametrize("processes", [-1, 65])
def test_listener_processes_out_of_range_is_refused(processes: int) -> None:
    with pytest.raises(ConfigurationError, match="listener_processes"):
        Settings(listener_processes=processes)


def test_receiver_processes_are_as_set_or_chosen_by_role_and_cores() -> None:
    assert receiver_processes(3, with_worker=True, cpus=2) == 3  # set: as set, whatever the role
    assert receiver_processes(1, with_worker=False, cpus=16) == 1
    assert receiver_processes(0, with_worker=True, cpus=16) == 1  # serve: its worker needs the cores
    assert receiver_processes(0, with_worker=False, cpus=2) == 2  # listen: one per core...
    assert receiver_processes(0, with_worker=False, cpus=16) == AUTO_MAX_PROCESSES  # ... at most this many
    assert receiver_processes(0, with_worker=False, cpus=1) == 1


def test_audit_lines_of_many_studies_land_whole_from_concurrent_associations(tmp_path: Path) -> None:
    """One append-mode write per line: lines longer than a stream's buffer are not interleaved."""
    audit = AuditTrail(tmp_path / "audit")
    studies = [f"1.2.826.0.1.3680043.8.498.{index}" for index in range(400)]  # a line of about 16 KB

    def association(number: int) -> None:
        for repeat in range(5):
            association_id = f"{number}-{repeat}"
            for study in studies:
                audit.stored(association_id, "PACS", "127.0.0.1:1", 0, study)
            audit.ended(association_id, "released")

    threads = [threading.Thread(target=association, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [path] = (tmp_path / "audit").iterdir()
    lines = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    assert len(lines) == 40
    assert all(len(line["studies"]) == len(studies) for line in lines)


def test_an_audit_line_goes_to_its_file_in_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What keeps lines whole across receiver processes: one write of the whole line to an O_APPEND descriptor
    (a buffered stream cuts a line longer than its buffer into writes another process's line can come between)."""
    audit = AuditTrail(tmp_path / "audit")
    real_write = os.write
    writes: list[int] = []

    def recording(descriptor: int, data: bytes) -> int:
        writes.append(len(data))
        return real_write(descriptor, data)

    monkeypatch.setattr(os, "write", recording)
    for index in range(400):
        audit.stored("1", "PACS", "127.0.0.1:1", 0, f"1.2.826.0.1.3680043.8.498.{index}")
    audit.ended("1", "released")
    monkeypatch.undo()
    [path] = (tmp_path / "audit").iterdir()
    assert writes == [path.stat().st_size] and path.stat().st_size > io.DEFAULT_BUFFER_SIZE


@pytest.mark.parametrize(
    ("cpu_max", "cap"),
    [("25000 100000\n", 1), ("150000 100000\n", 2), ("max 100000\n", None), ("garbled", None)],
)
def test_a_cgroup_cpu_quota_caps_the_cores_counted(tmp_path: Path, cpu_max: str, cap: int | None) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text(cpu_max)
    cores = len(os.sched_getaffinity(0))
    assert usable_cpus(quota) == (cores if cap is None else min(cores, cap))
    assert usable_cpus(tmp_path / "absent") == cores
