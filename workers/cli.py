"""The ``breastai`` command: the composition root of the service.

It is the one place that sees every package (service for the DICOM edge
and queues, workers for processing, models for inference), which is why it
lives here rather than in ``service``: keeping ``service`` free of
``workers`` and ``models`` imports is the layering rule. For the service
commands ``main`` only builds settings and objects, wires them, and runs
until a signal; ``evaluate`` and ``train`` hand over to ``models``.

Sub-commands
------------
serve     listener + embedded queue + worker in one process (one box)
listen    listener only; jobs go to RabbitMQ (``--queue rabbitmq``)
work      worker only; consumes jobs from RabbitMQ
analyze   run the pipeline on DICOM files or folders, no network
evaluate  score the exported models on a labelled image folder (reports, cards)
train     train or refit a model family, the consensus or the lexicon model
          (families need the train extra; consensus and lexicon do not)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from models.errors import ModelsError
from models.evaluation.arguments import add_evaluate_arguments
from service import metrics
from service.errors import BreastAIError, ConfigurationError
from service.health import Health, start_http_endpoints
from service.logging import configure_logging, silence_value_quoting_warnings
from service.settings import Settings, add_settings_arguments, settings_from_args
from workers.heap import return_large_buffers_to_the_os

if TYPE_CHECKING:
    from models.inference.backends import InferenceRuntime
    from models.inference.mammography_pipeline import MammographyPipeline
    from models.inference.pipeline import BModePipeline
    from models.inference.three_plane import ThreePlaneScorer
    from service.dispatcher import Dispatcher
    from service.queue import JobQueue
    from service.spool import Spool
    from workers.consumer import JobHandler
    from workers.sr_writer import ReportContext

log = structlog.get_logger("breastai")


def _stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so every loop can finish its current step and exit."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def _report_context(settings: Settings) -> ReportContext:
    from workers.sr_writer import ReportContext
    from workers.uids import derive_uid

    return ReportContext(device_observer_uid=derive_uid("breastai-device", settings.ae_title))


def _runtime(settings: Settings) -> InferenceRuntime:
    """The inference backend the settings ask for, on this machine; one that cannot run here stops the start-up.

    ``auto`` says what it chose and why (``inference_backend_chosen``): which
    of TensorRT, ONNX Runtime's CUDA provider and the CPU, and what the
    others lacked. No patient data is involved.
    """
    from models.errors import BackendUnavailable
    from models.inference.backends import InferenceRuntime, choose_backend, probe_availability

    try:
        choice = choose_backend(settings.inference_backend, probe_availability())
    except BackendUnavailable as exc:
        raise ConfigurationError(str(exc)) from exc
    log.info(
        "inference_backend_chosen",
        requested=settings.inference_backend,
        backend=choice.kind,
        reason=choice.reason,
        max_batch=settings.inference_max_batch,
        worker_concurrency=settings.worker_concurrency,
        image_concurrency=settings.image_concurrency,
    )
    if settings.inference_max_batch > 1 and settings.worker_concurrency == settings.image_concurrency == 1:
        # One image at a time calls each model from one thread: nothing to batch with, only the wait is added.
        log.warning(
            "batching_without_concurrency",
            max_batch=settings.inference_max_batch,
            worker_concurrency=1,
            image_concurrency=1,
        )
    return InferenceRuntime.from_choice(
        choice, settings.engine_cache_dir, settings.inference_max_batch, settings.inference_max_wait_ms
    )


def _pipeline(
    model_dir: Path | None, families: tuple[str, ...], runtime: InferenceRuntime | None = None
) -> BModePipeline:
    """The B-mode pipeline; a model folder that does not match the configuration stops the start-up."""
    from models.inference.backends import CPU_RUNTIME
    from models.inference.pipeline import load_bmode_pipeline
    from models.inference.registry import ModelRegistryError

    try:
        return load_bmode_pipeline(model_dir, runtime or CPU_RUNTIME, families=families)
    except ModelRegistryError as exc:
        raise ConfigurationError(str(exc)) from exc


def _mammography(model_dir: Path | None, runtime: InferenceRuntime | None = None) -> MammographyPipeline | None:
    """The mammography pipeline where the model folder has a finder and MG families; a broken one stops the start."""
    from models.inference.backends import CPU_RUNTIME
    from models.inference.mammography_pipeline import load_mammography_pipeline
    from models.inference.registry import ModelRegistryError

    try:
        return load_mammography_pipeline(model_dir, runtime or CPU_RUNTIME)
    except ModelRegistryError as exc:
        raise ConfigurationError(str(exc)) from exc


def _three_plane(model_dir: Path | None, runtime: InferenceRuntime | None = None) -> ThreePlaneScorer | None:
    """The ABVS three-plane family where the model folder has it; a broken entry stops the start."""
    from models.inference.backends import CPU_RUNTIME
    from models.inference.registry import ModelRegistryError
    from models.inference.three_plane import load_three_plane_scorer

    try:
        return load_three_plane_scorer(model_dir, runtime or CPU_RUNTIME)
    except ModelRegistryError as exc:
        raise ConfigurationError(str(exc)) from exc


def _job_handler(settings: Settings) -> JobHandler:
    from service.tls import client_context
    from workers.consumer import JobHandler
    from workers.sender import ResultSender

    runtime = _runtime(settings)
    pipeline = _pipeline(settings.model_dir, settings.us_families, runtime)
    mammography = _mammography(settings.model_dir, runtime)
    three_plane = _three_plane(settings.model_dir, runtime)
    served = (*pipeline.model_infos, *(mammography.model_infos if mammography is not None else ()))
    for model in (*served, *((three_plane.model_info,) if three_plane is not None else ())):
        metrics.MODEL_INFO.labels(name=model.name, version=model.version).set(1)
    for placement in runtime.placements().values():
        metrics.INFERENCE_BACKEND_INFO.labels(model=placement.model, backend=placement.backend).set(1)
        # A model TensorRT could not take, or one that cannot batch, is worth a look: a warning, not a silent change.
        unexpected = placement.backend != runtime.backend or placement.batching.startswith("off:")
        (log.warning if unexpected else log.info)(
            "inference_backend_model",
            model=placement.model,
            backend=placement.backend,
            reason=placement.reason,
            batching=placement.batching,
        )
    tls = (
        client_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
        if settings.tls_destinations
        else None
    )
    sender = ResultSender(
        settings.destinations, settings.ae_title, settings.send_retries, settings.send_backoff_s, tls=tls
    )
    return JobHandler(
        settings.spool_dir,
        pipeline,
        sender,
        _report_context(settings),
        settings.image_limits,
        mammography,
        three_plane,
        image_concurrency=settings.image_concurrency,
    )


def _watch_listener(health: Health, dispatcher: Dispatcher) -> None:
    """The listener side's checks and gauges: its dispatcher thread, the broker, studies waiting."""
    health.add("live", "dispatcher", lambda: None if dispatcher.running else "dispatcher thread stopped")
    health.add("ready", "queue", lambda: None if dispatcher.broker_available else "job queue unreachable")
    metrics.JOBS_WAITING_PUBLISH.set_function(lambda: len(dispatcher.pending_publish()))
    metrics.OLDEST_RECEIVING_STUDY_SECONDS.set_function(dispatcher.oldest_receiving_age)


def _consumers(settings: Settings, spool: Spool, queue: JobQueue) -> list[JobQueue]:
    """``worker_concurrency`` consumers: the embedded queue shared, or a RabbitMQ consumer (a connection) each."""
    if settings.queue != "rabbitmq":
        return [queue] * settings.worker_concurrency
    from service.queue.rabbitmq import RabbitMQJobQueue

    extra = [
        RabbitMQJobQueue(settings, spool, connection_name=f"breastai-{number}")
        for number in range(2, settings.worker_concurrency + 1)
    ]
    return [queue, *extra]


def _run(settings: Settings, with_listener: bool, with_worker: bool) -> int:
    from service.dispatcher import Dispatcher
    from service.listener import StudyListener
    from service.queue import consume_concurrently, open_queue
    from service.receivers import ReceiverPool, receiver_processes, usable_cpus
    from service.spool import Spool

    stop = _stop_event()
    if with_worker:
        return_large_buffers_to_the_os()  # before the models load: they and every image's arrays are allocated after
    health = Health()
    health.add("ready", "models", lambda: "loading" if with_worker else None)
    http_server = start_http_endpoints(settings.metrics_port, settings.metrics_address, health)
    spool = Spool.from_settings(settings)
    health.add("ready", "spool", lambda: "spool disk below its reserve" if spool.below_reserve() else None)
    metrics.SPOOL_FREE_BYTES.set_function(spool.free_bytes)
    metrics.DEAD_LETTERED_JOBS.set_function(spool.dead_letter_count)
    queue = open_queue(settings, spool)
    # Load models before accepting studies: a missing or corrupt model must stop start-up, not fail jobs.
    handler = _job_handler(settings) if with_worker else None
    if handler is not None:
        health.add("ready", "models", lambda: None)
    consumers = _consumers(settings, spool, queue) if handler is not None else []
    dispatcher = None
    listener: StudyListener | ReceiverPool | None = None
    if with_listener:
        dispatcher = Dispatcher(settings, spool, queue)
        dispatcher.recover()
        dispatcher.start()
        expected = receiver_processes(settings.listener_processes, with_worker, usable_cpus())
        if expected > 1:
            listener = ReceiverPool(settings, expected, dispatcher)  # service.receivers: processes on one port
            pool = listener
            health.add(
                "ready",
                "receivers",
                lambda: None if pool.alive() == expected else f"{pool.alive()} of {expected} receiver processes up",
            )
        else:
            listener = StudyListener(settings, spool, dispatcher)
        listener.start()
        _watch_listener(health, dispatcher)
        log.info("listening", ae_title=settings.ae_title, port=settings.port, queue=settings.queue)
    try:
        if handler is not None:
            consume_concurrently(consumers, handler, stop)
        else:
            stop.wait()
    finally:
        if listener is not None:
            listener.stop()
        if dispatcher is not None:
            dispatcher.stop()
        for consumer in {id(c): c for c in consumers if c is not queue}.values():
            consumer.close()
        queue.close()
        if http_server is not None:
            http_server.shutdown()
            http_server.server_close()
        log.info("stopped")
    return 0


def _jobs(args: argparse.Namespace, settings: Settings) -> int:
    """``breastai jobs``: the operator's view of dead-lettered jobs (service.spool.Spool.dead_jobs)."""
    from datetime import UTC, datetime

    from service.spool import Spool

    spool = Spool.from_settings(settings)
    dead = {job.job_id: job for job in spool.dead_jobs()}
    if args.action == "list":
        print(f"{len(dead)} dead-lettered job(s) in {spool.dead_dir}")
        for job in dead.values():
            since = datetime.fromtimestamp(job.dead_since, UTC).strftime("%Y-%m-%d %H:%M")
            first = job.reasons.splitlines()[0] if job.reasons else "no reason recorded"
            print(f"{job.job_id}  {since}Z  {job.instances} instance(s)  {first}")
        return 0
    if args.action == "purge" and args.all:
        chosen = list(dead)
    else:
        chosen = list(args.job_ids)
        if not chosen:
            raise ConfigurationError(f"'breastai jobs {args.action}' needs job ids (see 'breastai jobs list')")
        unknown = [job_id for job_id in chosen if job_id not in dead]
        if unknown:
            raise ConfigurationError(f"not dead-lettered: {', '.join(unknown)} (see 'breastai jobs list')")
    if args.action == "show":
        for job_id in chosen:
            job = dead[job_id]
            print(f"job {job.job_id}\nstudy {job.study_uid or 'unknown'}\ninstances {job.instances}\nreasons:")
            print("\n".join(f"  {line}" for line in job.reasons.splitlines()) or "  none recorded")
        return 0
    for job_id in chosen:
        if args.action == "retry":
            spool.retry_dead(job_id)
            print(f"re-driven {job_id}")
        else:
            spool.purge_dead(job_id)
            print(f"purged {job_id}")
    if settings.queue == "rabbitmq" and chosen:
        from service.queue.rabbitmq import RabbitMQJobQueue

        broker = RabbitMQJobQueue(settings, spool)
        try:
            dropped = broker.drop_dead_letters(set(chosen))
        finally:
            broker.close()
        print(f"removed {dropped} message(s) from {broker.dead_queue}")
    return 0


def _dicom_files(inputs: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigurationError(f"no such file or folder: {item}")
    return files


def _image_concurrency(text: str) -> int:
    """``--image-concurrency`` of ``analyze``: the range the ``image_concurrency`` setting takes."""
    try:
        Settings(image_concurrency=int(text))
    except (ValueError, ConfigurationError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return int(text)


def _analyze(args: argparse.Namespace) -> int:
    from workers.consumer import process_study, read_header
    from workers.sender import write_to_folder
    from workers.sr_writer import ReportContext
    from workers.uids import derive_uid

    silence_value_quoting_warnings()
    return_large_buffers_to_the_os()
    pipeline = _pipeline(
        Path(args.model_dir) if args.model_dir else None, tuple(f for f in args.families.split(",") if f)
    )
    mammography = _mammography(Path(args.model_dir) if args.model_dir else None)
    three_plane = _three_plane(Path(args.model_dir) if args.model_dir else None)
    context = ReportContext(device_observer_uid=derive_uid("breastai-device", "analyze"))
    by_study: dict[str, list[Path]] = defaultdict(list)
    failures = 0
    for path in _dicom_files(args.paths):
        try:
            by_study[str(read_header(path).StudyInstanceUID)].append(path)
        except BreastAIError as exc:
            failures += 1
            print(f"skipped {path}: {exc}", file=sys.stderr)
    out = Path(args.out)
    for study_uid, paths in sorted(by_study.items()):
        try:
            results = process_study(
                paths,
                pipeline,
                context,
                mammography=mammography,
                three_plane=three_plane,
                image_concurrency=args.image_concurrency,
            )
        except BreastAIError as exc:
            failures += 1
            print(f"study {study_uid}: {exc}", file=sys.stderr)
            continue
        for sop_instance_uid, reason in results.skipped:
            print(f"not analysed {sop_instance_uid}: {reason}", file=sys.stderr)
        for written in write_to_folder(results.datasets, out):
            print(written)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    """The ``breastai`` argument parser (sub-commands share the settings flags)."""
    parser = argparse.ArgumentParser(
        prog="breastai", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "listener, embedded queue and worker in one process"),
        ("listen", "DICOM listener only; jobs go to the configured queue (RabbitMQ)"),
        ("work", "worker only; consumes jobs from the configured queue (RabbitMQ)"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        add_settings_arguments(sub)
    jobs = commands.add_parser(
        "jobs",
        help="list, show, re-drive or purge dead-lettered jobs",
        description=(
            "Dead-lettered jobs wait in the spool's dead/ folder (and, with RabbitMQ, in <queue>.dead) for an "
            "operator. 'retry' moves them back as never delivered: the running listener publishes them again within "
            "30 s, or the next start does. Results carry the same UIDs as before, so nothing is reported twice."
        ),
    )
    jobs.add_argument("action", choices=("list", "show", "retry", "purge"))
    jobs.add_argument("job_ids", nargs="*", metavar="JOB", help="job ids (see 'list'); 'purge --all' for every one")
    jobs.add_argument("--all", action="store_true", help="purge: every dead-lettered job")
    add_settings_arguments(jobs)
    analyze = commands.add_parser(
        "analyze",
        help="run the pipeline on DICOM files or folders, no network",
        description=(
            "Run the analysis on DICOM files or folders without any network and write the SR and overlays to --out."
        ),
    )
    analyze.add_argument("paths", nargs="+", help="DICOM files or folders (searched recursively)")
    analyze.add_argument("--out", required=True, help="folder for the results (<study>/<series>/<sop>.dcm)")
    analyze.add_argument(
        "--model-dir", default=None, help="model folder with manifest.json (default: bundled reference models)"
    )
    analyze.add_argument(
        "--families",
        default="",
        help="comma-separated model families to run on each lesion (default: the model folder's list)",
    )
    analyze.add_argument(
        "--image-concurrency",
        type=_image_concurrency,
        default=Settings.image_concurrency,
        metavar="IMAGES",
        help=f"images of one study analysed at once, on a thread each (default {Settings.image_concurrency})",
    )
    evaluate = commands.add_parser(
        "evaluate",
        help="score the models on a labelled image folder; reports with CIs, ROC and calibration PNGs",
        description=(
            "Score exported models, as served, on a folder laid out like shared/datasets (images/, masks/, labels.csv)."
        ),
    )
    add_evaluate_arguments(evaluate)
    train = commands.add_parser(
        "train",
        help="train one model family (needs the train extra: make train-venv)",
        description=(
            "Train one model family; arguments after FAMILY go to python -m models.training.train_family "
            "(see --help there)."
        ),
    )
    train.add_argument(
        "family",
        help=(
            "dlr_lh, dlr_bm, cldlr, dl_u, dl_m, mupnet (the ABVS three-plane family has no public training data: "
            "models/cards/abvs_three_plane.md); dl_u_lh (opt-in: DL-U's network on DLR_LH's labels, two seeds); "
            "consensus (fits the consensus of the exported families, then refits any other the folder has; "
            "'--task birads_high' fits the LH consensus of dlr_lh and dl_u_lh that the 4A co-decision then "
            "reads), lexicon (fits the lexicon-descriptor model on the folder's outlines); those two need no "
            "torch; pretrain (mask pretraining of a family's network on the lesion outlines: 'train pretrain "
            "dlr_bm', then 'train dlr_bm --init runs/pretrain-masks/dlr_bm/best.pt'); external (external "
            "validation: 'train external --holdout busbra' trains the consensus members without busbra, fits "
            "their consensus and scores all of busbra); crossval (K-fold out-of-fold AUC of dl_m or dl_u over the"
            " training and validation lesions: 'train crossval dl_m --report FILE')"
        ),
    )
    train.add_argument("options", nargs=argparse.REMAINDER, help="e.g. --datasets ../shared/datasets --stage all")
    return parser


def _train(args: argparse.Namespace) -> int:
    if args.family == "consensus":
        from models.training import fit_consensus

        fit_consensus.main(args.options)
        return 0
    if args.family == "lexicon":
        from models.training import fit_lexicon

        fit_lexicon.main(args.options)
        return 0
    try:
        from models.training import mask_pretraining, train_family
    except ImportError as exc:  # the serving install has no torch
        raise ConfigurationError(f"training needs the train extra (make train-venv): {exc}") from exc
    if args.family == "pretrain":
        mask_pretraining.main(args.options)
    elif args.family == "external":
        from models.training import external

        external.main(args.options)
    elif args.family == "crossval":
        from models.training import cross_validate

        cross_validate.main(args.options)
    else:
        train_family.main([args.family, *args.options])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``breastai`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "evaluate":
            from models.evaluation.command import run_evaluate  # the scoring code loads only for this command

            return run_evaluate(args)
        if args.command == "train":
            return _train(args)
        settings = settings_from_args(args, os.environ)
        if args.command == "jobs":
            return _jobs(args, settings)
        configure_logging(settings)
        if args.command == "serve":
            return _run(settings, with_listener=True, with_worker=True)
        if settings.queue != "rabbitmq":
            raise ConfigurationError(
                f"'breastai {args.command}' splits the service over a broker: use --queue rabbitmq "
                "(or BREASTAI_QUEUE=rabbitmq)"
            )
        return _run(settings, with_listener=args.command == "listen", with_worker=args.command == "work")
    except (BreastAIError, ModelsError) as exc:
        # What models/ refuses (an incomplete manifest, an unknown model to evaluate) is a bad setting like any other.
        print(f"breastai: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
