"""A full spool disk (a real, small tmpfs): start, answer 0xA700, finish what was accepted, recover by itself.

Issue 37, failure 3: a listener restarted on a full spool exited with a
traceback (rebuilding a job file needs space), so the PACS got "connection
refused" instead of 0xA700, and finished jobs stayed when their done record
could not be written. Mounting a tmpfs needs root (as CI runs); elsewhere
these tests skip and say why.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from service.spool import Spool
from tests.dicom_factory import encode
from tests.integration.listener_harness import Service, scu

pytestmark = pytest.mark.integration
MB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write until the file system refuses; the filler's path (delete it to give the space back)."""
    filler = disk / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def store(spool: Spool, ds: Dataset) -> None:
    spool.store_instance(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), encode(ds))


def test_finishing_work_on_a_full_disk_uses_the_reserve_and_the_reserve_comes_back(
    small_disk: Path, us_dataset: Callable[..., Dataset]
) -> None:
    spool = Spool(small_disk / "spool", reserve_bytes=1 * MB)
    assert (spool.root / ".reserve").stat().st_size == MB
    ds = us_dataset()
    store(spool, ds)
    job_id = spool.seal_study(str(ds.StudyInstanceUID))
    assert job_id is not None
    filler = fill(small_disk)
    assert spool.below_reserve()
    assert spool.complete(job_id), "the done record is written from the reserve"
    assert spool.is_completed(job_id) and not spool.is_sealed(job_id)
    assert not (spool.root / ".reserve").exists()
    assert not spool.ensure_reserve(), "no room yet"
    filler.unlink()
    assert spool.ensure_reserve() and (spool.root / ".reserve").stat().st_size == MB


def test_a_service_started_on_a_full_spool_refuses_with_a700_and_recovers_by_itself(
    small_disk: Path,
    us_dataset: Callable[..., Dataset],
    wait: Callable[..., bool],
    start_service: Callable[..., Service],
) -> None:
    root = small_disk / "spool"
    before = Spool(root, reserve_bytes=1 * MB)
    waiting = us_dataset()
    store(before, waiting)
    job_id = before.seal_study(str(waiting.StudyInstanceUID))
    assert job_id is not None
    (root / "studies" / job_id / "job.json").unlink()  # rebuilding it at start needs space
    del before
    filler = fill(small_disk)

    # None of the spool, queue, dispatcher or listener may raise on a full disk.
    service = start_service(spool_dir=root, quiet_period_s=0.2, stable_age_s=60.0, spool_reserve_mb=1, recover=True)
    spool, settings, port = service.spool, service.settings, service.port
    sender = scu("PACS")
    full = sender.associate("127.0.0.1", port, ae_title=settings.ae_title)
    assert full.is_established, "the listener answers on a full disk"
    assert full.send_c_store(us_dataset()).Status == 0xA700
    full.release()
    filler.unlink()  # space returns
    again = sender.associate("127.0.0.1", port, ae_title=settings.ae_title)
    late = us_dataset()
    assert again.send_c_store(late).Status == 0x0000
    again.release()
    assert wait(lambda: any(job.study_instance_uid == late.StudyInstanceUID for job in spool.sealed_jobs()), 10)
    assert (root / "studies" / job_id / "job.json").is_file(), "the job file is written once there is room"
