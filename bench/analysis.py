"""Analysis: ``process_study`` per image against its inference floor, with a per-stage breakdown.

The analysis is the worker's own ``workers.consumer.process_study`` on the
sample studies in ``samples/`` (or any folders given), with the B-mode
pipeline of ``load_bmode_pipeline`` (the bundled models, the manifest's
default families; no mammography pipeline: the samples are ultrasound).

The floor is the same ONNX graphs run bare by the same backend
(``OnnxRuntimeBackend.run``) on the same inputs: every graph the pipeline
holds (``BModePipeline.backends``: segmenter, refiner, each family) is
wrapped while a study is analysed, each call's inputs are kept, and right
after that study the recorded calls are replayed on the unwrapped backends.
So the floor has exactly the runs the analysis made (the segmenter once per
image, the refiner and every family graph once per lesion), measured
beside it; the bench checks those counts.

Stages are timed from the outside: module functions the worker and the
pipeline call are replaced, for the run only, by timing wrappers
(``perf_counter``); no product code is edited. A stage's time excludes the
stages nested in it (the host-side CAM work inside scoring is counted under
explain/CAM, not twice), and includes the ONNX runs made inside it, which
are also shown apart:

decode
    ``read_header``, ``route``, ``read_frames``, ``check_pixels`` (the colour
    check decodes again), ``crop``, ``clinical_context``.
segment
    ``models.inference.pipeline._segment``: segmenter graph, components,
    refiner graph per lesion.
score
    ``models.inference.pipeline.score_lesion``: every family graph, SVM,
    consensus, BI-RADS co-decision. The class-activation maps are outputs of
    the family graphs, computed in the same run as the score: their compute
    is in "score", inside the ONNX column.
explain/CAM
    the host-side map work: ``normalise_cam`` (upsampling each family's raw
    map), ``paste`` (into the image, for the lesion and for each family's
    overlay), ``consensus_map``, the lexicon's ``contribution_map``.
SR build / SC overlay build / SEG build
    ``build_report`` and each frame's ``measurement_groups`` (built on the
    image's thread in the worker); ``build_overlay_image`` (rendering and encoding one
    overlay per family and image); ``build_segmentation`` and the lesion
    masks it is given (``_lesion_mask``).
other
    what ``process_study`` spent outside those (UIDs, bookkeeping).

Side by side: a study of :data:`SIDE_BY_SIDE_IMAGES` images (the studies'
images cycled, fresh UIDs, one patient) analysed with ``image_concurrency``
1 and with the worker's default, alternated, each round beside that study's
floor (an instrumented run replayed bare, as above). The stage clock is off
for these runs: stages of images on several threads cannot be told apart.

Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of this process,
which did nothing but load the pipeline and run the studies (``bench.run``
starts it as a process of its own).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_STUDIES = (ROOT / "samples" / "study1", ROOT / "samples" / "study2")
#: Images of the study analysed one at a time and side by side (as the end-to-end bench's largest US study).
SIDE_BY_SIDE_IMAGES = 10

Arrays = Mapping[str, npt.NDArray[np.float32]]
Run = Callable[[Arrays], dict[str, npt.NDArray[np.float32]]]


@dataclass
class StageClock:
    """Exclusive time per stage (nested stages subtracted) and ONNX time per enclosing stage."""

    exclusive: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    onnx_by_stage: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    session_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    session_runs: Counter[str] = field(default_factory=Counter)
    recorded: list[tuple[str, Arrays]] = field(default_factory=list)
    images: int = 0
    lesions: int = 0
    _stack: list[list[Any]] = field(default_factory=list)

    def timed(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` wrapped so that its time, less that of stages called inside it, counts for ``stage``."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            frame: list[Any] = [stage, 0.0]  # stage, time of nested stages
            self._stack.append(frame)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                self._stack.pop()
                self.exclusive[stage] += elapsed - float(frame[1])
                if self._stack:
                    self._stack[-1][1] += elapsed

        return wrapper

    def session(self, role: str, run: Run) -> Run:
        """A graph's ``run`` that keeps its inputs and counts its time for the stage it ran in (not nested apart)."""

        def wrapper(inputs: Arrays) -> dict[str, npt.NDArray[np.float32]]:
            started = time.perf_counter()
            try:
                return run(inputs)
            finally:
                elapsed = time.perf_counter() - started
                stage = str(self._stack[-1][0]) if self._stack else "other"
                self.onnx_by_stage[stage] += elapsed
                self.session_seconds[role] += elapsed
                self.session_runs[role] += 1
                self.recorded.append((role, inputs))

        return wrapper


def _stage_hooks() -> list[tuple[str, ModuleType, tuple[str, ...]]]:
    """(stage, module, names): the module attributes that :func:`instrumented` wraps (looked up at call time)."""
    import models.inference.consensus
    import models.inference.family_scorer
    import models.inference.lexicon
    import models.inference.pipeline
    import workers.consumer

    consumer, pipeline = workers.consumer, models.inference.pipeline
    return [
        ("decode", consumer, ("read_header", "route", "read_frames", "check_pixels", "crop", "clinical_context")),
        ("segment", pipeline, ("_segment",)),
        ("score", pipeline, ("score_lesion",)),
        ("explain/CAM", models.inference.family_scorer, ("normalise_cam",)),
        ("explain/CAM", pipeline, ("paste",)),
        ("explain/CAM", models.inference.consensus, ("consensus_map", "paste")),
        ("explain/CAM", models.inference.lexicon, ("contribution_map",)),
        ("SR build", consumer, ("build_report", "measurement_groups")),
        ("SC overlay build", consumer, ("build_overlay_image",)),
        ("SEG build", consumer, ("build_segmentation", "_lesion_mask")),
    ]


@contextlib.contextmanager
def instrumented(pipeline: Any, clock: StageClock) -> Iterator[dict[str, Run]]:
    """Wrap the stages and the pipeline's graphs for the duration; yields each graph's bare ``run`` by role."""
    saved: list[tuple[object, str, object, bool]] = []

    def replace(owner: object, name: str, new: object) -> None:
        own = name in vars(owner)  # an instance attribute (or a module global) to restore, or a method to unshadow
        saved.append((owner, name, getattr(owner, name), own))
        setattr(owner, name, new)

    bare: dict[str, Run] = {}
    try:
        for stage, module, names in _stage_hooks():
            for name in names:
                replace(module, name, clock.timed(stage, getattr(module, name)))
        for role, backend in pipeline.backends.items():
            bare[role] = backend.run
            replace(backend, "run", clock.session(role, backend.run))
        analyse = pipeline.analyse

        def counted(gray: Any, *args: Any, **kwargs: Any) -> Any:
            analysis = analyse(gray, *args, **kwargs)
            clock.images += 1
            clock.lesions += len(analysis.lesions)
            return analysis

        replace(pipeline, "analyse", counted)
        yield bare
    finally:
        for owner, name, original, own in reversed(saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


@dataclass
class StudyRun:
    """One study analysed once, and its floor."""

    study: str
    images: int
    lesions: int
    analysis_s: float
    floor_s: float
    stages: dict[str, float]
    onnx_by_stage: dict[str, float]
    session_runs: dict[str, int]
    session_s: dict[str, float]
    bare_session_s: dict[str, float]


def run_study(paths: Sequence[Path], pipeline: Any, context: Any, name: str) -> StudyRun:
    """``process_study`` once under the stage clock, then its recorded graph runs replayed bare (the floor)."""
    from workers.consumer import process_study

    clock = StageClock()
    with instrumented(pipeline, clock) as bare:
        started = time.perf_counter()
        results = process_study(paths, pipeline, context)
        analysis_s = time.perf_counter() - started
    if results.report is None:
        raise RuntimeError(f"{name}: no report (nothing analysable): {results.skipped}")
    bare_s: defaultdict[str, float] = defaultdict(float)
    for role, inputs in clock.recorded:
        started = time.perf_counter()
        bare[role](inputs)
        bare_s[role] += time.perf_counter() - started
    stages = dict(clock.exclusive)
    stages["other"] = analysis_s - sum(stages.values())
    return StudyRun(
        study=name,
        images=clock.images,
        lesions=clock.lesions,
        analysis_s=analysis_s,
        floor_s=sum(bare_s.values()),
        stages=stages,
        onnx_by_stage=dict(clock.onnx_by_stage),
        session_runs=dict(clock.session_runs),
        session_s=dict(clock.session_seconds),
        bare_session_s=dict(bare_s),
    )


def expected_runs(roles: Sequence[str], segmenter_role: str, images: int, lesions: int) -> dict[str, int]:
    """Runs of each graph the pipeline makes: the segmenter once per image, every other graph once per lesion."""
    return {role: images if role == segmenter_role else lesions for role in roles}


def summarise(runs: Sequence[StudyRun], roles: Sequence[str], segmenter_role: str) -> dict[str, Any]:
    """Per-image figures over every timed run, the session counts checked against the pipeline's graphs."""
    images = sum(r.images for r in runs)
    lesions = sum(r.lesions for r in runs)
    per_image = 1000.0 / images if images else 0.0
    analysis_s = sum(r.analysis_s for r in runs)
    floor_s = sum(r.floor_s for r in runs)
    stages: defaultdict[str, float] = defaultdict(float)
    onnx: defaultdict[str, float] = defaultdict(float)
    runs_by_role: Counter[str] = Counter()
    in_analysis: defaultdict[str, float] = defaultdict(float)
    bare: defaultdict[str, float] = defaultdict(float)
    for r in runs:
        for key, value in r.stages.items():
            stages[key] += value
        for key, value in r.onnx_by_stage.items():
            onnx[key] += value
        runs_by_role.update(r.session_runs)
        for key, value in r.session_s.items():
            in_analysis[key] += value
        for key, value in r.bare_session_s.items():
            bare[key] += value
    expected = expected_runs(roles, segmenter_role, images, lesions)
    sessions = {
        role: {
            "runs": runs_by_role.get(role, 0),
            "expected_runs": expected[role],
            "in_analysis_ms_per_image": round(in_analysis[role] * per_image, 2),
            "bare_ms_per_image": round(bare[role] * per_image, 2),
        }
        for role in roles
    }
    unexpected = sorted(set(runs_by_role) - set(roles))
    return {
        "images": images,
        "lesions": lesions,
        "per_image_ms": {
            "analysis": round(analysis_s * per_image, 2),
            "floor": round(floor_s * per_image, 2),
            "onnx_inside_analysis": round(sum(in_analysis.values()) * per_image, 2),
        },
        "ratio_analysis_to_floor": round(analysis_s / floor_s, 3) if floor_s > 0 else None,
        "stages_ms_per_image": {key: round(value * per_image, 2) for key, value in stages.items()},
        "onnx_ms_per_image_by_stage": {key: round(value * per_image, 2) for key, value in onnx.items()},
        "sessions": sessions,
        "sessions_check_ok": not unexpected and all(s["runs"] == s["expected_runs"] for s in sessions.values()),
        "per_study": [
            {
                "study": r.study,
                "images": r.images,
                "lesions": r.lesions,
                "analysis_ms": round(r.analysis_s * 1000, 1),
                "floor_ms": round(r.floor_s * 1000, 1),
            }
            for r in runs
        ],
    }


def side_by_side(
    sources: Sequence[Path], pipeline: Any, context: Any, rounds: int, threads: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    """One study of the ``sources`` cycled to :data:`SIDE_BY_SIDE_IMAGES` images, one at a time and ``threads`` at once.

    Each round: the study under the stage clock (its floor), then untimed by stages with ``image_concurrency`` 1,
    then ``threads``; per-image medians over the rounds.
    """
    import itertools
    import tempfile

    from tests.faults.traffic import copies_of  # fresh UIDs and a patient, as the end-to-end bench's studies
    from workers.consumer import process_study

    with tempfile.TemporaryDirectory(prefix="breastai-bench-") as folder:
        (study,) = copies_of(list(itertools.islice(itertools.cycle(sources), SIDE_BY_SIDE_IMAGES)), 1, prefix="BENCH")
        paths = []
        for index, ds in enumerate(study.instances):
            path = Path(folder) / f"{index:02d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        process_study(paths, pipeline, context, image_concurrency=threads)  # warm-up of the threads' path
        floors, serial, parallel = [], [], []
        for number in range(rounds):
            floors.append(run_study(paths, pipeline, context, "side-by-side").floor_s)
            for concurrency, times in ((1, serial), (threads, parallel)):
                started = time.perf_counter()
                process_study(paths, pipeline, context, image_concurrency=concurrency)
                times.append(time.perf_counter() - started)
            progress(
                f"analysis: side by side {number + 1}/{rounds}: {SIDE_BY_SIDE_IMAGES} images one at a time "
                f"{serial[-1] * 1000:.0f} ms, {threads} at once {parallel[-1] * 1000:.0f} ms "
                f"(floor {floors[-1] * 1000:.0f})"
            )
    per_image = {
        "one_at_a_time": statistics.median(serial) * 1000 / SIDE_BY_SIDE_IMAGES,
        "side_by_side": statistics.median(parallel) * 1000 / SIDE_BY_SIDE_IMAGES,
        "floor": statistics.median(floors) * 1000 / SIDE_BY_SIDE_IMAGES,
    }
    return {
        "images": SIDE_BY_SIDE_IMAGES,
        "threads": threads,
        "rounds": rounds,
        "per_image_ms": {key: round(value, 2) for key, value in per_image.items()},
        "ratio_one_at_a_time_to_floor": round(per_image["one_at_a_time"] / per_image["floor"], 3),
        "ratio_side_by_side_to_floor": round(per_image["side_by_side"] / per_image["floor"], 3),
        "speed_up": round(per_image["one_at_a_time"] / per_image["side_by_side"], 3),
    }


def _rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def run_analysis(
    studies: Sequence[Path] = SAMPLE_STUDIES, rounds: int = 5, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    """Load the pipeline, analyse every study once untimed (warm-up), then ``rounds`` timed times each."""
    from models.inference.pipeline import SEGMENTER_ROLE, load_bmode_pipeline
    from service.logging import silence_value_quoting_warnings
    from service.settings import Settings
    from workers.heap import return_large_buffers_to_the_os
    from workers.sr_writer import ReportContext

    silence_value_quoting_warnings()
    return_large_buffers_to_the_os()  # as the worker does
    started = time.perf_counter()
    pipeline = load_bmode_pipeline()
    load_s = time.perf_counter() - started
    rss_loaded = _rss_mib()
    context = ReportContext()
    folders = [Path(s) for s in studies]
    files = {folder.name: sorted(p for p in folder.glob("*.dcm")) for folder in folders}
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        raise RuntimeError(f"no DICOM files in {', '.join(empty)} (make samples)")
    roles = list(pipeline.backends)
    progress(f"analysis: pipeline loaded in {load_s:.1f} s; graphs {', '.join(roles)}; warm-up")
    for name, paths in files.items():
        run_study(paths, pipeline, context, name)
    runs = []
    for number in range(rounds):
        for name, paths in files.items():
            runs.append(run_study(paths, pipeline, context, name))
        done = runs[-len(files) :]
        progress(
            f"analysis: round {number + 1}/{rounds}: "
            + ", ".join(f"{r.study} {r.analysis_s * 1000:.0f} ms (floor {r.floor_s * 1000:.0f})" for r in done)
        )
    summary = summarise(runs, roles, SEGMENTER_ROLE)
    summary["side_by_side"] = side_by_side(
        [path for paths in files.values() for path in paths],
        pipeline,
        context,
        rounds,
        Settings.image_concurrency,
        progress,
    )
    summary.update(
        {
            "studies": [str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f) for f in folders],
            "rounds": rounds,
            "families": list(pipeline.families),
            "models": [f"{m.name} {m.version}" for m in pipeline.model_infos],
            "pipeline_load_s": round(load_s, 2),
            "rss_after_load_mib": rss_loaded,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    )
    if not summary["sessions_check_ok"]:
        progress(f"analysis: WARNING graph runs differ from the expected counts: {summary['sessions']}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="*", type=Path, help="study folders (default: samples/study1 and study2)")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes over the studies (default 5)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON (else to stdout)")
    args = parser.parse_args(argv)
    result = run_analysis(args.studies or SAMPLE_STUDIES, args.rounds, lambda line: print(line, file=sys.stderr))
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
