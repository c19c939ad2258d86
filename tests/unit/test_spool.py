"""Spool durability: nothing partial is ever visible, sealing is atomic."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from service.errors import InvalidInstance, JobSchemaError, PatientConflict
from service.schema import StudyJob
from service.spool import ALIVE_LOCK, INCOMING_LOCK, Spool, SpoolQuota, read_patient_marker
from tests.dicom_factory import encode

STUDY = "1.2.826.0.1.3680043.8.498.1"


def encoded(make: Callable[..., Dataset], study_uid: str = STUDY, sop_uid: str | None = None) -> tuple[str, bytes]:
    ds = make(study_uid=study_uid, sop_uid=sop_uid)
    return str(ds.SOPInstanceUID), encode(ds)


def visible_files(spool: Spool) -> list[Path]:
    return [p for p in (spool.root / "incoming").rglob("*") if p.is_file()]


def test_store_instance_layout(spool_dir: Path, us_dataset: Callable[..., Dataset]) -> None:
    spool = Spool(spool_dir)
    sop, data = encoded(us_dataset)
    stored = spool.store_instance(STUDY, sop, data)
    assert stored.path == spool_dir / "incoming" / STUDY / f"{sop}.dcm"
    assert stored.path.read_bytes() == data
    assert [p.name for p in spool.tmp_dir.iterdir()] == [ALIVE_LOCK]  # nothing left behind but the liveness lock


def test_same_sop_twice_overwrites(spool_dir: Path, us_dataset: Callable[..., Dataset]) -> None:
    spool = Spool(spool_dir)
    sop, data = encoded(us_dataset)
    spool.store_instance(STUDY, sop, data)
    spool.store_instance(STUDY, sop, data + b"")
    assert len(visible_files(spool)) == 1


@pytest.mark.parametrize(("study", "sop"), [("../../etc", "1.2"), (STUDY, "../x"), (STUDY, "1.2/3"), ("", "1.2")])
def test_peer_cannot_steer_paths(spool_dir: Path, study: str, sop: str) -> None:
    spool = Spool(spool_dir)
    with pytest.raises(InvalidInstance):
        spool.store_instance(study, sop, b"data")
    assert visible_files(spool) == []


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_leaves_nothing_visible(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch, failing: str, us_dataset: Callable[..., Dataset]
) -> None:
    spool = Spool(spool_dir)
    sop, data = encoded(us_dataset)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError) as info:
        spool.store_instance(STUDY, sop, data)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert visible_files(spool) == []
    assert [p.name for p in spool.tmp_dir.iterdir()] == [ALIVE_LOCK]  # nothing left behind but the liveness lock


def test_failed_write_midway_keeps_earlier_version(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch, us_dataset: Callable[..., Dataset]
) -> None:
    spool = Spool(spool_dir)
    sop, data = encoded(us_dataset)
    spool.store_instance(STUDY, sop, data)
    real_fsync = os.fsync
    calls = {"n": 0}

    def fail_first(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fail_first)
    with pytest.raises(OSError):
        spool.store_instance(STUDY, sop, b"partial")
    assert (spool_dir / "incoming" / STUDY / f"{sop}.dcm").read_bytes() == data


def test_stale_tmp_files_are_cleaned_on_open(spool_dir: Path) -> None:
    (spool_dir / "tmp").mkdir()
    (spool_dir / "tmp" / "leftover.tmp").write_bytes(b"half")
    os.utime(spool_dir / "tmp" / "leftover.tmp", (0, 0))
    spool = Spool(spool_dir)
    assert list((spool_dir / "tmp").iterdir()) == [spool.tmp_dir]


def test_seal_builds_job(spool_dir: Path, us_dataset: Callable[..., Dataset]) -> None:
    spool = Spool(spool_dir)
    sops = []
    for _ in range(3):
        sop, data = encoded(us_dataset)
        spool.store_instance(STUDY, sop, data)
        sops.append(sop)
    job_id = spool.seal_study(STUDY, ("US1", "US1", "US2"))
    assert job_id is not None
    assert not (spool_dir / "incoming" / STUDY).exists()
    job = StudyJob.from_json((spool_dir / "studies" / job_id / "job.json").read_bytes())
    assert job.job_id == job_id
    assert job.study_instance_uid == STUDY
    assert [ref.sop_instance_uid for ref in job.instances] == sorted(sops)
    assert all(ref.path.startswith(f"studies/{job_id}/") and ref.modality == "US" for ref in job.instances)
    assert job.calling_ae_titles == ("US1", "US2")
    spool.verify(job)
    assert spool.seal_study(STUDY) is None  # nothing left to seal


def test_seal_of_unknown_study_is_none(spool_dir: Path) -> None:
    assert Spool(spool_dir).seal_study("1.2.3") is None


def test_seal_vs_concurrent_store_race(spool_dir: Path, us_dataset: Callable[..., Dataset]) -> None:
    """Every stored instance ends in exactly one sealed job; none is lost in between."""
    spool = Spool(spool_dir)
    payloads = [encoded(us_dataset) for _ in range(60)]
    stored: list[str] = []
    job_ids: list[str] = []
    done = threading.Event()

    def writer() -> None:
        for sop, data in payloads:
            spool.store_instance(STUDY, sop, data)
            stored.append(sop)
        done.set()

    def sealer() -> None:
        while not done.is_set():
            job_id = spool.seal_study(STUDY)
            if job_id:
                job_ids.append(job_id)
        job_id = spool.seal_study(STUDY)
        if job_id:
            job_ids.append(job_id)

    threads = [threading.Thread(target=writer), threading.Thread(target=sealer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    sealed = sorted(ref.sop_instance_uid for job_id in job_ids for ref in spool.load_job(job_id).instances)
    assert sealed == sorted(stored) == sorted(sop for sop, _ in payloads)
    assert not (spool_dir / "incoming" / STUDY).exists()


def test_sealed_jobs_rebuilds_missing_job_json(spool_dir: Path, us_dataset: Callable[..., Dataset]) -> None:
    spool = Spool(spool_dir)
    sop, data = encoded(us_dataset)
    spool.store_instance(STUDY, sop, data)
    job_id = spool.seal_study(STUDY)
    assert job_id
    (spool_dir / "studies" / job_id / "job.json").unlink()
    jobs = spool.sealed_jobs()
    assert [job.job_id for job in jobs] == [job_id]
    assert jobs[0].instances[0].sop_instance_uid == sop
    assert (spool_dir / "studies" / job_id / "job.json").is_file()


def test_unrebuildable_sealed_job_goes_dead(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    junk = spool_dir / "studies" / "20250101T000000Z-deadbeef0000"
    junk.mkdir()
    (junk / "1.2.3.dcm").write_bytes(b"not dicom")
    assert spool.sealed_jobs() == []
    assert "not readable DICOM" in (spool_dir / "dead" / junk.name / "reason.txt").read_text()


def test_unsealed_studies_report_newest_mtime(spool_dir: Path, us_dataset: Callable[..., Dataset]) -> None:
    spool = Spool(spool_dir)
    first = spool.store_instance(STUDY, *encoded(us_dataset))
    second = spool.store_instance(STUDY, *encoded(us_dataset))
    os.utime(first.path, (1000.0, 1000.0))
    os.utime(second.path, (2000.0, 2000.0))
    [study] = spool.unsealed_studies()
    assert (study.study_uid, study.newest_mtime, study.instance_count) == (STUDY, 2000.0, 2)


def test_complete_dead_letter_and_markers(spool_dir: Path, us_dataset: Callable[..., Dataset]) -> None:
    spool = Spool(spool_dir)
    spool.store_instance(STUDY, *encoded(us_dataset))
    job_a = spool.seal_study(STUDY)
    spool.store_instance(STUDY, *encoded(us_dataset))
    job_b = spool.seal_study(STUDY)
    assert job_a and job_b and job_a != job_b
    assert not spool.is_published(job_a)
    spool.mark_published(job_a)
    assert spool.is_published(job_a)
    assert spool.increment_attempts(job_a) == 1
    assert spool.increment_attempts(job_a) == 2
    assert not spool.is_completed(job_a)
    assert spool.complete(job_a) is True
    assert spool.complete(job_a) is False  # idempotent
    assert not (spool_dir / "studies" / job_a).exists()
    assert spool.is_completed(job_a) and not spool.is_completed(job_b)  # a later duplicate delivery is known as one
    dead = spool.dead_letter(job_b, "PermanentError: undecodable pixels")
    assert dead == spool_dir / "dead" / job_b
    assert (dead / "reason.txt").read_text().strip() == "PermanentError: undecodable pixels"
    # a later delivery of the dead job adds its reason; the first one, which says what went wrong, stays
    spool.dead_letter(job_b, "IntegrityError: spooled instance missing")
    assert (dead / "reason.txt").read_text().splitlines() == [
        "PermanentError: undecodable pixels",
        "IntegrityError: spooled instance missing",
    ]
    # completion records are forgotten after a month, when a spool opens
    os.utime(spool_dir / "done" / job_a, (0, 0))
    assert not Spool(spool_dir).is_completed(job_a)
    assert not spool.is_sealed(job_b)
    assert spool.dead_letter("20990101T000000Z-000000000000", "x") is None
    with pytest.raises(JobSchemaError):
        spool.complete("../incoming")


def test_verify_detects_changed_file(spool_dir: Path, us_dataset: Callable[..., Dataset]) -> None:
    from service.errors import IntegrityError

    spool = Spool(spool_dir)
    stored = spool.store_instance(STUDY, *encoded(us_dataset))
    job_id = spool.seal_study(STUDY)
    assert job_id
    job = spool.load_job(job_id)
    (spool_dir / job.instances[0].path).write_bytes(b"tampered")
    with pytest.raises(IntegrityError):
        spool.verify(job)
    assert not stored.path.exists()


def test_seal_of_file_without_series_uid_is_permanent(spool_dir: Path, us_dataset: Callable[..., Dataset]) -> None:

    spool = Spool(spool_dir)
    ds = us_dataset(study_uid=STUDY)
    del ds.SeriesInstanceUID
    spool.store_instance(STUDY, str(ds.SOPInstanceUID), encode(ds))
    with pytest.raises(InvalidInstance) as info:
        spool.seal_study(STUDY)
    job_id = getattr(info.value, "job_id")
    assert spool.is_sealed(job_id)  # left for the caller to dead-letter by id


def test_a_second_spool_on_the_same_root_keeps_the_first_ones_temporary_files(tmp_path: Path) -> None:
    """Opening a spool (a worker starting) must not delete a live listener's half-written file."""
    first = Spool(tmp_path)
    in_flight = first.tmp_dir / "half-written.tmp"
    in_flight.write_bytes(b"partial")
    Spool(tmp_path)
    assert in_flight.exists()
    old = tmp_path / "tmp" / "deadhost-1-0000"
    old.mkdir()
    os.utime(old, (0, 0))
    Spool(tmp_path)
    assert not old.exists(), "a long-dead process's folder is cleaned up"


def test_an_idle_live_spools_old_temporary_folder_is_kept_and_a_removed_one_comes_back(
    tmp_path: Path, us_dataset: Dataset
) -> None:
    """A listener idle over a weekend keeps its folder; if something removes it anyway, the next C-STORE still lands."""
    listener = Spool(tmp_path)
    os.utime(listener.tmp_dir, (0, 0))  # untouched for decades, as far as the clock can tell
    Spool(tmp_path)  # a worker starting
    assert listener.tmp_dir.is_dir()
    # gone all the same (an operator, a tmp reaper): the next store makes it again and succeeds
    shutil.rmtree(listener.tmp_dir)
    sop, data = encoded(us_dataset)
    assert listener.store_instance(STUDY, sop, data).path.read_bytes() == data
    os.utime(listener.tmp_dir, (0, 0))
    Spool(tmp_path)
    assert listener.tmp_dir.is_dir(), "the remade folder is locked again"
    # once its spool is gone (the process ended), an old folder is cleaned up
    folder = listener.tmp_dir
    del listener
    import gc

    gc.collect()
    os.utime(folder, (0, 0))
    Spool(tmp_path)
    assert not folder.exists()


def test_a_re_sent_study_adds_nothing_and_only_new_instances_make_a_job(
    spool_dir: Path, us_dataset: Callable[..., Dataset]
) -> None:
    # Issue 37, failure 4: a PACS re-sending an interrupted or a finished transfer must not make a second job.
    from service import metrics

    spool = Spool(spool_dir)
    (one, one_bytes), (two, two_bytes) = encoded(us_dataset), encoded(us_dataset)
    spool.store_instance(STUDY, one, one_bytes)
    spool.store_instance(STUDY, two, two_bytes)
    first = spool.seal_study(STUDY)
    assert first is not None and len(spool.load_job(first).instances) == 2
    same = metrics.INSTANCES_DUPLICATE.labels(outcome="same")._value.get()
    conflicting = metrics.INSTANCES_DUPLICATE.labels(outcome="conflict")._value.get()

    spool.store_instance(STUDY, one, one_bytes)
    spool.store_instance(STUDY, two, two_bytes)
    assert spool.seal_study(STUDY) is None, "the whole study again: nothing new, no job"
    assert [p.name for p in spool.studies_dir.iterdir()] == [first]
    assert metrics.INSTANCES_DUPLICATE.labels(outcome="same")._value.get() == same + 2

    changed = us_dataset(study_uid=STUDY, sop_uid=two)  # same UID, other bytes: the first is kept
    changed.PatientAge = "077Y"
    spool.store_instance(STUDY, two, encoded(lambda **_: changed)[1])
    three, three_bytes = encoded(us_dataset)  # a series routed later
    spool.store_instance(STUDY, three, three_bytes)
    later = spool.seal_study(STUDY)
    assert later is not None
    assert [ref.sop_instance_uid for ref in spool.load_job(later).instances] == [three]
    assert metrics.INSTANCES_DUPLICATE.labels(outcome="conflict")._value.get() == conflicting + 1
    assert (spool.studies_dir / first / f"{two}.dcm").read_bytes() == two_bytes


def test_a_study_that_grows_after_delivery_is_sealed_whole_with_its_report_as_predecessor(
    spool_dir: Path, us_dataset: Callable[..., Dataset]
) -> None:
    # Issue 37: instances routed after the report was delivered give one revised report over the whole study.
    spool = Spool(spool_dir, keep_delivered_s=3600)
    first, first_bytes = encoded(us_dataset)
    spool.store_instance(STUDY, first, first_bytes)
    delivered = spool.seal_study(STUDY)
    assert delivered is not None
    (spool.studies_dir / delivered / "report.sr").write_bytes(b"the delivered SR")  # as the worker leaves it
    assert spool.complete(delivered)
    kept = spool.delivered_dir / STUDY
    assert sorted(p.name for p in kept.iterdir()) == sorted([f"{first}.dcm", "report.sr"])

    later, later_bytes = encoded(us_dataset)
    spool.store_instance(STUDY, later, later_bytes)
    revision = spool.seal_study(STUDY)
    assert revision is not None
    assert {ref.sop_instance_uid for ref in spool.load_job(revision).instances} == {first, later}
    assert (spool.studies_dir / revision / "predecessor.sr").read_bytes() == b"the delivered SR"

    without = Spool(spool_dir / "other")  # keep_delivered_s = 0: nothing kept, a later instance stands alone
    without.store_instance(STUDY, first, first_bytes)
    job = without.seal_study(STUDY)
    assert job is not None and without.complete(job)
    assert not any(without.delivered_dir.iterdir())


def test_a_tool_opening_the_spool_leaves_the_delivered_studies_the_service_keeps(spool_dir: Path) -> None:
    # `breastai jobs` beside a running service opens the same spool: it must not sweep what the service keeps.
    from service.settings import Settings

    kept = spool_dir / "delivered" / STUDY
    kept.mkdir(parents=True)
    (kept / "1.2.3.dcm").write_bytes(b"an instance kept for a revision")
    Spool(spool_dir)
    assert kept.is_dir(), "a spool opened without a keep window removes nothing"
    service = Spool.from_settings(Settings(spool_dir=spool_dir, metrics_port=0, spool_reserve_mb=0))
    assert service.keep_delivered_s == 24 * 3600 and kept.is_dir(), "within the service's window: kept"
    Spool(spool_dir, keep_delivered_s=0)
    assert not kept.exists(), "a window of 0 keeps nothing"


def test_the_quota_counts_what_the_spool_holds_and_what_was_stored_since_its_last_walk(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.store_instance("1.2.3", "1.2.3.1", b"x" * 1000)
    assert spool.used_bytes() == 1000
    now = [0.0]
    quota = SpoolQuota(spool, quota_bytes=2500, rescan_s=5.0, clock=lambda: now[0])
    assert quota.admits(1500)
    assert not quota.admits(1501)
    quota.stored(1000)  # stored by the listener before the next walk
    assert not quota.admits(600)
    spool.store_instance("1.2.3", "1.2.3.2", b"x" * 1000)
    now[0] = 5.0  # the walk sees both files, and nothing counted twice
    assert quota.admits(500) and not quota.admits(501)
    assert SpoolQuota(spool, quota_bytes=0).admits(10**12), "0 is no quota"


def test_receivers_sharing_the_quota_cannot_overshoot_it_together_between_walks(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.store_instance("1.2.3", "1.2.3.1", b"x" * 1000)
    now = [0.0]
    # Two receiver processes, each with its own count since the walk: 1000 used, 3000 of headroom.
    receivers = [SpoolQuota(spool, quota_bytes=4000, clock=lambda: now[0], sharers=2) for _ in range(2)]
    admitted = 0
    for _ in range(10):  # each admits instances of 500 bytes while it can
        for quota in receivers:
            if quota.admits(500):
                quota.stored(500)
                admitted += 500
    assert admitted == 3000, "together exactly the headroom, not twice it"
    assert not receivers[0].admits(1501), "an instance larger than a share waits for a walk"


def _fsynced_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every descriptor os.fsync is called on (the real fsync still runs)."""
    real_fsync = os.fsync
    paths: list[str] = []

    def recording(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return paths


def test_a_stored_instance_and_every_new_entry_leading_to_it_are_fsynced_before_store_returns(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch, us_dataset: Callable[..., Dataset]
) -> None:
    spool = Spool(spool_dir)
    sop, data = encoded(us_dataset)
    fsynced = _fsynced_paths(monkeypatch)
    spool.store_instance(STUDY, sop, data, patient_key="a" * 64)
    study_dir = str(spool_dir.resolve() / "incoming" / STUDY)
    assert any(path.startswith(str(spool.tmp_dir.resolve())) for path in fsynced), "the bytes, before the rename"
    assert {study_dir, str((spool_dir / "incoming").resolve()), str((spool_dir / "patients").resolve())} <= set(fsynced)
    # The next instance of the study fsyncs its folder again (its own entry) and the parents (cheap when clean),
    # after the rename that put the instance there: an fsync before it would leave the new entry unsynced.
    fsynced.clear()
    real_replace = os.replace

    def recording_replace(source: str | Path, target: str | Path) -> None:
        fsynced.append(f"replace -> {Path(target).resolve()}")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", recording_replace)
    second_sop, second = encoded(us_dataset)
    spool.store_instance(STUDY, second_sop, second, patient_key="a" * 64)
    renamed = next(i for i, event in enumerate(fsynced) if event.startswith(f"replace -> {study_dir}/"))
    assert study_dir in fsynced[renamed + 1 :], fsynced


def test_a_staged_instance_is_stored_like_bytes_and_a_discarded_one_leaves_nothing(
    spool_dir: Path, us_dataset: Callable[..., Dataset]
) -> None:
    spool = Spool(spool_dir)
    sop, data = encoded(us_dataset)
    stored = spool.store_instance(STUDY, sop, spool.stage_instance(data), patient_key="a" * 64)
    assert stored.path.read_bytes() == data
    refused = spool.stage_instance(b"garbage")
    refused.discard()
    refused.discard()  # idempotent
    assert [p.name for p in spool.tmp_dir.iterdir()] == [ALIVE_LOCK]
    assert visible_files(spool) == [stored.path]


def test_a_staged_write_that_failed_fails_the_store_and_leaves_nothing(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch, us_dataset: Callable[..., Dataset]
) -> None:
    spool = Spool(spool_dir)
    sop, data = encoded(us_dataset)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    staged = spool.stage_instance(data)
    with pytest.raises(OSError) as info:
        spool.store_instance(STUDY, sop, staged)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert visible_files(spool) == []
    assert [p.name for p in spool.tmp_dir.iterdir()] == [ALIVE_LOCK]


def test_the_patient_marker_is_a_durable_file_and_a_marker_written_as_a_link_still_binds(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    spool.store_instance(STUDY, f"{STUDY}.1", b"first", patient_key="a" * 64)
    marker = spool.patients_dir / STUDY
    assert not marker.is_symlink() and marker.read_text() == "a" * 64
    older = "1.2.826.0.1.3680043.8.498.2"
    os.symlink("b" * 64, spool.patients_dir / older)  # as the version before wrote it
    with pytest.raises(PatientConflict):
        Spool(spool_dir).store_instance(older, f"{older}.1", b"other patient", patient_key="a" * 64)
    assert read_patient_marker(spool.patients_dir / older) == "b" * 64


def test_old_patient_links_are_forgotten_like_files(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    older = "1.2.826.0.1.3680043.8.498.2"
    marker = spool.patients_dir / older
    os.symlink("b" * 64, marker)  # a version before wrote links, which point at no file
    os.utime(marker, (0, 0), follow_symlinks=False)  # the link's own time
    Spool(spool_dir)
    assert not marker.is_symlink()


def test_unsealed_studies_pass_over_a_study_sealed_while_they_are_listed(
    spool_dir: Path, us_dataset: Callable[..., Dataset]
) -> None:
    spool = Spool(spool_dir)
    for _ in range(3):
        spool.store_instance(STUDY, *encoded(us_dataset))
    instances = sorted((spool.incoming_dir / STUDY).iterdir())
    real_glob = Path.glob

    def glob_then_seal(self: Path, pattern: str) -> Iterator[Path]:
        listed = list(real_glob(self, pattern))
        if self.name == STUDY:
            spool.seal_study(STUDY)  # the dispatcher seals between the listing and the stat
        return iter(listed)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "glob", glob_then_seal)
        assert spool.unsealed_studies() == []
    assert len(instances) == 3


_HOLD_LOCK = """
import fcntl, os, sys, time
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_another_process_holding_the_incoming_lock_holds_back_the_rename(
    spool_dir: Path, us_dataset: Callable[..., Dataset]
) -> None:
    spool = Spool(spool_dir)
    sop, data = encoded(us_dataset)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(spool_dir / INCOMING_LOCK), "1.0"], stdout=subprocess.PIPE
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    started = time.monotonic()
    spool.store_instance(STUDY, sop, data)
    waited = time.monotonic() - started
    holder.wait(10)
    assert waited >= 0.5, f"stored after {waited:.2f} s while another process held the lock"


_STORE_MANY = """
import os, sys, time
from pathlib import Path
from service.spool import Spool
from tests.conftest import make_us_dataset
from tests.dicom_factory import encode
spool = Spool(Path(sys.argv[1]))
study = sys.argv[2]
payloads = [encode(make_us_dataset(study_uid=study, sop_uid=f"{study}.{n + 1}")) for n in range(int(sys.argv[3]))]
real_replace = os.replace
def slow_replace(*args):  # widens the window between the study folder's lookup and the rename, that the lock closes
    time.sleep(0.005)
    real_replace(*args)
os.replace = slow_replace
for n, data in enumerate(payloads):
    spool.store_instance(study, f"{study}.{n + 1}", data)
"""


def test_a_study_stored_by_another_process_while_this_one_seals_lands_in_exactly_one_job(spool_dir: Path) -> None:
    """The receiver processes of service.receivers store while the dispatcher's process seals."""
    spool = Spool(spool_dir)
    count = 80
    writer = subprocess.Popen(
        [sys.executable, "-c", _STORE_MANY, str(spool_dir), STUDY, str(count)], cwd=Path(__file__).parents[2]
    )
    job_ids = []
    while writer.poll() is None:
        job_id = spool.seal_study(STUDY)
        if job_id:
            job_ids.append(job_id)
    assert writer.returncode == 0
    job_id = spool.seal_study(STUDY)
    if job_id:
        job_ids.append(job_id)
    sealed = [ref.sop_instance_uid for job_id in job_ids for ref in spool.load_job(job_id).instances]
    assert sorted(sealed) == sorted(f"{STUDY}.{index + 1}" for index in range(count))
    assert len(job_ids) > 1, "the seals did interleave with the stores"


def test_a_receivers_spool_leaves_the_housekeeping_to_the_process_that_started_it(tmp_path: Path) -> None:
    record = Spool(tmp_path).done_dir / "old-job"
    record.write_text("")
    os.utime(record, (0, 0))  # long past any keeping time
    Spool(tmp_path, housekeeping=False)
    assert record.exists(), "a receiver (re)starting does not walk the records again"
    Spool(tmp_path)
    assert not record.exists()
