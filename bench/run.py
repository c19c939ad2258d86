"""``make bench``: ingest and analysis figures, each beside its reference, printed and written as JSON.

    python -m bench                   # the defaults: a few minutes on 2 cores
    python -m bench --long            # 500 US studies, 50 mammograms, 3 repeats, 20 analysis rounds
    python -m bench --only analysis   # one part
    python -m bench --only precision  # fp32 / fp16 / int8 of each served graph (not in the default run: ~9 min)
    python -m bench --precision       # the default parts and the precision part
    python -m bench --only endtoend   # Orthanc -> breastai serve -> Orthanc, per study (not in the default run)

The results go to ``bench/results/<date>-<host>.json`` (``-2``, ``-3`` ... when
that name is taken); see bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.machine import LoadSampler, describe_machine, load_line, machine_line
from bench.report import (
    SCHEMA,
    analysis_table,
    ingest_summary,
    ingest_table,
    precision_summary_table,
    precision_table,
    results_path,
    session_table,
    side_by_side_table,
    stage_table,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
LONG = {"us_studies": 500, "mg_images": 50, "repeats": 3, "rounds": 20}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", choices=("ingest", "analysis", "precision", "endtoend"), help="run one part only")
    parser.add_argument(
        "--precision", action="store_true", help="also run the precision part (not in the default run: ~9 min)"
    )
    parser.add_argument("--us-studies", type=int, default=100, help="US studies per cell, 2 instances each (100)")
    parser.add_argument("--mg-images", type=int, default=10, help="3000x2400 mammograms per cell (10; --long: 50)")
    parser.add_argument("--associations", default="1,4", help="concurrent associations per cell (1,4)")
    parser.add_argument("--repeats", type=int, default=3, help="ingest runs per cell and receiver; medians (3)")
    parser.add_argument("--rounds", type=int, default=10, help="timed passes of the analysis over the studies (10)")
    parser.add_argument("--long", action="store_true", help="500 US studies, 50 mammograms, 20 analysis rounds")
    parser.add_argument(
        "--sender", choices=("storescu", "pynetdicom"), default="storescu", help="the one sender (storescu)"
    )
    parser.add_argument(
        "--receivers", default="sink,storescp,orthanc,breastai", help="receivers (sink,storescp,orthanc,breastai)"
    )
    parser.add_argument(
        "--endtoend", action="store_true", help="also run the end-to-end part (not in the default run: ~1 min)"
    )
    parser.add_argument(
        "--endtoend-studies", type=int, default=6, help="end to end: studies pushed from Orthanc, mixed (6)"
    )
    parser.add_argument("--endtoend-parallel", type=int, default=1, help="end to end: Orthanc store calls at once (1)")
    parser.add_argument(
        "--endtoend-interval", type=float, default=0.0, help="end to end: seconds between store starts (0: a burst)"
    )
    parser.add_argument(
        "--precision-rounds", type=int, default=30, help="precision: timed rounds per graph and variant (30)"
    )
    parser.add_argument(
        "--calibration", type=int, default=200, help="precision: training inputs calibrating int8 (200)"
    )
    parser.add_argument("--int8", choices=("static", "dynamic"), default="static", help="precision: quantisation")
    parser.add_argument("--no-dice", action="store_true", help="precision: time the segmenter, skip its Dice")
    parser.add_argument(
        "--datasets", type=Path, help="precision: the development datasets (default ../shared/datasets)"
    )
    parser.add_argument("--study", action="append", type=Path, help="analysis study folder (default: samples/)")
    parser.add_argument("--workdir", type=Path, help="where the instances and receivers' files go (a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes (bench/results)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no results file")
    return parser


def run_analysis_process(rounds: int, studies: Sequence[Path] | None) -> dict[str, Any]:
    """``python -m bench.analysis`` in a process of its own, so that its peak RSS is the analysis's alone."""
    with tempfile.TemporaryDirectory(prefix="breastai-bench-analysis-") as folder:
        target = Path(folder) / "analysis.json"
        command = [sys.executable, "-m", "bench.analysis", "--rounds", str(rounds), "--json", str(target)]
        command += [str(study) for study in studies or ()]
        subprocess.run(command, cwd=ROOT, check=True)
        result: dict[str, Any] = json.loads(target.read_text())
    return result


def run_precision_process(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m bench.precision`` in a process of its own, as the analysis runs (bench/precision.py)."""
    with tempfile.TemporaryDirectory(prefix="breastai-bench-precision-") as folder:
        target = Path(folder) / "precision.json"
        command = [sys.executable, "-m", "bench.precision", "--json", str(target)]
        command += ["--rounds", str(args.precision_rounds), "--calibration", str(args.calibration)]
        command += ["--int8", args.int8] + (["--datasets", str(args.datasets)] if args.datasets else [])
        command += ["--no-dice"] if args.no_dice else []
        subprocess.run(command, cwd=ROOT, check=True)
        result: dict[str, Any] = json.loads(target.read_text())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.long:
        for key, value in LONG.items():
            if getattr(args, key) == build_parser().get_default(key):
                setattr(args, key, value)
    associations = tuple(int(a) for a in args.associations.split(",") if a.strip())
    receivers = tuple(r.strip() for r in args.receivers.split(",") if r.strip())
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = describe_machine(args.workdir or Path(tempfile.gettempdir()))
    print(machine_line(machine), flush=True)
    payload: dict[str, Any] = {
        "schema": SCHEMA,
        "what": "make bench (bench/README.md): ingest and analysis, each beside its reference, as ratios; precision: "
        "each served graph in fp32, fp16 and int8",
        "started_at": started_at,
        "command": ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine,
    }
    with LoadSampler() as sampler:
        if args.only in (None, "ingest"):
            from bench.ingest import IngestOptions, run_ingest

            options = IngestOptions(
                us_studies=args.us_studies,
                mg_images=args.mg_images,
                associations=associations,
                repeats=args.repeats,
                sender=args.sender,
                receivers=receivers,
                workdir=args.workdir,
                keep=args.keep,
            )
            ingest = run_ingest(options, progress=lambda line: print(line, flush=True))
            ingest["options"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
            ingest["summary"] = ingest_summary(ingest["measurements"])
            payload["ingest"] = ingest
        if args.only in (None, "analysis"):
            payload["analysis"] = run_analysis_process(args.rounds, args.study)
        if args.only == "precision" or (args.only is None and args.precision):
            payload["precision"] = run_precision_process(args)
        if args.only == "endtoend" or (args.only is None and args.endtoend):
            from bench.endtoend import EndToEndOptions, run_endtoend

            payload["endtoend"] = run_endtoend(
                EndToEndOptions(
                    studies=args.endtoend_studies,
                    parallel=args.endtoend_parallel,
                    interval_s=args.endtoend_interval,
                    workdir=args.workdir,
                    keep=args.keep,
                ),
                progress=lambda line: print(line, flush=True),
            )
    payload["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    payload["load"] = {"summary": load_line(sampler.snapshots), "samples": sampler.snapshots}
    text = tables(payload)
    payload["tables"] = text
    print()
    print(text)
    if not args.no_write:
        path = write_results(results_path(args.results_dir, time.strftime("%Y-%m-%d"), machine["host"]), payload)
        print(f"\nwritten: {os.path.relpath(path, Path.cwd())}")
    return 0


def tables(payload: dict[str, Any]) -> str:
    """Everything printed at the end: the machine and load lines, then each part's tables."""
    lines = [f"Machine: {machine_line(payload['machine'])}", f"Load: {payload['load']['summary']}"]
    ingest = payload.get("ingest")
    if ingest:
        labels = {name: s["label"] for name, s in ingest["sets"].items()}
        lines += [
            "",
            f"Ingest (sender: {ingest['sender']}; median of {ingest['repeats']} run(s); "
            "instances answered 0x0000 per second, MB/s of Part 10 files):",
            "",
            ingest_table(ingest["summary"], labels),
        ]
        rss = ingest["receivers"].get("breastai", {}).get("peak_rss_mib")
        if rss is not None:
            lines.append(f"breastai listen peak RSS: {rss} MiB")
    analysis = payload.get("analysis")
    if analysis:
        lines += [
            "",
            f"Analysis (process_study on {', '.join(analysis['studies'])}, {analysis['rounds']} rounds after a "
            "warm-up; floor: the same graphs run bare on the same inputs):",
            "",
            analysis_table(analysis),
            "",
            stage_table(analysis),
            "",
            session_table(analysis),
        ]
        if "side_by_side" in analysis:
            lines += ["", side_by_side_table(analysis)]
        if not analysis.get("sessions_check_ok", True):
            lines.append("WARNING: the graphs ran a different number of times than the pipeline should")
    precision = payload.get("precision")
    if precision:
        lines += [
            "",
            f"Precision (each served US graph as fp32, fp16 and int8 ({precision['variants']['int8']}); the "
            f"worker's session settings; median ms per call over {precision['latency']['rounds']} interleaved "
            f"rounds; validation split, {precision['interval']}):",
            "",
            precision_table(precision),
            "",
            precision_summary_table(precision),
        ]
    endtoend = payload.get("endtoend")
    if endtoend:
        from bench.endtoend import endtoend_lines

        lines += ["", *endtoend_lines(endtoend)]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
