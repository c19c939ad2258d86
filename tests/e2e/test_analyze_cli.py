"""``breastai analyze`` and the command line's documented surface."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

from models.inference.pipeline import default_families
from tests.e2e.results import SC_CLASS, SR_CLASS, dciodvfy_errors

ROOT = Path(__file__).resolve().parents[2]


def _breastai(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_analyze_writes_sr_and_overlays_without_network(sample_study: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(sample_study, inputs)
    (inputs / "notes.txt").write_text("not DICOM")
    result = _breastai("analyze", str(inputs), "--out", str(tmp_path / "out"))
    assert result.returncode == 1, "a skipped input must show in the exit status"
    assert "notes.txt" in result.stderr

    written = [Path(line) for line in result.stdout.splitlines()]
    assert written and all(path.is_file() for path in written)
    classes = [str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID) for path in written]
    sources = list(sample_study.glob("*.dcm"))
    # one overlay per analysed image and configured family (the bundled models' default list)
    assert classes.count(SR_CLASS) == 1 and classes.count(SC_CLASS) == len(sources) * len(default_families())
    for path in written:
        assert dciodvfy_errors(path) == []

    again = _breastai("analyze", str(sample_study), "--out", str(tmp_path / "out"))
    assert again.returncode == 0
    assert sorted(again.stdout.splitlines()) == sorted(result.stdout.splitlines()), "same input, same result UIDs"


def test_help_documents_every_scriptable_flag() -> None:
    result = _breastai("serve", "--help")
    assert result.returncode == 0
    for flag, env in (
        ("--port", "BREASTAI_PORT"),
        ("--ae-title", "BREASTAI_AE_TITLE"),
        ("--destination", "BREASTAI_DESTINATION"),
        ("--quiet-period", "BREASTAI_QUIET_PERIOD"),
        ("--allowed-ae", "BREASTAI_ALLOWED_AE"),
    ):
        assert flag in result.stdout and env in result.stdout


def test_listen_refuses_the_embedded_queue_with_a_clear_message(tmp_path: Path) -> None:
    result = _breastai("listen", "--queue", "embedded", "--spool-dir", str(tmp_path / "spool"), "--metrics-port", "0")
    assert result.returncode == 2
    assert "rabbitmq" in result.stderr
