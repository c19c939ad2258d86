"""Ratios, the printed tables and the results file: the pure part of the bench (no timing here).

Every figure is reported beside the reference measured in the same run, as
a ratio, so a number taken on a loaded or slow machine still says how we
compare: ``ratio(ours, reference)`` is ``ours / reference`` for a rate
(higher is better for us above 1) and, for the analysis, analysis time over
the inference floor (1.0 would be no cost beyond the bare graphs).
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

SCHEMA = 1
OURS = "breastai"
REFERENCES = ("orthanc", "storescp")
RECEIVER_LABELS = {
    "sink": "sink",
    "storescp": "storescp",
    "orthanc": "Orthanc",
    "breastai": "breastai listen",
}


def ratio(ours: float | None, reference: float | None) -> float | None:
    """``ours / reference``, or None when either is missing or the reference is not positive."""
    if ours is None or reference is None or reference <= 0:
        return None
    return ours / reference


def format_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown pipe table with aligned columns (numbers right-aligned), readable in a terminal too."""
    text_rows = [[_cell(value) for value in row] for row in rows]
    for row in text_rows:
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells for {len(headers)} columns: {row}")
    widths = [max([len(h)] + [len(row[i]) for row in text_rows]) for i, h in enumerate(headers)]
    numeric = [
        bool(text_rows) and all(_looks_numeric(row[i]) for row in text_rows if row[i]) for i in range(len(headers))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if numeric[i] else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(list(headers)), rule, *(line(row) for row in text_rows)])


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[0-9.,]+( ?[%x×])?( \([0-9.,]+\))?|n/a|-", text))


# ----------------------------------------------------------------------------------------- ingest


def ingest_summary(measurements: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (instance set, associations): each receiver's median rate and our ratios to the references.

    ``measurements`` are :meth:`bench.ingest.Measurement.to_json` dicts (one per receiver, cell and repeat);
    the median over repeats is taken per receiver, then ``ours / reference`` of those medians.
    """
    groups: dict[tuple[str, int], dict[str, list[Mapping[str, Any]]]] = {}
    for m in measurements:
        key = (str(m["set"]), int(m["associations"]))
        groups.setdefault(key, {}).setdefault(str(m["receiver"]), []).append(m)
    rows = []
    for (name, associations), by_receiver in groups.items():
        row: dict[str, Any] = {"set": name, "associations": associations, "receivers": {}}
        for receiver, runs in by_receiver.items():
            rates = [float(r["instances_per_s"]) for r in runs]
            row["receivers"][receiver] = {
                "instances_per_s": statistics.median(rates),
                "instances_per_s_range": [min(rates), max(rates)],
                "mb_per_s": statistics.median(float(r["mb_per_s"]) for r in runs),
                "instances": int(runs[0]["instances"]),
                "megabytes": float(runs[0]["megabytes"]),
                "repeats": len(runs),
            }
        ours = row["receivers"].get(OURS, {}).get("instances_per_s")
        row["ratios"] = {
            f"{OURS}/{reference}": ratio(ours, row["receivers"].get(reference, {}).get("instances_per_s"))
            for reference in REFERENCES
        }
        rows.append(row)
    return rows


def ingest_table(summary: Sequence[Mapping[str, Any]], set_labels: Mapping[str, str] | None = None) -> str:
    """The ingest table: instances/s (MB/s) per receiver, then ours/Orthanc and ours/storescp."""
    receivers = [r for r in RECEIVER_LABELS if any(r in row["receivers"] for row in summary)]
    headers = ["instances", "assoc.", *(f"{RECEIVER_LABELS[r]} inst/s (MB/s)" for r in receivers)]
    headers += [f"ours/{RECEIVER_LABELS[r]}" for r in REFERENCES]
    rows = []
    for row in summary:
        label = (set_labels or {}).get(row["set"], row["set"])
        first: Mapping[str, Any] = next(iter(row["receivers"].values()), {})
        cells: list[object] = [f"{label}: {first.get('instances', '?')}", row["associations"]]
        for receiver in receivers:
            figures = row["receivers"].get(receiver)
            cells.append("n/a" if figures is None else f"{figures['instances_per_s']:.1f} ({figures['mb_per_s']:.0f})")
        cells += [format_ratio(row["ratios"].get(f"{OURS}/{r}")) for r in REFERENCES]
        rows.append(cells)
    return format_table(headers, rows)


# ----------------------------------------------------------------------------------------- analysis

STAGE_ORDER = ("decode", "segment", "score", "explain/CAM", "SR build", "SC overlay build", "SEG build", "other")


def analysis_table(analysis: Mapping[str, Any]) -> str:
    """The headline: analysis and floor per image, their ratio, the graphs' time inside the analysis, peak RSS."""
    per_image = analysis["per_image_ms"]
    headers = ["images", "lesions", "analysis ms/image", "floor ms/image", "analysis/floor", "peak RSS MiB"]
    row = [
        analysis["images"],
        analysis["lesions"],
        per_image["analysis"],
        per_image["floor"],
        format_ratio(analysis["ratio_analysis_to_floor"]),
        analysis["peak_rss_mib"],
    ]
    return format_table(headers, [row])


def stage_table(analysis: Mapping[str, Any]) -> str:
    """Per-stage time per image, its share of the analysis, and how much of it ran inside ONNX sessions."""
    stages = analysis["stages_ms_per_image"]
    onnx = analysis.get("onnx_ms_per_image_by_stage", {})
    total = float(analysis["per_image_ms"]["analysis"]) or 1.0
    ordered = [s for s in STAGE_ORDER if s in stages] + [s for s in stages if s not in STAGE_ORDER]
    rows: list[list[object]] = [
        [stage, float(stages[stage]), f"{100.0 * float(stages[stage]) / total:.0f}%", float(onnx[stage])]
        if float(onnx.get(stage, 0.0)) > 0
        else [stage, float(stages[stage]), f"{100.0 * float(stages[stage]) / total:.0f}%", "-"]
        for stage in ordered
    ]
    rows.append(["total", float(total), "100%", float(sum(float(v) for v in onnx.values()))])
    return format_table(["stage", "ms/image", "share", "of which in ONNX sessions ms"], rows)


def session_table(analysis: Mapping[str, Any]) -> str:
    """Each graph the pipeline holds: runs per round, ms/image inside the analysis and bare (the floor)."""
    rows = []
    for role, figures in analysis["sessions"].items():
        rows.append(
            [
                role,
                figures["runs"],
                figures["expected_runs"],
                float(figures["in_analysis_ms_per_image"]),
                float(figures["bare_ms_per_image"]),
                format_ratio(ratio(figures["in_analysis_ms_per_image"], figures["bare_ms_per_image"])),
            ]
        )
    return format_table(["graph (role)", "runs", "expected", "in analysis ms/image", "bare ms/image", "ratio"], rows)


def side_by_side_table(analysis: Mapping[str, Any]) -> str:
    """One study's images analysed one at a time and side by side (``image_concurrency``), beside its floor."""
    figures = analysis["side_by_side"]
    per_image = figures["per_image_ms"]
    rows = [
        ["1", per_image["one_at_a_time"], format_ratio(figures["ratio_one_at_a_time_to_floor"]), "1.00"],
        [
            str(figures["threads"]),
            per_image["side_by_side"],
            format_ratio(figures["ratio_side_by_side_to_floor"]),
            format_ratio(figures["speed_up"]),
        ],
    ]
    return (
        format_table(
            [f"images at once ({figures['images']}-image study)", "analysis ms/image", "analysis/floor", "speed-up"],
            rows,
        )
        + f"\nfloor: {per_image['floor']} ms/image"
    )


# ----------------------------------------------------------------------------------------- results file


def host_slug(host: str) -> str:
    """The host name as it appears in a results file name: letters, digits, dots and dashes."""
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", host).strip("-.")
    return slug or "host"


def results_path(directory: Path, date: str, host: str) -> Path:
    """``<directory>/<date>-<host>.json``, or ``...-2.json``, ``-3`` ... when that one exists (never overwritten)."""
    stem = f"{date}-{host_slug(host)}"
    candidate = directory / f"{stem}.json"
    number = 2
    while candidate.exists():
        candidate = directory / f"{stem}-{number}.json"
        number += 1
    return candidate


def write_results(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (through a temporary file, so a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(temporary, path)
    return path


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ----------------------------------------------------------------------------------------- precision


def _interval(figures: Mapping[str, Any]) -> str:
    if figures.get("value") is None:
        return "not measured"
    low, high = figures["ci"]
    return f"{figures['value']:.3f} [{low:.3f}, {high:.3f}]"


def _yes(value: object) -> str:
    return "-" if value is None else ("yes" if value else "no")


def precision_table(precision: Mapping[str, Any]) -> str:
    """Every variant of every graph: median ms per call, its ratio to fp32, the validation figure and whether it holds.

    ``precision`` is :func:`bench.precision.run_precision`'s result. The served variant is marked ``(served)``;
    "export rule" is :func:`models.training.export_family.serves_the_same` against the served graph (families only).
    """
    headers = ["graph", "variant", "ms/call", "/fp32", "metric", "value [95% CI]", "in served CI", "export rule"]
    rows: list[list[object]] = []
    for role, model in precision["models"].items():
        for variant, figures in model["variants"].items():
            rows.append(
                [
                    role,
                    f"{variant} (served)" if variant == model["served"] else variant,
                    f"{figures['median_ms']:.1f}",
                    format_ratio(figures.get("ratio_to_fp32")),
                    model["metric"],
                    _interval(figures),
                    _yes(figures["holds"]),
                    _yes(figures.get("serves_the_same")),
                ]
            )
    return format_table(headers, rows)


def precision_summary_table(precision: Mapping[str, Any]) -> str:
    """Per graph: the served variant, the fastest variant that holds the served figure's interval, and the speed-up."""
    headers = ["graph", "served", "served ms/call", "fastest that holds", "its ms/call", "served/fastest"]
    rows: list[list[object]] = []
    for role, model in precision["models"].items():
        served = model["variants"][model["served"]]
        chosen = model.get("fastest_holding")
        fastest = model["variants"].get(chosen) if chosen else None
        rows.append(
            [
                role,
                model["served"],
                f"{served['median_ms']:.1f}",
                chosen
                or ("none" if any(v.get("holds") is not None for v in model["variants"].values()) else "not judged"),
                "n/a" if fastest is None else f"{fastest['median_ms']:.1f}",
                format_ratio(None if fastest is None else ratio(served["median_ms"], fastest["median_ms"])),
            ]
        )
    return format_table(headers, rows)
