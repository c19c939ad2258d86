"""The pure parts of ``make bench`` (bench/): ratios, tables, the results file, the machine description.

No figure is timed here: the stage clock runs on a fake ``perf_counter``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import analysis, machine, report
from bench.ingest import Measurement, deal, storescu_problem

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6354 CPU @ 3.00GHz
physical id\t: 0
core id\t: 0
flags\t\t: fpu sse avx2 avx512f avx512_bf16

processor\t: 1
model name\t: Intel(R) Xeon(R) Gold 6354 CPU @ 3.00GHz
physical id\t: 0
core id\t: 0
flags\t\t: fpu sse avx2 avx512f avx512_bf16

processor\t: 2
model name\t: Intel(R) Xeon(R) Gold 6354 CPU @ 3.00GHz
physical id\t: 0
core id\t: 1
"""


def _measurement(receiver: str, per_s: float, associations: int = 1, repeat: int = 0, name: str = "us") -> Any:
    return Measurement(name, associations, receiver, repeat, 100, 96.0, 100 / per_s).to_json()


# ----------------------------------------------------------------------------------------- ratios and tables


def test_ratio_is_ours_over_the_reference_and_none_without_one() -> None:
    assert report.ratio(50.0, 200.0) == pytest.approx(0.25)
    assert report.ratio(3.0, 1.5) == pytest.approx(2.0)
    assert report.ratio(None, 1.0) is None and report.ratio(1.0, None) is None
    assert report.ratio(1.0, 0.0) is None
    assert report.format_ratio(None) == "n/a" and report.format_ratio(0.456) == "0.46"


def test_measurement_rates_come_from_instances_bytes_and_seconds() -> None:
    m = Measurement("mg", 4, "orthanc", 0, 10, 144.0, 2.0)
    assert m.instances_per_s == pytest.approx(5.0) and m.mb_per_s == pytest.approx(72.0)
    body = m.to_json()
    assert body["set"] == "mg" and body["associations"] == 4 and body["instances_per_s"] == 5.0
    assert Measurement("mg", 4, "orthanc", 0, 10, 144.0, 0.0).instances_per_s == 0.0


def test_ingest_summary_takes_medians_over_repeats_then_the_ratios() -> None:
    measurements = [
        _measurement("storescp", 400.0, repeat=0),
        _measurement("storescp", 600.0, repeat=1),
        _measurement("storescp", 500.0, repeat=2),
        _measurement("orthanc", 200.0),
        _measurement("breastai", 100.0, repeat=0),
        _measurement("breastai", 150.0, repeat=1),
        _measurement("breastai", 50.0, repeat=2),
        _measurement("breastai", 80.0, associations=4),
        _measurement("storescp", 800.0, associations=4),
    ]
    rows = {(row["set"], row["associations"]): row for row in report.ingest_summary(measurements)}
    one = rows[("us", 1)]
    assert one["receivers"]["storescp"]["instances_per_s"] == pytest.approx(500.0)
    assert one["receivers"]["breastai"]["repeats"] == 3
    assert one["ratios"]["breastai/storescp"] == pytest.approx(0.2)
    assert one["ratios"]["breastai/orthanc"] == pytest.approx(0.5)
    four = rows[("us", 4)]
    assert four["ratios"]["breastai/storescp"] == pytest.approx(0.1)
    assert four["ratios"]["breastai/orthanc"] is None  # no Orthanc figure for that cell: no ratio, not zero


def test_ingest_table_shows_each_receiver_and_both_ratios() -> None:
    summary = report.ingest_summary(
        [_measurement("storescp", 400.0), _measurement("orthanc", 200.0), _measurement("breastai", 100.0)]
    )
    table = report.ingest_table(summary, {"us": "US 800x600 mono+RGB"})
    header, rule, row = table.splitlines()
    assert "storescp inst/s (MB/s)" in header and "ours/Orthanc" in header and "ours/storescp" in header
    assert "sink" not in header  # a receiver not measured has no column
    assert set(rule) <= {"|", "-", ":"}
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == "US 800x600 mono+RGB: 100"
    assert cells[2:] == ["400.0 (384)", "200.0 (192)", "100.0 (96)", "0.50", "0.25"]


def test_format_table_aligns_columns_and_refuses_ragged_rows() -> None:
    table = report.format_table(["stage", "ms"], [["decode", 3.26], ["segment", 101.0]])
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # every line as wide
    assert lines[1].endswith("-:|")  # the numeric column right-aligned
    assert lines[2].endswith("|   3.3 |") and lines[3].endswith("| 101.0 |")
    with pytest.raises(ValueError, match="cells"):
        report.format_table(["a", "b"], [["only one"]])


ANALYSIS = {
    "images": 6,
    "lesions": 4,
    "per_image_ms": {"analysis": 400.0, "floor": 200.0, "onnx_inside_analysis": 240.0},
    "ratio_analysis_to_floor": 2.0,
    "peak_rss_mib": 700.5,
    "stages_ms_per_image": {"score": 150.0, "segment": 90.0, "decode": 5.0, "SR build": 60.0, "other": 95.0},
    "onnx_ms_per_image_by_stage": {"segment": 85.0, "score": 140.0},
    "sessions": {
        "us_segmenter": {"runs": 6, "expected_runs": 6, "in_analysis_ms_per_image": 50.0, "bare_ms_per_image": 40.0}
    },
}


def test_analysis_tables_show_the_ratio_stages_in_order_and_the_onnx_share() -> None:
    header, _, row = report.analysis_table(ANALYSIS).splitlines()
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    values = dict(zip(columns, (cell.strip() for cell in row.strip("|").split("|")), strict=True))
    assert values["analysis/floor"] == "2.00" and values["floor ms/image"] == "200.0"
    stages = report.stage_table(ANALYSIS)
    names = [line.split("|")[1].strip() for line in stages.splitlines()[2:]]
    assert names == ["decode", "segment", "score", "SR build", "other", "total"]
    decode = stages.splitlines()[2]
    assert decode.rstrip(" |").endswith("-")  # no graph ran in decode
    assert "225.0" in stages.splitlines()[-1]  # total ONNX: 85 + 140
    sessions = report.session_table(ANALYSIS)
    assert "us_segmenter" in sessions and "1.25" in sessions


def test_the_side_by_side_table_puts_both_ways_beside_the_floor() -> None:
    figures = {
        "images": 10,
        "threads": 2,
        "rounds": 3,
        "per_image_ms": {"one_at_a_time": 160.0, "side_by_side": 128.0, "floor": 100.0},
        "ratio_one_at_a_time_to_floor": 1.6,
        "ratio_side_by_side_to_floor": 1.28,
        "speed_up": 1.25,
    }
    header, _, serial, parallel, floor = report.side_by_side_table({"side_by_side": figures}).splitlines()
    assert "10-image study" in header
    assert [c.strip() for c in serial.strip("|").split("|")] == ["1", "160.0", "1.60", "1.00"]
    assert [c.strip() for c in parallel.strip("|").split("|")] == ["2", "128.0", "1.28", "1.25"]
    assert floor == "floor: 100.0 ms/image"


# ----------------------------------------------------------------------------------------- results file


def test_results_path_is_date_and_host_and_never_overwrites(tmp_path: Path) -> None:
    first = report.results_path(tmp_path, "2026-12-08", "build box/1")
    assert first.name == "2026-12-08-build-box-1.json"
    report.write_results(first, {"schema": report.SCHEMA})
    second = report.results_path(tmp_path, "2026-12-08", "build box/1")
    assert second.name == "2026-12-08-build-box-1-2.json"
    assert report.host_slug("...") == "host"


def test_write_results_writes_json_through_a_temporary_file(tmp_path: Path) -> None:
    path = report.write_results(tmp_path / "sub" / "r.json", {"path": tmp_path, "n": 1, "nested": {"x": [1.5]}})
    assert json.loads(path.read_text()) == {"path": str(tmp_path), "n": 1, "nested": {"x": [1.5]}}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
    with pytest.raises(TypeError):
        report.write_results(tmp_path / "bad.json", {"x": object()})


# ----------------------------------------------------------------------------------------- machine


def test_cpuinfo_gives_the_model_logical_cpus_and_physical_cores() -> None:
    found = machine.parse_cpuinfo(CPUINFO)
    assert found["cpu_model"] == "Intel(R) Xeon(R) Gold 6354 CPU @ 3.00GHz"
    assert found["logical_cpus"] == 3 and found["physical_cores"] == 2
    assert found["cpu_flags"] == ["avx2", "avx512f", "avx512_bf16"]
    bare = machine.parse_cpuinfo("processor\t: 0\nmodel name\t: Some CPU\n")
    assert bare["physical_cores"] is None and bare["logical_cpus"] == 1


def test_meminfo_and_os_release() -> None:
    memory = machine.parse_meminfo("MemTotal:       24683520 kB\nMemFree: 1 kB\nMemAvailable:   12341760 kB\n")
    assert memory == {"ram_gib": 23.5, "ram_available_gib": 11.8}
    assert machine.parse_os_release('NAME="Debian GNU/Linux"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n') == (
        "Debian GNU/Linux 12 (bookworm)"
    )
    assert machine.parse_os_release("NAME=Alpine\nVERSION=3.20\n") == "Alpine 3.20"
    assert machine.parse_os_release("") == "unknown"


def test_filesystem_of_takes_the_longest_mount_point() -> None:
    mounts = "/dev/vda / ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\ntmpfs /tmpfoo tmpfs rw 0 0\n"
    assert machine.filesystem_of(Path("/tmp/x/y"), mounts) == "tmpfs"
    assert machine.filesystem_of(Path("/work/main"), mounts) == "ext4"
    assert machine.filesystem_of(Path("/tmpx"), mounts) == "ext4"


def test_machine_line_and_description_name_what_a_figure_depends_on() -> None:
    line = machine.machine_line(
        {
            "host": "vm",
            "cpu_model": "Xeon",
            "physical_cores": 2,
            "logical_cpus": 4,
            "ram_gib": 23.5,
            "os": "Debian 12",
            "kernel": "6.1",
            "python": "3.11.7",
            "packages": {"onnxruntime": "1.32.0"},
        }
    )
    assert line == "vm: Xeon, 2 cores / 4 CPUs, 23.5 GiB RAM, Debian 12 (6.1), Python 3.11.7, onnxruntime 1.32.0"
    described = machine.describe_machine()
    for key in ("host", "cpu_model", "logical_cpus", "ram_gib", "os", "python", "packages"):
        assert key in described
    assert "onnxruntime" in described["packages"]


def test_load_line_says_whether_the_machine_was_shared() -> None:
    idle = [{"loadavg": [0.1, 0.2, 0.3], "busy_processes": []}]
    assert machine.load_line(idle).startswith("machine not shared")
    busy = [
        {"loadavg": [2.5], "busy_processes": [{"name": "python", "command": "python train.py", "cpu_percent": 150}]},
        {"loadavg": [3.1], "busy_processes": [{"name": "python", "command": "python train.py", "cpu_percent": 190}]},
    ]
    line = machine.load_line(busy)
    assert "SHARED" in line and "python train.py (190% CPU)" in line and "3.10" in line
    many = [
        {
            "loadavg": [1.0],
            "busy_processes": [{"name": "p", "command": f"job\n{n}", "cpu_percent": 10 + n} for n in range(7)],
        }
    ]
    line = machine.load_line(many, most=3)
    assert "\n" not in line and "job 6 (16% CPU), job 5 (15% CPU), job 4 (14% CPU) and 4 more" in line


# ----------------------------------------------------------------------------------------- ingest helpers


def test_deal_is_round_robin_without_empty_hands() -> None:
    assert deal([1, 2, 3, 4, 5], 4) == [[1, 5], [2], [3], [4]]
    assert deal([1, 2], 4) == [[1], [2]]
    assert deal([1, 2, 3], 1) == [[1, 2, 3]]


def test_only_success_responses_count_as_answered() -> None:
    ok = "I: Sending file: a.dcm\nI: Received Store Response (Success)\nI: Received Store Response (Success)\n"
    assert storescu_problem(ok, 2, 0) is None
    refused = "I: Received Store Response (Success)\nI: Received Store Response (Error: CannotUnderstand)\n"
    problem = storescu_problem(refused, 2, 194)
    assert problem is not None and "1 of 2" in problem and "CannotUnderstand" in problem
    warned = "I: Received Store Response (Warning: CoercionOfDataElements)\n"
    assert storescu_problem(warned, 1, 0) is not None
    assert storescu_problem("F: Association Request Failed\n", 1, 1) is not None


# ----------------------------------------------------------------------------------------- analysis helpers


class FakeClock:
    """A perf_counter that advances only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_stage_clock_counts_nested_stages_once_and_graph_runs_in_their_stage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeClock()
    monkeypatch.setattr(analysis, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    clock = analysis.StageClock()

    def graph(inputs: Any) -> dict[str, Any]:
        fake.now += 3.0
        return {"out": inputs}

    run = clock.session("family", graph)

    def explain() -> None:
        fake.now += 1.0

    explain_timed = clock.timed("explain/CAM", explain)

    def score() -> None:
        fake.now += 2.0
        run({"image": 1})
        explain_timed()

    clock.timed("score", score)()
    assert clock.exclusive == {"score": 5.0, "explain/CAM": 1.0}  # 2 own + 3 in the graph; the explain second apart
    assert clock.onnx_by_stage == {"score": 3.0}
    assert clock.session_runs == {"family": 1} and clock.recorded == [("family", {"image": 1})]


def test_expected_runs_and_summary_check_the_graph_counts() -> None:
    assert analysis.expected_runs(["seg", "refiner", "dlr"], "seg", images=3, lesions=2) == {
        "seg": 3,
        "refiner": 2,
        "dlr": 2,
    }
    run = analysis.StudyRun(
        study="s",
        images=2,
        lesions=1,
        analysis_s=0.8,
        floor_s=0.4,
        stages={"segment": 0.3, "score": 0.3, "other": 0.2},
        onnx_by_stage={"segment": 0.25, "score": 0.2},
        session_runs={"seg": 2, "dlr": 1},
        session_s={"seg": 0.25, "dlr": 0.2},
        bare_session_s={"seg": 0.2, "dlr": 0.2},
    )
    summary = analysis.summarise([run, run], ["seg", "dlr"], "seg")
    assert summary["images"] == 4 and summary["lesions"] == 2
    assert summary["per_image_ms"] == {"analysis": 400.0, "floor": 200.0, "onnx_inside_analysis": 225.0}
    assert summary["ratio_analysis_to_floor"] == 2.0
    assert summary["sessions"]["seg"]["runs"] == 4 and summary["sessions_check_ok"] is True
    short = analysis.summarise([run], ["seg", "dlr", "refiner"], "seg")
    assert short["sessions"]["refiner"] == {
        "runs": 0,
        "expected_runs": 1,
        "in_analysis_ms_per_image": 0.0,
        "bare_ms_per_image": 0.0,
    }
    assert short["sessions_check_ok"] is False
