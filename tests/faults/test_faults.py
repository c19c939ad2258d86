"""The fault suite (issue 37): real processes, a real broker and a real Orthanc, faults injected with signals.

Every scenario asserts the same contract: each instance the listener
acknowledged with 0x0000 reaches exactly one report (and its overlays) in the
PACS, nothing is dead-lettered, and the service is healthy afterwards. The
load scenario sends ``BREASTAI_FAULT_LOAD_STUDIES`` studies (40 in CI; 200
and more with ``make bench``'s setting) over four concurrent associations.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from models.inference.pipeline import default_families
from tests.e2e.results import SR_CLASS, download, evidence_uids, instances_of_class, serve_args
from tests.faults.broker import PrivateBroker
from tests.faults.traffic import Sent, Study, copies_of, reports_by_study, results_by_study, send, send_concurrently
from tests.integration.orthanc import OrthancServer, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]

LOAD_STUDIES = int(os.environ.get("BREASTAI_FAULT_LOAD_STUDIES", "40"))
# A bound per scenario: analysis runs at about 1 s per one-image study on a 2-core machine, plus start-up.
SECONDS_PER_STUDY = 4.0
START_S = 120.0


def _one_image(sample_study: Path) -> list[Path]:
    return sorted(sample_study.glob("*.dcm"))[:1]


def _wait_for_log(process: Any, event: str, timeout: float = 120.0) -> None:
    def logged() -> bool:
        if process.process.poll() is not None:
            raise AssertionError(f"breastai {process.command} exited:\n{process.log()[-4000:]}")
        return f'"{event}"' in process.log() or f" {event} " in process.log()

    wait_for(logged, timeout=timeout, interval=0.2, message=f"{event} in the {process.command} log")


def _wait_for_reports(pacs: OrthancServer, studies: list[Study], timeout: float) -> None:
    wanted = {study.study_uid for study in studies}
    wait_for(
        lambda: wanted <= {uid for uid, reports in reports_by_study(pacs).items() if reports >= 1},
        timeout=timeout,
        interval=2.0,
        message=f"a report for each of {len(studies)} studies",
    )


def _assert_each_acknowledged_instance_reported_once(
    pacs: OrthancServer, studies: list[Study], sent: Sent, settle_s: float = 5.0
) -> None:
    """Exactly one report per study, one overlay per image and family, the report's evidence every acked instance."""
    time.sleep(settle_s)  # a late duplicate would arrive now
    acknowledged = sent.acknowledged()
    families = len(default_families())
    found = results_by_study(pacs)
    for study in studies:
        uids = {str(ds.SOPInstanceUID) for ds in study.instances}
        assert uids <= acknowledged, f"instances not acknowledged: {sorted(uids - acknowledged)}"
        counts = found.get(study.study_uid)
        assert counts is not None, f"nothing in the PACS for study {study.study_uid}"
        assert counts["SR"] == 1, f"{counts['SR']} reports for study {study.study_uid}"
        assert counts["SC"] == len(uids) * families, f"{counts['SC']} overlays for study {study.study_uid}"
    for study in studies[:5]:  # the evidence of a few reports, read back in full
        (report,) = instances_of_class(pacs, study.study_uid, SR_CLASS)
        assert evidence_uids(download(pacs, report)) == {str(ds.SOPInstanceUID) for ds in study.instances}


def _assert_nothing_dead_lettered(spool: Path) -> None:
    dead = spool / "dead"
    letters = [path.read_text() for path in dead.glob("*/reason.txt")] if dead.exists() else []
    assert letters == [], f"dead-lettered: {letters}"


def _ready(metrics_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health/ready", timeout=5) as response:
        return dict(json.loads(response.read()))


def _pacs_and_serve(
    orthanc_factory: Callable[..., OrthancServer],
    service_factory: Callable[..., Any],
    free_ports: Callable[[int], list[int]],
    tmp_path: Path,
    env: dict[str, str] | None = None,
) -> tuple[OrthancServer, Any, int, int]:
    port, metrics_port = free_ports(2)
    pacs = orthanc_factory({"BREASTAI": ("BREASTAI", "127.0.0.1", port)})
    service = service_factory("serve", serve_args(port, metrics_port, pacs, tmp_path, quiet_period=1), env)
    service.wait_for_echo(port, timeout=START_S)
    return pacs, service, port, metrics_port


def _worker(service_factory: Callable[..., Any], pacs: OrthancServer, tmp_path: Path, env: dict[str, str]) -> Any:
    """``breastai work`` on the test's spool, sending to ``pacs``."""
    destination = f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"
    return service_factory(
        "work", ["--spool-dir", str(tmp_path / "spool"), "--destination", destination, "--metrics-port", "0"], env
    )


def _listen_and_work(
    service_factory: Callable[..., Any], pacs: OrthancServer, tmp_path: Path, port: int, env: dict[str, str]
) -> tuple[Any, Any]:
    """``breastai listen`` on ``port`` and one ``breastai work``, joined by the queue ``env`` names."""
    worker = _worker(service_factory, pacs, tmp_path, env)
    listener = service_factory(
        "listen",
        ["--spool-dir", str(tmp_path / "spool"), "--port", str(port), "--quiet-period", "1", "--metrics-port", "0"],
        env,
    )
    listener.wait_for_echo(port, timeout=START_S)
    return listener, worker


def test_a_load_over_four_associations_gives_each_study_one_report(
    orthanc_factory, service_factory, free_ports, sample_study: Path, tmp_path: Path
) -> None:
    pacs, _service, port, metrics_port = _pacs_and_serve(orthanc_factory, service_factory, free_ports, tmp_path)
    studies = copies_of(_one_image(sample_study), LOAD_STUDIES)
    sent = Sent()

    started = time.monotonic()
    send_concurrently(port, studies, associations=4, sent=sent)
    accepted_s = time.monotonic() - started
    assert sent.failures() == {}, f"statuses other than success: {sent.failures()}"
    _wait_for_reports(pacs, studies, timeout=START_S + SECONDS_PER_STUDY * len(studies))
    print(f"{len(studies)} studies: accepted in {accepted_s:.1f} s, reported after {time.monotonic() - started:.1f} s")

    _assert_each_acknowledged_instance_reported_once(pacs, studies, sent)
    _assert_nothing_dead_lettered(tmp_path / "spool")
    assert _ready(metrics_port)["status"] == "ok"


def test_rabbitmq_killed_under_load_loses_nothing_and_duplicates_nothing(
    orthanc_factory, service_factory, free_ports, sample_study: Path, private_broker: PrivateBroker, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    pacs = orthanc_factory()
    env = {"BREASTAI_QUEUE": "rabbitmq", "BREASTAI_AMQP_URL": private_broker.url, "BREASTAI_QUEUE_NAME": "faults"}
    _listener, _worker_process = _listen_and_work(service_factory, pacs, tmp_path, port, env)
    studies = copies_of(_one_image(sample_study), 16)
    sent = Sent()

    send_concurrently(port, studies[:8], associations=4, sent=sent)
    wait_for(lambda: len(reports_by_study(pacs)) >= 2, timeout=START_S, interval=1.0, message="the first reports")
    private_broker.kill()  # jobs queued, one in a worker's hands, more being sealed
    send_concurrently(port, studies[8:], associations=4, sent=sent)  # the listener keeps accepting: they are on disk
    time.sleep(5)
    private_broker.start()

    assert sent.failures() == {}, f"statuses other than success: {sent.failures()}"
    _wait_for_reports(pacs, studies, timeout=START_S + SECONDS_PER_STUDY * len(studies))
    _assert_each_acknowledged_instance_reported_once(pacs, studies, sent)
    _assert_nothing_dead_lettered(tmp_path / "spool")


def test_a_worker_killed_mid_inference_leaves_one_report(
    orthanc_factory, service_factory, free_ports, sample_study: Path, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    pacs = orthanc_factory()
    env = {"BREASTAI_QUEUE": "rabbitmq", "BREASTAI_AMQP_URL": rabbitmq_url, "BREASTAI_QUEUE_NAME": queue_name}
    _listener, first = _listen_and_work(service_factory, pacs, tmp_path, port, env)
    studies = copies_of(sorted(sample_study.glob("*.dcm")), 1)
    sent = Sent()

    send(port, list(studies[0].instances), sent)
    _wait_for_log(first, "job_started")
    assert first.kill(signal.SIGKILL) == -signal.SIGKILL
    assert reports_by_study(pacs) == {}, "the worker died before sending"
    second = _worker(service_factory, pacs, tmp_path, env)

    _wait_for_reports(pacs, studies, timeout=START_S)
    _wait_for_log(second, "job_acked")
    _assert_each_acknowledged_instance_reported_once(pacs, studies, sent)
    _assert_nothing_dead_lettered(tmp_path / "spool")


def test_two_workers_racing_a_redelivered_job_leave_one_report(
    orthanc_factory, service_factory, free_ports, sample_study: Path, rabbitmq_url: str, queue_name: str, tmp_path: Path
) -> None:
    # Worker A freezes mid-job past its heartbeat: the broker hands the job to B. When A wakes it finishes the same
    # job; its results carry the same UIDs, so the PACS still holds one report, and A's late verdict changes nothing.
    (port,) = free_ports(1)
    pacs = orthanc_factory()
    env = {"BREASTAI_QUEUE": "rabbitmq", "BREASTAI_QUEUE_NAME": queue_name}
    frozen_env = {**env, "BREASTAI_AMQP_URL": f"{rabbitmq_url}?heartbeat=2"}
    _listener, frozen = _listen_and_work(service_factory, pacs, tmp_path, port, frozen_env)
    studies = copies_of(sorted(sample_study.glob("*.dcm")), 1)
    sent = Sent()

    send(port, list(studies[0].instances), sent)
    _wait_for_log(frozen, "job_started")
    assert frozen.process is not None
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        second = _worker(service_factory, pacs, tmp_path, {**env, "BREASTAI_AMQP_URL": rabbitmq_url})
        _wait_for_reports(pacs, studies, timeout=START_S)
        _wait_for_log(second, "job_acked")
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    # A wakes: its verdict comes too late for its closed channel, and it goes on consuming.
    _wait_for_log(frozen, "settle_failed_connection_closed", timeout=START_S)
    late = frozen.log()
    # Frozen before it read the images, A finds the job finished by B; frozen after, it sends the same UIDs again.
    assert "job_completed_elsewhere" in late or "results_delivered" in late, late[-3000:]
    assert frozen.process.poll() is None
    _assert_each_acknowledged_instance_reported_once(pacs, studies, sent)
    _assert_nothing_dead_lettered(tmp_path / "spool")


def test_the_listener_killed_mid_association_and_the_pacs_re_sending_gives_one_report(
    orthanc_factory, service_factory, free_ports, sample_study: Path, tmp_path: Path
) -> None:
    pacs, first, port, metrics_port = _pacs_and_serve(orthanc_factory, service_factory, free_ports, tmp_path)
    (study,) = copies_of(sorted(sample_study.glob("*.dcm")), 1)
    assert len(study.instances) >= 2
    sent = Sent()

    assoc = send(port, list(study.instances[:1]), sent, release=False)  # the PACS is still sending
    assert first.kill(signal.SIGKILL) == -signal.SIGKILL
    assoc.abort()  # type: ignore[attr-defined]
    second = service_factory("serve", serve_args(port, metrics_port, pacs, tmp_path, quiet_period=1))
    second.wait_for_echo(port, timeout=START_S)
    send(port, list(study.instances), sent)  # the PACS re-sends the whole association

    _wait_for_reports(pacs, [study], timeout=START_S)
    _assert_each_acknowledged_instance_reported_once(pacs, [study], sent)
    _assert_nothing_dead_lettered(tmp_path / "spool")


def test_a_pacs_down_while_results_are_due_gets_them_once_when_it_returns(
    orthanc_factory, service_factory, free_ports, sample_study: Path, tmp_path: Path
) -> None:
    env = {"BREASTAI_SEND_RETRIES": "1", "BREASTAI_SEND_BACKOFF_S": "0.5"}
    pacs, service, port, metrics_port = _pacs_and_serve(orthanc_factory, service_factory, free_ports, tmp_path, env)
    studies = copies_of(sorted(sample_study.glob("*.dcm")), 2)
    pacs.go_down()
    sent = Sent()

    send_concurrently(port, studies, associations=2, sent=sent)
    assert sent.failures() == {}
    _wait_for_log(service, "job_retry", timeout=START_S)  # results were due and the PACS refused the connection
    pacs.come_back()

    _wait_for_reports(pacs, studies, timeout=START_S)
    _assert_each_acknowledged_instance_reported_once(pacs, studies, sent)
    _assert_nothing_dead_lettered(tmp_path / "spool")
    assert _ready(metrics_port)["status"] == "ok"
