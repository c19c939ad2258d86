"""The worker's DICOM reader under mutated input: frames, or a typed permanent error; nothing else, and quickly.

Each example cuts, overwrites, inserts or deletes bytes of a valid
(uncompressed) ultrasound instance and reads it as the worker does. Any
other exception would crash a job instead of dead-lettering it with a
reason; a slow example is a decoder looping on garbage. The search is
derandomized so that CI runs the same bounded set every time; raise
``max_examples`` (``BREASTAI_FUZZ_EXAMPLES``) for a longer hunt.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import PermanentError
from tests.conftest import make_us_dataset
from tests.dicom_factory import encode
from workers.dicom_reader import read_frames

EXAMPLES = int(os.environ.get("BREASTAI_FUZZ_EXAMPLES", "120"))


VALID = encode(make_us_dataset(study_uid="1.2.826.0.1.3680043.10.9", sop_uid="1.2.826.0.1.3680043.10.9.1"))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cut", "overwrite", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "cut":
            del data[at:]
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


@settings(
    max_examples=EXAMPLES,
    deadline=2000,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=mutated())
def test_a_mutated_instance_reads_or_is_refused_with_a_reason(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "fuzzed.dcm"
    path.write_bytes(data)
    try:
        frames = read_frames(path)
    except PermanentError as exc:
        assert str(exc), "a refusal names its reason"
        return
    assert frames and all(frame.pixels.ndim == 2 for frame in frames)


def test_the_unmutated_instance_reads(tmp_path: Path) -> None:
    path = tmp_path / "valid.dcm"
    path.write_bytes(VALID)
    assert len(read_frames(path)) == 1


@pytest.mark.parametrize("cut", [132, 200, 400, len(VALID) // 2, len(VALID) - 1])
def test_every_cut_of_the_instance_is_refused(cut: int, tmp_path: Path) -> None:
    path = tmp_path / "cut.dcm"
    path.write_bytes(VALID[:cut])
    with pytest.raises(PermanentError):
        read_frames(path)
