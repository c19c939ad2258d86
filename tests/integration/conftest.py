"""Fixtures for integration tests against real servers (Orthanc, dcmtk).

``orthanc_factory`` starts private Orthanc processes on free ports:

    def test_x(orthanc_factory):
        pacs = orthanc_factory({"BREASTAI": ("BREASTAI", "127.0.0.1", port)})
        iid = pacs.upload(path)

Tests are skipped (with the reason) when the Orthanc binary is absent. Set
BREASTAI_REQUIRE_ORTHANC=1 (``.ci/run`` does) to turn that skip into a
failure, so CI can never pass by silently skipping the PACS tests.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

try:  # repository root on sys.path (pyproject: pythonpath = ["."]): one module for everyone
    from tests.integration.orthanc import OrthancServer, find_orthanc_binary
except ImportError:  # run without the root on sys.path: import the harness next to this file
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from orthanc import OrthancServer, find_orthanc_binary  # type: ignore[no-redef]

from tests.integration.listener_harness import send_raw_files, start_service  # noqa: F401  (fixtures for every test)

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _require(what: str, reason: str) -> None:
    if os.environ.get("BREASTAI_REQUIRE_ORTHANC", "") not in ("", "0"):
        pytest.fail(f"{reason} (BREASTAI_REQUIRE_ORTHANC is set, so {what} is mandatory)")
    pytest.skip(reason)


def dcmtk_tool(name: str) -> str | None:
    """Path of a dcmtk command-line tool (echoscu, storescu, ...).

    The venv's bin/ holds pynetdicom's Python apps of the same names
    (storescu, echoscu, ...), which take different flags; look only in the
    system directories so we always get dcmtk's binaries.
    """
    return shutil.which(name, path=SYSTEM_PATH)


@pytest.fixture
def orthanc_binary() -> str:
    binary = find_orthanc_binary()
    if binary is None:
        _require(
            "Orthanc",
            "Orthanc binary not found (ORTHANC_BIN, PATH, /usr/sbin/Orthanc): "
            "apt-get install orthanc, or run `make deps-system`",
        )
    assert binary is not None
    return binary


@pytest.fixture
def orthanc_factory(orthanc_binary: str) -> Iterator[Callable[..., OrthancServer]]:
    """Callable ``(modalities=None, **kwargs) -> OrthancServer`` (already started).

    ``modalities`` is ``{name: (AET, host, port)}``; kwargs go to
    ``OrthancServer`` (``aet``, ``extra_config``, ``startup_timeout``). Every
    server started through it is stopped and its files removed at teardown.
    """
    started: list[OrthancServer] = []

    def make(modalities: Mapping[str, Any] | None = None, **kwargs: Any) -> OrthancServer:
        server = OrthancServer(modalities, binary=orthanc_binary, **kwargs)
        started.append(server)
        return server.start()

    yield make

    for server in started:  # overlap the ~3 s graceful shutdowns
        server.terminate()
    for server in reversed(started):
        server.stop()


@pytest.fixture
def echoscu_bin() -> str:
    path = dcmtk_tool("echoscu")
    if path is None:
        _require("dcmtk", "dcmtk's echoscu not found: apt-get install dcmtk")
    assert path is not None
    return path


@pytest.fixture
def storescu_bin() -> str:
    path = dcmtk_tool("storescu")
    if path is None:
        _require("dcmtk", "dcmtk's storescu not found: apt-get install dcmtk")
    assert path is not None
    return path
