"""Liveness and readiness of a BreastAI process, served beside ``/metrics``.

``/health/live`` answers 503 when the process should be restarted (a thread
it cannot work without has died); ``/health/ready`` answers 503 when it
should get no work now (models not loaded, the spool disk below its reserve,
the broker unreachable). Both answer JSON naming every check, so an
operator reads the cause from the probe itself. Kubernetes probes and a
load balancer's health check use them; Prometheus scrapes ``/metrics`` on
the same port.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

#: A check: ``None`` when healthy, else what is wrong (no patient data: it is served to anyone who asks).
Probe = Callable[[], str | None]
Kind = Literal["live", "ready"]


@dataclass
class Health:
    """The named checks of one process, by kind."""

    _checks: dict[Kind, dict[str, Probe]] = field(default_factory=lambda: {"live": {}, "ready": {}})
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: Kind, name: str, probe: Probe) -> None:
        """Register ``probe`` under ``name`` (a later one of the same name replaces it)."""
        with self._lock:
            self._checks[kind][name] = probe

    def report(self, kind: Kind) -> tuple[bool, dict[str, str]]:
        """Whether every check of ``kind`` passes, and each check's result ("ok" or the problem)."""
        with self._lock:
            checks = dict(self._checks[kind])
        results: dict[str, str] = {}
        for name, probe in sorted(checks.items()):
            try:
                problem = probe()
            except Exception as exc:  # a probe that breaks is a failing check, not a broken endpoint
                problem = f"check failed: {type(exc).__name__}"
            results[name] = "ok" if problem is None else problem
        return all(value == "ok" for value in results.values()), results


def _handler(health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/metrics", "/"):
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
            elif path in ("/health/live", "/health/ready"):
                ok, checks = health.report("live" if path.endswith("live") else "ready")
                body = json.dumps({"status": "ok" if ok else "fail", "checks": checks}).encode()
                self._send(200 if ok else 503, "application/json", body)
            else:
                self._send(404, "text/plain", b"not found: /metrics, /health/live, /health/ready\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # probes every few seconds would flood the log

    return Handler


def start_http_endpoints(port: int, address: str, health: Health) -> ThreadingHTTPServer | None:
    """Serve ``/metrics``, ``/health/live`` and ``/health/ready`` on ``address:port`` in a daemon thread.

    Returns the server (``shutdown()`` then ``server_close()`` to stop it),
    or ``None`` when ``port`` is 0 (endpoints off).
    """
    if port == 0:
        return None
    server = ThreadingHTTPServer((address, port), _handler(health))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="breastai-http", daemon=True).start()
    return server
