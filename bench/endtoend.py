"""End to end: studies pushed from a real Orthanc to ``breastai serve``, timed until their results are back in Orthanc.

The setup is the end-to-end tests' own (``tests/e2e/results.py``'s ``start_pacs_and_service``): a private Orthanc
(``tests/integration/orthanc.py``) that knows BREASTAI as a modality, and ``breastai serve`` (listener and worker in
one process, its default embedded queue, one worker) that sends its results to that Orthanc, with the harness's
quiet period (1 s). No RabbitMQ is involved.

The studies are uploaded to Orthanc first (not timed). Then, for each study, Orthanc is asked to C-STORE it to
BREASTAI (``POST /modalities/BREASTAI/store`` with ``Synchronous``: the call returns once Orthanc's store job is
done, its association released; the harness sets ``DicomAssociationCloseDelay`` 0 so that the release is not held
back). A study's clock starts when its store call returns and stops when Orthanc holds its report: the worker sends
overlays and segmentations first and the SR last, over one association, only after the others were accepted
(``workers.consumer.StudyResults.datasets``), so the SR's arrival is the arrival of all of the study's results.
That arrival is read from Orthanc's change log (``GET /changes``, a ``NewSeries`` whose Modality is SR), polled every
``poll_s``; the change log's own dates have a resolution of one second, so the time is the poll's (within
``poll_s`` plus one REST round trip after the fact).

Latency therefore includes the quiet period the listener waits after the release before it seals the study
(``--quiet-period``), queueing behind earlier studies, the analysis, and sending the results. The quiet period is
reported apart, and the latencies are given with and without it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from bench.report import format_table
from service.settings import ENV_PREFIX, Settings
from tests import dicom_factory
from tests.e2e.conftest import ServiceProcess
from tests.e2e.results import SC_CLASS, SEG_CLASS, SR_CLASS, start_pacs_and_service
from tests.faults.traffic import Study, copies_of
from tests.integration.orthanc import OrthancServer, free_tcp_ports

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
MODALITY = "BREASTAI"
QUIET_PERIOD_S = 1.0  # start_pacs_and_service's default, as the end-to-end tests run
POLL_S = 0.1
RESULT_TIMEOUT_S = 600.0
STORE_TIMEOUT_S = 120.0


class EndToEndFailure(RuntimeError):
    """A study's results did not reach Orthanc in time, or a store from Orthanc failed."""


@dataclass(frozen=True)
class StudyKind:
    """One kind of study in the mix: its modality and how many images it holds."""

    name: str
    label: str
    modality: str
    images: int


KINDS: dict[str, StudyKind] = {
    "us1": StudyKind("us1", "US, 1 image", "US", 1),
    "us4": StudyKind("us4", "US, 4 images", "US", 4),
    "us10": StudyKind("us10", "US, 10 images", "US", 10),
    "mg2": StudyKind("mg2", "MG, 2 views", "MG", 2),
}
# The default six: 2 one-image, 2 four-image and 1 ten-image US studies and one two-view mammogram, interleaved so
# that each kind meets a queue of others.
MIX = ("us1", "us4", "us10", "mg2", "us1", "us4")


def study_mix(studies: int) -> list[str]:
    """The kinds of ``studies`` studies, in sending order: :data:`MIX` repeated and cut."""
    return list(itertools.islice(itertools.cycle(MIX), max(0, studies)))


# ----------------------------------------------------------------------------------------- figures (pure)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks (numpy's default, "linear").

    None for no values. With few values p95 lies between the two largest: read it with the count beside it.
    """
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def studies_per_hour(timings: Sequence[Mapping[str, Any]]) -> float | None:
    """Studies whose results came back, over the span from the first store's start to the last result, per hour.

    ``timings`` are :func:`run_endtoend`'s per-study dicts (``store_started_s``, ``result_s``: seconds on one
    clock); studies without a result count in neither the numerator nor the span's end.
    """
    done = [t for t in timings if t.get("result_s") is not None]
    if not done:
        return None
    span = max(float(t["result_s"]) for t in done) - min(float(t["store_started_s"]) for t in timings)
    return len(done) * 3600.0 / span if span > 0 else None


def summarize(timings: Sequence[Mapping[str, Any]], quiet_period_s: float) -> list[dict[str, Any]]:
    """One row per study kind (in :data:`KINDS` order), then ``all``: count, store time, latency p50 / p95 / max.

    ``latency_s`` of a timing is from its store call's return to its report in Orthanc; the ``after_quiet`` figures
    subtract the service's quiet period, which every latency contains once.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for timing in timings:
        groups.setdefault(str(timing["kind"]), []).append(timing)
    order = [k for k in KINDS if k in groups] + sorted(k for k in groups if k not in KINDS)
    rows = [_row(kind, groups[kind], quiet_period_s) for kind in order]
    if timings:
        rows.append(_row("all", timings, quiet_period_s))
    return rows


def _row(kind: str, timings: Sequence[Mapping[str, Any]], quiet_period_s: float) -> dict[str, Any]:
    latencies = [float(t["latency_s"]) for t in timings if t.get("latency_s") is not None]
    stores = [float(t["store_s"]) for t in timings]

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    row: dict[str, Any] = {
        "kind": kind,
        "label": KINDS[kind].label if kind in KINDS else kind,
        "studies": len(timings),
        "with_results": len(latencies),
        "images": sum(int(t["images"]) for t in timings),
        "store_p50_s": rounded(percentile(stores, 50)),
    }
    for name, q in (("p50", 50.0), ("p95", 95.0), ("max", 100.0)):
        value = percentile(latencies, q)
        row[f"latency_{name}_s"] = rounded(value)
        row[f"after_quiet_{name}_s"] = rounded(None if value is None else value - quiet_period_s)
    return row


def endtoend_table(endtoend: Mapping[str, Any]) -> str:
    """The printed table: per kind and overall, seconds."""
    headers = [
        "studies",
        "n",
        "images",
        "store s p50",
        "latency s p50",
        "p95",
        "max",
        "minus quiet p50",
        "p95",
        "max",
    ]
    rows = [
        [
            r["label"] if r["kind"] != "all" else "all",
            r["studies"] if r["with_results"] == r["studies"] else f"{r['with_results']} of {r['studies']}",
            r["images"],
            _seconds(r["store_p50_s"]),
            _seconds(r["latency_p50_s"]),
            _seconds(r["latency_p95_s"]),
            _seconds(r["latency_max_s"]),
            _seconds(r["after_quiet_p50_s"]),
            _seconds(r["after_quiet_p95_s"]),
            _seconds(r["after_quiet_max_s"]),
        ]
        for r in endtoend["summary"]
    ]
    return format_table(headers, rows)


def endtoend_lines(endtoend: Mapping[str, Any]) -> list[str]:
    """The heading, the table and the sustained rate, as :func:`bench.run.tables` prints them."""
    rate = endtoend.get("studies_per_hour")
    return [
        f"End to end ({endtoend['setup']}; {endtoend['sending']}; latency: store call returned -> the study's SR in "
        f"Orthanc, polled every {endtoend['poll_s']} s; every latency includes the quiet period of "
        f"{endtoend['quiet_period_s']} s, subtracted in 'minus quiet'):",
        "",
        endtoend_table(endtoend),
        f"sustained: {'n/a' if rate is None else f'{rate:.0f}'} studies/hour ({endtoend['studies']} studies, "
        f"{endtoend['images']} images, {endtoend['span_s']} s from the first store to the last result)",
    ]


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# ----------------------------------------------------------------------------------------- studies


def us_sources() -> list[Path]:
    """The sample US images (``samples/``): real B-mode images, so the worker finds and scores lesions."""
    sources = sorted(SAMPLES.glob("study*/*.dcm"))
    if not sources:
        raise EndToEndFailure(f"no sample DICOM files under {SAMPLES} (make samples)")
    return sources


def make_studies(kinds: Sequence[str], folder: Path) -> list[tuple[str, Study]]:
    """Fresh studies (new UIDs, a patient each: ``copies_of``), one per entry of ``kinds``, in that order.

    US studies hold copies of the sample images, cycled to the kind's count; the mammograms are two views of one
    breast written as a vendor writes them (``tests/e2e/test_mammography.py``'s ``vendor_mammogram``: 3000 x 2400,
    12 bits, MONOCHROME1, JPEG Lossless).
    """
    samples = us_sources()
    made: dict[str, Iterator[Study]] = {}
    for kind in dict.fromkeys(kinds):
        spec = KINDS[kind]
        if spec.modality == "MG":
            from tests.e2e.test_mammography import vendor_mammogram  # pytest and cv2: only when a mammogram is sent

            folder.mkdir(parents=True, exist_ok=True)
            uid = generate_uid()
            sources = [
                vendor_mammogram(folder / f"mg-{view}.dcm", study_uid=uid, laterality="L", view=view)
                for view in ("CC", "MLO")
            ][: spec.images]
        else:
            sources = list(itertools.islice(itertools.cycle(samples), spec.images))
        made[kind] = iter(copies_of(sources, kinds.count(kind), prefix=f"E2E{kind.upper()}"))
    return [(kind, next(made[kind])) for kind in kinds]


# ----------------------------------------------------------------------------------------- watching Orthanc


class ReportWatcher:
    """Polls Orthanc's change log for new SR series and notes when each watched study's report arrived.

    One ``GET /changes?since=`` per poll whatever the number of studies, plus one ``GET /series/{id}`` per new
    series (Orthanc REST API: the change log lists ``NewSeries`` with the series' Orthanc id).
    """

    def __init__(
        self, pacs: OrthancServer, studies: Mapping[str, str], clock: Callable[[], float], poll_s: float
    ) -> None:
        self._pacs = pacs
        self._studies = dict(studies)  # Orthanc study id -> StudyInstanceUID
        self._clock = clock
        self._poll_s = poll_s
        self.seen: dict[str, float] = {}  # StudyInstanceUID -> clock time the SR was first seen
        self._since = int(pacs.get("/changes?last")["Last"])
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="report-watcher", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> ReportWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def done(self) -> bool:
        with self._lock:
            return len(self.seen) == len(self._studies)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._poll()
                self._stop.wait(self._poll_s)
        except BaseException as exc:  # reported by the caller, which would otherwise wait for a timeout
            self.error = exc

    def _poll(self) -> None:
        while True:
            answer = self._pacs.get(f"/changes?since={self._since}&limit=1000")
            now = self._clock()
            for change in answer["Changes"]:
                if change["ChangeType"] != "NewSeries":
                    continue
                series = self._pacs.get(f"/series/{change['ID']}")
                study = self._studies.get(str(series.get("ParentStudy")))
                if study is not None and series.get("MainDicomTags", {}).get("Modality") == "SR":
                    with self._lock:
                        self.seen.setdefault(study, now)
            self._since = int(answer["Last"])
            if answer.get("Done", True):
                return


# ----------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class EndToEndOptions:
    studies: int = len(MIX)
    parallel: int = 1  # store calls at once
    interval_s: float = 0.0  # the i-th store starts no earlier than i * interval_s after the first: 0 is a burst
    quiet_period_s: float = QUIET_PERIOD_S
    poll_s: float = POLL_S
    workdir: Path | None = None
    keep: bool = False


@contextlib.contextmanager
def _running(folder: Path) -> Iterator[tuple[list[OrthancServer], list[ServiceProcess]]]:
    """What ``orthanc_factory`` and ``service_factory`` started, stopped on the way out."""
    servers: list[OrthancServer] = []
    services: list[ServiceProcess] = []
    try:
        yield servers, services
    finally:
        for service in services:
            service.kill()
        for server in servers:
            server.stop()


def run_endtoend(options: EndToEndOptions, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Push the mix from Orthanc to ``breastai serve`` and time each study until its report is back in Orthanc.

    Raises
    ------
    EndToEndFailure
        A store call failed, or a study's report did not reach Orthanc within :data:`RESULT_TIMEOUT_S`.
    """
    kinds = study_mix(options.studies)
    base = options.workdir
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="breastai-bench-e2e-", dir=base))
    previous = tempfile.tempdir
    tempfile.tempdir = str(folder)  # the Orthanc harness makes its storage with mkdtemp: on the same file system
    try:
        with _running(folder) as (servers, services):
            return _run(options, kinds, folder, servers, services, progress)
    finally:
        tempfile.tempdir = previous
        if not options.keep:
            shutil.rmtree(folder, ignore_errors=True)


def _run(
    options: EndToEndOptions,
    kinds: Sequence[str],
    folder: Path,
    servers: list[OrthancServer],
    services: list[ServiceProcess],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    def orthanc_factory(modalities: Mapping[str, Any] | None = None, **kwargs: Any) -> OrthancServer:
        server = OrthancServer(modalities, **kwargs)
        servers.append(server)
        return server.start()

    def service_factory(command: str, args: list[str], env: dict[str, str] | None = None) -> ServiceProcess:
        service = ServiceProcess(command, args, folder / f"{command}-{len(services)}.log", env).start()
        services.append(service)
        return service

    progress(f"endtoend: writing {len(kinds)} studies ({', '.join(kinds)})")
    studies = make_studies(kinds, folder / "templates")
    progress("endtoend: starting Orthanc and breastai serve (models loading)")
    started = time.perf_counter()
    pacs, service, _port, _metrics = start_pacs_and_service(
        orthanc_factory, service_factory, free_tcp_ports, folder, quiet_period=options.quiet_period_s
    )
    startup_s = time.perf_counter() - started
    progress(f"endtoend: up in {startup_s:.1f} s; uploading to Orthanc (not timed)")
    orthanc_ids: dict[str, str] = {}
    for _kind, study in studies:
        for ds in study.instances:
            pacs.upload_bytes(dicom_factory.encode(ds))
        orthanc_id = pacs.study_id(study.study_uid)
        if orthanc_id is None:
            raise EndToEndFailure(f"Orthanc does not list the uploaded study {study.study_uid}")
        orthanc_ids[study.study_uid] = orthanc_id

    clock = time.perf_counter
    watcher = ReportWatcher(pacs, {v: k for k, v in orthanc_ids.items()}, clock, options.poll_s).start()
    stores: dict[str, tuple[float, float]] = {}
    origin = clock()

    def store(index: int, study: Study) -> None:
        time.sleep(max(0.0, origin + index * options.interval_s - clock()))
        begun = clock()
        pacs.send_to_modality(MODALITY, [orthanc_ids[study.study_uid]], timeout=STORE_TIMEOUT_S)
        stores[study.study_uid] = (begun, clock())

    progress(f"endtoend: storing {len(studies)} studies from Orthanc to {MODALITY}, {options.parallel} at a time")
    try:
        with ThreadPoolExecutor(max_workers=max(1, options.parallel)) as pool:
            for future in [pool.submit(store, i, study) for i, (_kind, study) in enumerate(studies)]:
                future.result()  # a failed store (OrthancError) stops the bench here
        deadline = clock() + RESULT_TIMEOUT_S
        while not watcher.done() and clock() < deadline and watcher.error is None:
            time.sleep(options.poll_s)
    finally:
        watcher.stop()
    if watcher.error is not None:
        raise EndToEndFailure(f"reading Orthanc's change log failed: {watcher.error!r}")
    missing = [uid for _kind, study in studies if (uid := study.study_uid) not in watcher.seen]
    if missing:
        raise EndToEndFailure(
            f"{len(missing)} of {len(studies)} studies had no report in Orthanc after {RESULT_TIMEOUT_S:.0f} s; "
            f"service log tail:\n{service.log()[-3000:]}"
        )

    timings: list[dict[str, Any]] = []
    for kind, study in studies:
        begun, returned = stores[study.study_uid]
        result = watcher.seen[study.study_uid]
        timings.append(
            {
                "kind": kind,
                "study_uid": study.study_uid,
                "images": len(study.instances),
                "store_started_s": round(begun - origin, 3),
                "store_returned_s": round(returned - origin, 3),
                "store_s": round(returned - begun, 3),
                "result_s": round(result - origin, 3),
                "latency_s": round(result - returned, 3),
                "results": _result_counts(pacs, study.study_uid),
            }
        )
        progress(f"  {kind:<5} store {returned - begun:5.2f} s  latency {result - returned:6.2f} s")
    rate = studies_per_hour(timings)
    span = max(t["result_s"] for t in timings) - min(t["store_started_s"] for t in timings)
    # What the service was told beyond its defaults: it inherits this process's environment.
    environment = {name: value for name, value in sorted(os.environ.items()) if name.startswith(ENV_PREFIX)}
    image_concurrency = int(environment.get(f"{ENV_PREFIX}IMAGE_CONCURRENCY", Settings.image_concurrency))
    return {
        "setup": "a private Orthanc (tests/integration/orthanc.py) and breastai serve, default embedded queue, "
        f"1 worker, image_concurrency {image_concurrency} (tests/e2e/results.py start_pacs_and_service)",
        "service_environment": environment,
        "image_concurrency": image_concurrency,
        "sending": f"Orthanc REST /modalities/{MODALITY}/store, synchronous, one study per call, "
        f"{options.parallel} call(s) at a time"
        + (f", one every {options.interval_s} s at most" if options.interval_s > 0 else ", all at once"),
        "interval_s": options.interval_s,
        "quiet_period_s": options.quiet_period_s,
        "poll_s": options.poll_s,
        "service_startup_s": round(startup_s, 2),
        "orthanc_version": pacs.system().get("Version"),
        "kinds": {k: {"label": KINDS[k].label, "images": KINDS[k].images, "studies": kinds.count(k)} for k in KINDS},
        "studies": len(timings),
        "images": sum(t["images"] for t in timings),
        "span_s": round(span, 2),
        "studies_per_hour": None if rate is None else round(rate, 1),
        "timings": timings,
        "summary": summarize(timings, options.quiet_period_s),
    }


def _result_counts(pacs: OrthancServer, study_uid: str) -> dict[str, int]:
    """How many SR, SC (overlays) and SEG objects Orthanc holds for the study (read after the timing)."""
    counts = {"SR": 0, "SC": 0, "SEG": 0}
    names = {SR_CLASS: "SR", SC_CLASS: "SC", SEG_CLASS: "SEG"}
    for instance in pacs.find("Instance", {"StudyInstanceUID": study_uid}, expand=False):
        name = names.get(str(pacs.get(f"/instances/{instance}/metadata/SopClassUid")))
        if name is not None:
            counts[name] += 1
    return counts
