"""/health/live and /health/ready beside /metrics: 200 or 503 with every check named, over a real HTTP socket."""

from __future__ import annotations

import json

from service import metrics  # noqa: F401 - registers the service's metrics, as every process does
from service.health import Health
from tests.conftest import HttpEndpoints


def test_readiness_fails_while_a_check_fails_and_names_it(http_endpoints: HttpEndpoints) -> None:
    health, get = http_endpoints.health, http_endpoints.get
    problem: list[str | None] = ["loading"]
    health.add("ready", "models", lambda: problem[0])
    health.add("ready", "spool", lambda: None)
    health.add("live", "dispatcher", lambda: None)
    status, body = get("/health/ready")
    assert status == 503
    assert json.loads(body) == {"status": "fail", "checks": {"models": "loading", "spool": "ok"}}
    assert get("/health/live")[0] == 200, "loading models is no reason to restart"
    problem[0] = None
    status, body = get("/health/ready")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = get("/metrics")
    assert status == 200 and b"breastai_spool_free_bytes" in body and b"breastai_model_info" in body
    assert get("/nothing")[0] == 404


def test_a_probe_that_raises_is_a_failing_check_not_a_broken_endpoint() -> None:
    health = Health()

    def broken() -> str | None:
        raise OSError("statvfs failed")

    health.add("live", "spool", broken)
    ok, checks = health.report("live")
    assert not ok and checks == {"spool": "check failed: OSError"}
