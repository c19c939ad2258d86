"""Library warnings that quote header values must not carry patient identity to stderr."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: pytest's own warning capture would hide what a real process prints.
SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from service.logging import configure_logging
    from service.settings import Settings
    from tests.dicom_factory import make_us_dataset
    from tests.dicom_factory import square_lesion_analysis
    from workers.dicom_reader import SourceFrame
    from workers.sc_writer import build_overlay_image
    from workers.sr_writer import ReportContext
    from workers.uids import derive_uid

    configure_logging(Settings(metrics_port=0))
    ds = make_us_dataset(np.full((64, 64), 100, np.uint8))
    ds.PatientName = "SMITH JANE"
    ds.PatientBirthDate = "1970-01-02"
    header = ds.copy()
    del header.PixelData
    frame = SourceFrame(header, None, np.full((64, 64), 100, np.uint8), (0, 0, 64, 64), 0.1, 0.1)
    build_overlay_image(frame, square_lesion_analysis((64, 64)), derive_uid("s"), derive_uid("i"), 1, ReportContext())
    print("built")
    """
)


def test_patient_name_and_birth_date_do_not_reach_stderr() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "built" in result.stdout
    for identity in ("SMITH", "JANE", "1970-01-02", "19700102"):
        assert identity not in result.stderr
