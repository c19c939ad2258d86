"""Shared fixtures: free ports, a temporary spool, US test files, RabbitMQ, the service's HTTP endpoints."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from pydicom.dataset import Dataset

from tests import dicom_factory

if TYPE_CHECKING:
    from service.health import Health

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (closed again before returning)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


def make_us_dataset(study_uid: str | None = None, sop_uid: str | None = None, series_uid: str | None = None) -> Dataset:
    """A small valid US Image Storage data set (64x64 MONOCHROME2) from :mod:`tests.dicom_factory`."""
    pixels = (np.arange(64 * 64, dtype=np.uint32) % 251).astype(np.uint8).reshape(64, 64)
    return dicom_factory.make_us_dataset(pixels, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid)


def make_us_file(
    tmp_path: Path, study_uid: str | None = None, sop_uid: str | None = None, series_uid: str | None = None
) -> Path:
    """Write :func:`make_us_dataset` as a PS3.10 file under ``tmp_path``; returns its path."""
    ds = make_us_dataset(study_uid, sop_uid, series_uid)
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# --- RabbitMQ -----------------------------------------------------------------------


def _broker_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The local broker's URL; starts ``rabbitmq-server -detached`` if needed, else skips."""
    if not _broker_answers():
        if shutil.which("rabbitmq-server") is None:
            pytest.skip("RabbitMQ is not running and rabbitmq-server is not installed")
        subprocess.run(["rabbitmq-server", "-detached"], check=False, capture_output=True, timeout=30)
        deadline = time.monotonic() + 60
        while not _broker_answers():
            if time.monotonic() > deadline:
                pytest.skip("RabbitMQ did not come up within 60 s")
            time.sleep(0.5)
    import pika

    # The port answering is not enough: the AMQP listener may still be booting.
    deadline = time.monotonic() + 30
    while True:
        try:
            pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
            return AMQP_URL
        except Exception:
            if time.monotonic() > deadline:
                pytest.skip("RabbitMQ accepts TCP but not AMQP")
            time.sleep(0.5)


@pytest.fixture
def queue_name(rabbitmq_url: str) -> Iterator[str]:
    """A unique queue name; the queue and its .dead / .dlx companions are deleted afterwards."""
    import pika

    name = f"breastai.test.{uuid.uuid4().hex[:10]}"
    yield name
    try:
        conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
        channel = conn.channel()
        for queue in (name, f"{name}.dead"):
            channel.queue_delete(queue)
        channel.exchange_delete(f"{name}.dlx")
        conn.close()
    except Exception:
        pass


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passes; returns the last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


@pytest.fixture
def us_file() -> Callable[..., Path]:
    """Fixture form of :func:`make_us_file` (robust to how tests are imported)."""
    return make_us_file


@pytest.fixture
def us_dataset() -> Callable[..., Dataset]:
    """Fixture form of :func:`make_us_dataset`."""
    return make_us_dataset


@pytest.fixture
def wait() -> Callable[..., bool]:
    """Fixture form of :func:`wait_until`."""
    return wait_until


# --- /metrics and /health ------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """Status and body of ``GET path`` on 127.0.0.1:``port``; an error status is returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@dataclass
class HttpEndpoints:
    """``start_http_endpoints`` serving ``health`` on 127.0.0.1:``port``."""

    port: int
    health: Health = field(repr=False)

    def get(self, path: str) -> tuple[int, bytes]:
        return http_get(self.port, path)


@pytest.fixture
def http_endpoints(port: int) -> Iterator[HttpEndpoints]:
    """The service's /metrics and /health endpoints on a free port, for a fresh ``Health`` (add checks to it)."""
    from service.health import Health, start_http_endpoints

    health = Health()
    server = start_http_endpoints(port, "127.0.0.1", health)
    assert server is not None
    try:
        yield HttpEndpoints(port, health)
    finally:
        server.shutdown()
        server.server_close()
