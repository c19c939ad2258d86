"""Settings: layering defaults < TOML < environment < flags, and refusals."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from service.errors import ConfigurationError
from service.settings import Destination, Settings, add_settings_arguments, settings_from_args
from tests.conftest import HttpEndpoints


def parse(argv: list[str], environ: dict[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return settings_from_args(parser.parse_args(argv), environ or {})


def test_defaults() -> None:
    settings = parse([])
    assert settings == Settings()
    assert settings.ae_title == "BREASTAI"
    assert settings.port == 11112
    assert settings.destinations == (Destination(kind="folder", path=Path("var/results")),)
    assert settings.queue == "embedded"
    assert settings.allowed_ae == ()
    assert settings.model_dir is None


def test_layering_defaults_toml_env_flags(tmp_path: Path) -> None:
    config = tmp_path / "breastai.toml"
    config.write_text(
        '[breastai]\nport = 2000\nae_title = "FROMTOML"\nquiet_period_s = 1.5\n'
        'destinations = ["PACS@pacs.local:104", "out/dir"]\nqueue = "rabbitmq"\n'
    )
    environ = {"BREASTAI_PORT": "3000", "BREASTAI_ALLOWED_AE": "MODALITY1, MODALITY2"}
    settings = parse(["--config", str(config), "--ae-title", "FROMFLAG"], environ)
    assert settings.port == 3000  # env beats TOML
    assert settings.ae_title == "FROMFLAG"  # flag beats TOML
    assert settings.quiet_period_s == 1.5  # TOML beats default
    assert settings.queue == "rabbitmq"
    assert settings.allowed_ae == ("MODALITY1", "MODALITY2")
    assert settings.destinations == (
        Destination(kind="dicom", ae_title="PACS", host="pacs.local", port=104),
        Destination(kind="folder", path=Path("out/dir")),
    )
    # flags beat the environment
    assert parse(["--port", "4000"], environ).port == 4000


def test_repeatable_flags_and_env_lists() -> None:
    environ = {"BREASTAI_DESTINATION": "A@h:1,B@h:2"}
    assert [str(d) for d in parse([], environ).destinations] == ["A@h:1", "B@h:2"]
    settings = parse(
        [
            "--destination",
            "ORTHANC@127.0.0.1:4242",
            "--destination",
            "/tmp/out",
            "--allowed-ae",
            "US1",
            "--allowed-ae",
            "US2",
        ],
        environ,
    )
    assert [str(d) for d in settings.destinations] == ["ORTHANC@127.0.0.1:4242", "/tmp/out"]
    assert settings.allowed_ae == ("US1", "US2")


def test_config_path_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[breastai]\nmetrics_port = 0\n")
    assert parse([], {"BREASTAI_CONFIG": str(config)}).metrics_port == 0


def test_scalar_conversions() -> None:
    settings = parse(
        [
            "--quiet-period",
            "0.3",
            "--spool-dir",
            "/x/spool",
            "--model-dir",
            "/m",
            "--log-format",
            "console",
            "--log-level",
            "debug",
            "--metrics-port",
            "0",
        ],
        {"BREASTAI_STABLE_AGE_S": "90", "BREASTAI_JOB_RETRY_LIMIT": "3"},
    )
    assert settings.quiet_period_s == 0.3
    assert settings.stable_age_s == 90.0
    assert settings.spool_dir == Path("/x/spool")
    assert settings.model_dir == Path("/m")
    assert settings.log_format == "console"
    assert settings.log_level == "DEBUG"
    assert settings.metrics_port == 0
    assert settings.job_retry_limit == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PACS@host:104", Destination(kind="dicom", ae_title="PACS", host="host", port=104)),
        ("PACS@[::1]:11112", Destination(kind="dicom", ae_title="PACS", host="::1", port=11112)),
        ("results", Destination(kind="folder", path=Path("results"))),
    ],
)
def test_destination_parse(text: str, expected: Destination) -> None:
    assert Destination.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["PACS@host", "@host:104", "PACS@host:notaport", "PACS@host:70000", "A" * 17 + "@h:1", "   "]
)
def test_destination_parse_refuses_and_names_value(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Destination.parse(text)
    assert text.strip()[:10] in str(info.value) or "empty" in str(info.value)


@pytest.mark.parametrize(
    ("argv", "environ", "needle"),
    [
        (["--port", "0"], {}, "port"),
        (["--port", "70000"], {}, "70000"),
        (["--ae-title", "A_VERY_LONG_AE_TITLE"], {}, "A_VERY_LONG_AE_TITLE"),
        ([], {"BREASTAI_PORT": "eleven"}, "eleven"),
        ([], {"BREASTAI_DESTINATION": ""}, "destination"),
        ([], {"BREASTAI_QUEUE": "kafka"}, "kafka"),
        ([], {"BREASTAI_ALLOWED_AE": "BAD\\AE"}, "BAD"),
        ([], {"BREASTAI_QUIET_PERIOD_S": "-1"}, "quiet_period_s"),
        ([], {"BREASTAI_STABLE_AGE_S": "1", "BREASTAI_QUIET_PERIOD_S": "5"}, "stable_age_s"),
        ([], {"BREASTAI_AMQP_URL": "http://user:secret@x/"}, "amqp_url"),
        ([], {"BREASTAI_JOB_RETRY_LIMIT": "0"}, "job_retry_limit"),
    ],
)
def test_invalid_values_are_refused_by_name(argv: list[str], environ: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse(argv, environ)
    assert needle in str(info.value)


def test_broker_password_is_not_echoed() -> None:
    with pytest.raises(ConfigurationError) as info:
        parse([], {"BREASTAI_AMQP_URL": "http://user:secret@x/"})
    assert "secret" not in str(info.value)


def test_toml_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigurationError, match="cannot read"):
        parse(["--config", str(missing)])
    bad = tmp_path / "bad.toml"
    bad.write_text("[breastai\n")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        parse(["--config", str(bad)])
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[breastai]\nprot = 1\n")
    with pytest.raises(ConfigurationError, match="prot"):
        parse(["--config", str(unknown)])
    notable = tmp_path / "notable.toml"
    notable.write_text("port = 1\n")
    with pytest.raises(ConfigurationError, match=r"\[breastai\]"):
        parse(["--config", str(notable)])


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


def test_help_names_env_vars_and_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    text = parser.format_help()
    for needle in (
        "BREASTAI_PORT",
        "BREASTAI_DESTINATION",
        "BREASTAI_ALLOWED_AE",
        "BREASTAI_QUIET_PERIOD_S",
        "BREASTAI_SPOOL_DIR",
        "BREASTAI_QUEUE",
        "BREASTAI_AMQP_URL",
        "BREASTAI_METRICS_PORT",
        "BREASTAI_CONFIG",
        "BREASTAI_LOG_FORMAT",
        "BREASTAI_MODEL_DIR",
        "default 11112",
    ):
        assert needle in text, needle


def test_configure_logging_follows_settings_and_redacts_identity(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import structlog

    from service.logging import bind_job, configure_logging

    configure_logging(Settings(log_format="json", log_level="INFO"))
    try:
        log = structlog.get_logger("test")
        with bind_job(job_id="job-1", study_uid="1.2.3"):
            log.info("stored", PatientName="Doe^Jane", patient_id="123", extra={"AccessionNumber": "A1"}, count=2)
        log.debug("hidden at INFO")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    finally:
        import logging

        structlog.reset_defaults()
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_breastai", False)]:
            root.removeHandler(handler)
        for name in ("pynetdicom", "pika", "pydicom"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    assert len(lines) == 1
    [line] = lines
    assert line["job_id"] == "job-1" and line["study_uid"] == "1.2.3" and line["count"] == 2
    assert line["PatientName"] == line["patient_id"] == line["extra"]["AccessionNumber"] == "[redacted]"
    assert "Doe" not in json.dumps(line)


def test_metrics_server_is_settings_driven(http_endpoints: HttpEndpoints) -> None:
    from service import metrics
    from service.health import Health, start_http_endpoints

    assert start_http_endpoints(Settings(metrics_port=0).metrics_port, "127.0.0.1", Health()) is None
    metrics.INSTANCES_REJECTED.labels(reason="truncated").inc()
    text = http_endpoints.get("/metrics")[1].decode()
    assert 'breastai_instances_rejected_total{reason="truncated"}' in text
    for name in (
        "breastai_studies_received_total",
        "breastai_jobs_done_total",
        "breastai_inference_seconds",
        "breastai_end_to_end_seconds",
        "breastai_queue_publish_seconds",
    ):
        assert name in text
