"""deploy/ against the code it deploys: metric names, settings, probe paths and commands that exist.

Every YAML and JSON file parses; the alerting rules and the dashboard query only metrics that service/metrics.py
registers; every BREASTAI_* variable is a setting; every probe path is one service/health.py answers; every
`breastai ...` command line parses with the real parser and, for listen and work, configures RabbitMQ. Where the
tools are installed, promtool checks (and unit-tests) the rules and scrape configs, systemd-analyze verifies the
units, kubectl builds the kustomization and docker compose renders the compose file; elsewhere those tests skip.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from service import metrics  # noqa: F401 - registers the service's metrics on the default registry
from service.settings import CONFIG_ENV, Settings, env_name, settings_from_args
from tests.conftest import HttpEndpoints
from workers.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
SPOOL = "/var/lib/breastai/spool"

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))
JSON_FILES = sorted(DEPLOY.rglob("*.json"))
TEXT_FILES = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
UNITS = sorted(SYSTEMD.glob("*.service"))

# Suffixes prometheus_client adds to a family's name in the exposition, by type.
_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _yaml(path: Path) -> Any:
    """The one YAML document in ``path``."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@functools.cache
def _k8s_objects() -> tuple[dict[str, Any], ...]:
    """The Kubernetes objects (not the kustomization that lists them), parsed once: read them, never change them."""
    paths = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    return tuple(doc for path in paths for doc in _yaml_documents(path))


def _k8s(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in _k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/kubernetes, found {len(found)}"
    return found[0]


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = _yaml(DEPLOY / "compose.yaml")
    return document


def _exposed_metric_names() -> set[str]:
    """Every sample name the default registry can expose (families exist even before a labelled child does)."""
    names = {"up"}  # Prometheus's own per-target series
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",)))
    return names


def _alert_rules() -> list[dict[str, Any]]:
    document = _yaml(DEPLOY / "alerts.yml")
    return [rule for group in document["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "breastai-dashboard.json").read_text(encoding="utf-8"))

    def walk(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            yield from (target["expr"] for target in panel.get("targets", []))
            yield from walk(panel.get("panels", []))

    return list(walk(dashboard["panels"]))


_METRIC = re.compile(r"\b(breastai_[a-z0-9_]+|up)\b(?!\s*\()")


def _metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(_METRIC.findall(without_strings))


# ------------------------------------------------------------------ every file parses


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_every_yaml_file_parses(path: Path) -> None:
    assert _yaml_documents(path), f"{_rel(path)} holds no YAML document"


@pytest.mark.parametrize("path", JSON_FILES, ids=_rel)
def test_every_json_file_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict)


def test_the_readme_names_every_file_in_deploy() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    missing = [_rel(p) for p in TEXT_FILES if p.name != "README.md" and p.name not in readme]
    assert not missing, f"deploy/README.md does not mention: {missing}"


# ------------------------------------------------------------------ metric names


def test_alerts_and_dashboard_use_only_metrics_the_service_exposes() -> None:
    exposed = _exposed_metric_names()
    exprs = {f"alert {rule['alert']}": rule["expr"] for rule in _alert_rules()}
    exprs.update({f"dashboard query {i}": expr for i, expr in enumerate(_dashboard_exprs())})
    tests = _yaml(DEPLOY / "alerts_test.yml")
    exprs.update({f"alerts_test series {s['series']}": s["series"] for t in tests["tests"] for s in t["input_series"]})
    problems = []
    for where, expr in exprs.items():
        used = _metric_names(str(expr))
        if not used:
            problems.append(f"{where}: no breastai_* metric or up in {expr!r}")
        problems.extend(f"{where}: {name} is not exposed by service/metrics.py" for name in sorted(used - exposed))
    assert not problems, "\n".join(problems)


def test_the_alerts_cover_the_failures_an_operator_must_hear_of() -> None:
    used = set().union(*(_metric_names(rule["expr"]) for rule in _alert_rules()))
    wanted = {
        "up",
        "breastai_jobs_waiting_publish",
        "breastai_jobs_failed_total",
        "breastai_dead_lettered_jobs",
        "breastai_result_send_failures_total",
        "breastai_end_to_end_seconds_bucket",
        "breastai_spool_free_bytes",
        "breastai_oldest_receiving_study_seconds",
    }
    assert wanted <= used, f"no alert on {sorted(wanted - used)}"
    for rule in _alert_rules():
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_the_dashboard_shows_every_metric_of_the_service() -> None:
    used = set().union(*(_metric_names(expr) for expr in _dashboard_exprs()))
    families = {name for name in _exposed_metric_names() if name.startswith("breastai_")}
    shown = {name for name in families if name in used}
    # One sample name per family is enough (a histogram through _bucket, a counter through _total).
    missing = sorted(
        family.name
        for family in REGISTRY.collect()
        if family.name.startswith("breastai_")
        and not any(family.name + suffix in shown for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",)))
    )
    assert not missing, f"the dashboard has no panel on {missing}"


def test_both_prometheus_configs_load_the_alerts() -> None:
    for name in ("prometheus.yml", "prometheus-compose.yml"):
        config = _yaml(DEPLOY / name)
        assert [(DEPLOY / f).resolve() for f in config["rule_files"]] == [(DEPLOY / "alerts.yml").resolve()], name


# ------------------------------------------------------------------ settings and probe paths


def _setting_variables() -> set[str]:
    return {env_name(f.name) for f in dataclasses.fields(Settings)} | {CONFIG_ENV}


def test_every_breastai_variable_in_deploy_is_a_setting() -> None:
    known = _setting_variables()
    problems = [
        f"{_rel(path)}: {name}"
        for path in TEXT_FILES
        for name in sorted(set(re.findall(r"\bBREASTAI_[A-Z0-9_]+\b", path.read_text(encoding="utf-8"))))
        if name not in known
    ]
    assert not problems, f"not a setting (service/settings.py): {problems}"


def _probe_paths() -> set[str]:
    paths = set()
    for path in TEXT_FILES:
        paths.update(re.findall(r"/health/[A-Za-z_-]+", path.read_text(encoding="utf-8")))
    for obj in _k8s_objects():
        for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if "httpGet" in container.get(probe, {}):
                    paths.add(container[probe]["httpGet"]["path"])
    for name in ("prometheus.yml", "prometheus-compose.yml"):
        config = _yaml(DEPLOY / name)
        paths.update(job.get("metrics_path", "/metrics") for job in config["scrape_configs"])
    return paths


def test_every_probe_path_is_served(http_endpoints: HttpEndpoints) -> None:
    paths = _probe_paths()
    assert {"/health/live", "/health/ready", "/metrics"} <= paths
    statuses = {path: http_endpoints.get(path)[0] for path in [*sorted(paths), "/health/nothing"]}
    assert statuses.pop("/health/nothing") == 404, "the check must tell a served path from another"
    assert statuses == dict.fromkeys(paths, 200), "deploy/ probes a path service/health.py does not serve"


# ------------------------------------------------------------------ breastai command lines


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def _command_lines() -> list[tuple[str, list[str], dict[str, str]]]:
    """(where, argv, environment) of every place deploy/ starts breastai."""
    found: list[tuple[str, list[str], dict[str, str]]] = []
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", dockerfile, re.MULTILINE)
    assert cmd is not None, "deploy/Dockerfile has no exec-form CMD"
    found.append(("Dockerfile CMD", json.loads(cmd.group(1)), {}))
    for name, service in _compose()["services"].items():
        if "command" in service and "breastai" in str(service.get("image", "")):
            found.append((f"compose.yaml {name}", list(service["command"]), dict(service.get("environment", {}))))
    settings_map = _k8s("ConfigMap", "breastai-settings")["data"]
    for obj in _k8s_objects():
        for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            env = dict(settings_map) if container.get("envFrom") else {}
            argv = [*container.get("command", []), *container.get("args", [])]
            found.append((f"kubernetes {obj['metadata']['name']}", argv, env))
    unit_env = _env_file(SYSTEMD / "breastai.env")
    for unit in UNITS:
        for line in unit.read_text(encoding="utf-8").splitlines():
            if line.startswith("ExecStart="):
                argv = shlex.split(line.removeprefix("ExecStart=").replace("%i", "9465"))
                found.append((f"systemd {unit.name}", argv, unit_env))
    # Commands in the README's code (fenced blocks and `spans`), up to a comment or the span's end.
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    code = re.findall(r"^```[^\n]*\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    code += re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", readme, flags=re.MULTILINE | re.DOTALL))
    for block in code:
        # A command starts a line (or a span) or is a path ending in bin/breastai.
        for match in re.finditer(r"(?:^[ \t]*|bin/)breastai[ \t]+([a-z]+\b[^#\n`|;&]*)", block, re.MULTILINE):
            found.append(("deploy/README.md", ["breastai", *shlex.split(match.group(1))], {}))
    return found


def test_every_breastai_command_in_deploy_parses() -> None:
    commands = _command_lines()
    where_all = {where for where, _, _ in commands}
    for needed in ("Dockerfile CMD", "compose.yaml listener", "compose.yaml worker", "systemd breastai.service"):
        assert needed in where_all, f"no breastai command found in {needed}"
    assert any(where == "deploy/README.md" for where, _, _ in commands), "the README shows no breastai command"
    parser = build_parser()
    problems = []
    for where, argv, env in commands:
        if Path(argv[0]).name != "breastai":
            problems.append(f"{where}: runs {argv[0]!r}, not breastai")
            continue
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            problems.append(f"{where}: {shlex.join(argv)} does not parse (breastai {argv[1:2]} --help)")
            continue
        if args.command in ("serve", "listen", "work") and env:
            settings = settings_from_args(args, env)  # raises on any invalid value
            if args.command != "serve" and settings.queue != "rabbitmq":
                problems.append(f"{where}: 'breastai {args.command}' needs --queue rabbitmq")
            if settings.queue == "rabbitmq" and args.command == "serve" and where.startswith("systemd"):
                problems.append(f"{where}: serve is the embedded-queue unit")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ structure of each deployment


def test_the_image_is_cpu_only_non_root_and_probes_liveness() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert text.startswith("# syntax=docker/dockerfile:1")
    instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "python:3.11-slim-bookworm" in text
    assert re.search(r"pip install \.\s", instructions), "the image installs the serving dependencies: pip install ."
    assert not re.search(r"pip install[^\n]*(\[|torch|tensorrt)", instructions), "no extras, torch or TensorRT"
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image must run as a non-root user"
    assert re.search(r"^EXPOSE\s+11112\s+9464\s*$", text, re.MULTILINE)
    assert re.search(rf'^VOLUME\s+\["{SPOOL}"\]', text, re.MULTILINE)
    assert f"BREASTAI_SPOOL_DIR={SPOOL}" in text
    healthcheck = re.search(r"^HEALTHCHECK .*?(?<!\\)\n", text, re.MULTILINE | re.DOTALL)
    assert healthcheck is not None and "/health/live" in healthcheck.group(0) and "curl" not in healthcheck.group(0)
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "var", "runs", "research", "tests"} <= ignored
    assert not {"models", "service", "workers", "pyproject.toml", "README.md"} & ignored, "pip install . needs them"


def test_compose_shares_one_spool_between_one_listener_and_the_workers() -> None:
    services = _compose()["services"]
    assert {"rabbitmq", "orthanc", "listener", "worker", "prometheus", "grafana"} <= set(services)
    for name in ("listener", "worker"):
        service = services[name]
        assert f"spool:{SPOOL}" in service["volumes"], f"{name} does not mount the spool volume at {SPOOL}"
        assert service["environment"]["BREASTAI_SPOOL_DIR"] == SPOOL
        assert "/health/ready" in " ".join(service["healthcheck"]["test"])
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert services["listener"].get("deploy", {}).get("replicas", 1) == 1, "only one listener may write a spool"
    # Every bind-mounted file exists.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"compose service {name} mounts missing {source}"
    # Orthanc knows BREASTAI where the listener is, and the worker sends results to Orthanc.
    orthanc = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text(encoding="utf-8"))
    listener_env = services["listener"]["environment"]
    modality = orthanc["DicomModalities"]["BREASTAI"]
    assert (modality["AET"], modality["Host"]) == (listener_env["BREASTAI_AE_TITLE"], "listener")
    assert f"{modality['Port']}:{modality['Port']}" in services["listener"]["ports"]
    destination = services["worker"]["environment"]["BREASTAI_DESTINATION"]
    assert destination == f"{orthanc['DicomAet']}@orthanc:{orthanc['DicomPort']}"
    # Grafana loads the dashboard from where compose mounts it.
    provider = _yaml(DEPLOY / "grafana/provisioning/dashboards/breastai.yaml")
    dashboard_dir = provider["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("."))
    assert mounts["./grafana/breastai-dashboard.json"].rsplit("/", 1)[0] == dashboard_dir


def test_kubernetes_runs_one_listener_and_probed_workers_on_a_shared_spool() -> None:
    listener = _k8s("Deployment", "breastai-listener")
    worker = _k8s("Deployment", "breastai-worker")
    assert listener["spec"]["replicas"] == 1, "only one listener may write a spool (service/spool.py)"
    assert listener["spec"]["strategy"]["type"] == "Recreate", "a rolling update would run two listeners at once"
    claim = _k8s("PersistentVolumeClaim", "breastai-spool")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    settings_map = _k8s("ConfigMap", "breastai-settings")
    spool_dir = settings_map["data"]["BREASTAI_SPOOL_DIR"]
    for deployment in (listener, worker):
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        assert container["envFrom"] == [{"configMapRef": {"name": "breastai-settings"}}]
        ports = {p["name"] for p in container["ports"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts[spool_dir]]["persistentVolumeClaim"]["claimName"] == "breastai-spool"
        for probe in ("livenessProbe", "readinessProbe"):
            action = container[probe].get("httpGet") or container[probe]["tcpSocket"]
            assert action["port"] in ports, f"{deployment['metadata']['name']} {probe} names an unknown port"
    (worker_container,) = worker["spec"]["template"]["spec"]["containers"]
    assert worker_container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert worker_container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    service = _k8s("Service", "breastai-listener")
    assert service["spec"]["selector"].items() <= listener["spec"]["template"]["metadata"]["labels"].items()
    assert {(p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {(11112, "dicom"), (9464, "metrics")}
    scaled = _k8s("ScaledObject", "breastai-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "breastai-worker"
    (trigger,) = scaled["spec"]["triggers"]
    queue_name = settings_map["data"].get("BREASTAI_QUEUE_NAME", Settings().queue_name)
    assert trigger["type"] == "rabbitmq" and trigger["metadata"]["queueName"] == queue_name
    kustomization = _yaml(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.stem != "kustomization")
    assert all("namespace" not in o["metadata"] for o in _k8s_objects()), "the manifests are namespace-agnostic"


def _unit_settings(unit: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_units_are_hardened_and_restart() -> None:
    assert {u.name for u in UNITS} == {"breastai.service", "breastai-listen.service", "breastai-work@.service"}
    spool_dir = _env_file(SYSTEMD / "breastai.env")["BREASTAI_SPOOL_DIR"]
    for unit in UNITS:
        s = _unit_settings(unit)
        expected = {
            "User": ["breastai"],
            "EnvironmentFile": ["/etc/breastai/breastai.env"],
            "Restart": ["on-failure"],
            "ProtectSystem": ["strict"],
            "NoNewPrivileges": ["yes"],
            "PrivateTmp": ["yes"],
        }
        assert {key: s.get(key) for key in expected} == expected, unit.name
        writable = " ".join(s.get("ReadWritePaths", []) + [f"/var/lib/{d}" for d in s.get("StateDirectory", [])])
        assert any(spool_dir.startswith(p.rstrip("/") + "/") for p in writable.split()), f"{unit.name}: spool read-only"


# ------------------------------------------------------------------ the tools, where installed


def _run(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; make deps-system installs it)")
    return promtool


@pytest.mark.parametrize(
    "args",
    [
        ["check", "rules", "deploy/alerts.yml"],
        ["check", "config", "deploy/prometheus.yml"],
        ["check", "config", "deploy/prometheus-compose.yml"],
        ["test", "rules", "deploy/alerts_test.yml"],
    ],
    ids=lambda a: " ".join(a),
)
def test_promtool_accepts(args: list[str]) -> None:
    result = _run([_promtool(), *args])
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    breastai = Path(sys.executable).parent / "breastai"  # the console script of this checkout's install
    if not breastai.exists():
        pytest.skip(f"no breastai console script beside {sys.executable}")
    names = []
    for unit in UNITS:
        text = unit.read_text(encoding="utf-8").replace("/opt/breastai/venv/bin/breastai", str(breastai))
        text = text.replace("EnvironmentFile=/", "EnvironmentFile=-/")  # the file is not installed here
        name = unit.name.replace("@.", "@9465.")
        (tmp_path / name).write_text(text, encoding="utf-8")
        names.append(name)
    result = _run([analyze, "verify", "--man=no", *(f"./{n}" for n in names)], cwd=tmp_path)
    # verify exits 0 on unknown keys and bad values, which it reports as "...ignoring": those fail here.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if any(n in line for n in names)]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_kubectl_builds_the_kustomization() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    result = _run([kubectl, "kustomize", str(K8S)])
    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc)
    assert kinds == sorted(o["kind"] for o in _k8s_objects())


def test_docker_compose_renders_the_compose_file() -> None:
    docker = shutil.which("docker")
    if docker is None or _run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("docker with the compose plugin not installed (docker compose config needs no engine)")
    result = _run([docker, "compose", "-f", "deploy/compose.yaml", "config", "-q"])
    assert result.returncode == 0, result.stderr
