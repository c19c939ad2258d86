"""Fixtures of the fault suite: the e2e process fixtures, a real Orthanc, and a private broker to kill."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import free_ports, sample_study, service_factory  # noqa: F401  (fixtures)
from tests.faults.broker import PrivateBroker, rabbitmq_server_binary
from tests.integration.conftest import orthanc_binary, orthanc_factory, storescu_bin  # noqa: F401  (fixtures)


@pytest.fixture
def private_broker() -> Iterator[PrivateBroker]:
    """A RabbitMQ node of this test's own, started; stopped and removed at teardown."""
    binary = rabbitmq_server_binary()
    if binary is None:
        pytest.skip("rabbitmq-server is not installed (make deps-system)")
    if os.geteuid() != 0:
        pytest.skip("Debian's rabbitmq-server wrapper starts a node only as root (it switches to the rabbitmq user)")
    broker = PrivateBroker(binary).start()
    yield broker
    broker.stop()
