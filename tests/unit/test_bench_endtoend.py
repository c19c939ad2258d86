"""The pure parts of the bench's end-to-end part (bench/endtoend.py): the mix, percentiles, grouping, the rate.

The timed part needs a real Orthanc and ``breastai serve``: ``python -m bench --only endtoend`` runs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pydicom
import pytest

from bench import endtoend
from bench.endtoend import KINDS, make_studies, percentile, studies_per_hour, study_mix, summarize


def timing(kind: str, started: float, returned: float, result: float | None, images: int = 1) -> dict[str, Any]:
    return {
        "kind": kind,
        "images": images,
        "store_started_s": started,
        "store_returned_s": returned,
        "store_s": returned - started,
        "result_s": result,
        "latency_s": None if result is None else result - returned,
    }


def test_the_default_mix_is_the_issue_s_set_and_longer_mixes_repeat_it() -> None:
    six = study_mix(6)
    assert sorted(six) == sorted(["us1", "us1", "us4", "us4", "us10", "mg2"])
    assert sum(KINDS[k].images for k in six) == 22
    assert study_mix(8) == six + six[:2]
    assert study_mix(0) == []


@pytest.mark.parametrize("q", [0, 25, 50, 90, 95, 99, 100])
def test_percentile_interpolates_as_numpy_does(q: float) -> None:
    values = [3.2, 0.5, 9.1, 4.4, 4.4, 7.0, 1.3]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_one_value_of_none_and_out_of_range() -> None:
    assert percentile([2.5], 95) == 2.5
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_studies_per_hour_runs_from_the_first_store_start_to_the_last_result() -> None:
    timings = [timing("us1", 10.0, 10.5, 14.0), timing("us4", 11.0, 11.2, 28.0), timing("mg2", 12.0, 12.1, 46.0)]
    assert studies_per_hour(timings) == pytest.approx(3 * 3600 / 36.0)
    # A study without results counts neither in the studies nor in the span's end, but its start still counts.
    assert studies_per_hour([timing("us1", 0.0, 1.0, None), timing("us1", 2.0, 3.0, 9.0)]) == pytest.approx(400.0)
    assert studies_per_hour([timing("us1", 0.0, 1.0, None)]) is None


def test_summary_groups_by_kind_in_kind_order_then_all_and_subtracts_the_quiet_period() -> None:
    timings = [
        timing("us4", 0.0, 0.1, 5.1, images=4),
        timing("us1", 0.1, 0.2, 2.2),
        timing("mg2", 0.2, 0.3, 9.3, images=2),
        timing("us1", 0.3, 0.4, 4.4),
        timing("us4", 0.4, 0.5, None, images=4),
    ]
    rows = summarize(timings, quiet_period_s=1.0)
    assert [r["kind"] for r in rows] == ["us1", "us4", "mg2", "all"]
    us1, us4, mg2, everything = rows
    assert (us1["studies"], us1["with_results"], us1["images"]) == (2, 2, 2)
    assert us1["latency_p50_s"] == pytest.approx(3.0) and us1["latency_max_s"] == pytest.approx(4.0)
    assert us1["latency_p95_s"] == pytest.approx(3.9)
    assert us1["after_quiet_p50_s"] == pytest.approx(2.0) and us1["after_quiet_max_s"] == pytest.approx(3.0)
    assert (us4["studies"], us4["with_results"], us4["images"]) == (2, 1, 8)
    assert us4["latency_max_s"] == pytest.approx(5.0)
    assert mg2["label"] == "MG, 2 views" and mg2["latency_p50_s"] == pytest.approx(9.0)
    assert (everything["studies"], everything["with_results"], everything["images"]) == (5, 4, 12)
    assert everything["latency_max_s"] == pytest.approx(9.0)
    assert everything["store_p50_s"] == pytest.approx(0.1)


def test_the_table_has_a_row_per_kind_and_says_when_results_are_missing() -> None:
    timings = [timing("us1", 0.0, 0.1, 2.1), timing("us10", 0.1, 0.3, None, images=10)]
    text = endtoend.endtoend_table({"summary": summarize(timings, 1.0)})
    lines = text.splitlines()
    assert len(lines) == 2 + 3  # header, rule, us1, us10, all
    assert lines[2].startswith("| US, 1 image ") and "2.00" in lines[2] and "1.00" in lines[2]
    assert "0 of 1" in lines[3] and "n/a" in lines[3]
    assert lines[4].startswith("| all ") and "1 of 2" in lines[4]


def test_us_studies_are_fresh_copies_of_the_samples_one_patient_each(tmp_path) -> None:
    studies = make_studies(["us1", "us4", "us1"], tmp_path)
    assert [kind for kind, _ in studies] == ["us1", "us4", "us1"]
    assert [len(study.instances) for _, study in studies] == [1, 4, 1]
    assert len({study.study_uid for _, study in studies}) == 3
    sops = [str(ds.SOPInstanceUID) for _, study in studies for ds in study.instances]
    assert len(set(sops)) == len(sops) == 6
    assert len({str(study.instances[0].PatientID) for _, study in studies}) == 3
    samples = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in endtoend.us_sources()}
    assert not samples & set(sops), "copies, not the sample instances themselves"
