"""RabbitMQ job queue (pika 1.4, AMQP 0-9-1).

Topology, declared idempotently by publisher and consumer::

    <queue_name>        durable quorum queue, x-delivery-limit = job_retry_limit,
                        dead-letters to <queue_name>.dlx
    <queue_name>.dlx    durable direct exchange
    <queue_name>.dead   durable quorum queue bound to the dlx with key <queue_name>

Publishing: persistent messages (delivery_mode 2), ``application/json``,
``message_id`` = job id, on a channel in publisher-confirm mode; a publish
returns only after the broker confirmed it (quorum queues confirm once a
majority of replicas wrote the message).

Consuming follows the pika 1.4 threaded-consumer example: ``basic_qos``
with prefetch 1, manual acks, the handler on a worker thread while the
connection thread keeps calling ``process_data_events`` (so heartbeats
flow during long inference), and ack/nack sent back through
``add_callback_threadsafe``. The consumer reconnects with capped backoff
when the connection is lost or force-closed by the broker (320
CONNECTION_FORCED), but not on channel errors or refused credentials,
which retrying cannot fix.

Failure handling (the handler decides with the exception tree):

- TransientError: nack + requeue after a capped exponential backoff; on
  the ``job_retry_limit``-th delivery (the quorum queue's
  ``x-delivery-count`` header) the message is dead-lettered instead;
- PermanentError or any other exception, or a body that is not a
  StudyJob: republished to the dead-letter exchange with
  ``x-breastai-reason`` / ``x-breastai-failure`` headers (confirmed), then
  acked;
- a consumer that dies mid-job returns the message; with a spool, each
  delivery is also counted in the job's folder before the handler runs,
  and a delivery past ``job_retry_limit`` is dead-lettered without running
  it (RabbitMQ 4.3 no longer counts such returns in ``x-delivery-count``);
  the quorum queue's ``x-delivery-limit`` is the last guard.

Spool ownership (when a spool was given): after the ack the job directory
is removed with ``spool.complete``; on dead-lettering it is moved to
``dead/``. The handler never deletes spool files, so a job redelivered
after a crash between results and ack still finds its instances (and
re-sends the same result UIDs). A crash between ack and removal leaves
an orphan directory behind, never a lost study.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions as pex
import structlog
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from service import metrics
from service.errors import ConfigurationError, JobSchemaError, QueueUnavailable, TransientError
from service.logging import bind_job
from service.queue import JobHandler, retry_backoff
from service.schema import SCHEMA_ID, SCHEMA_VERSION, StudyJob

if TYPE_CHECKING:
    from service.settings import Settings
    from service.spool import Spool

log = structlog.get_logger("service.queue.rabbitmq")

REASON_HEADER = "x-breastai-reason"
FAILURE_HEADER = "x-breastai-failure"
DELIVERIES_HEADER = "x-breastai-deliveries"
_CONNECTION_FORCED = 320
_MAX_REASON = 2000


@dataclass(frozen=True)
class _Outcome:
    action: str  # "ack" | "duplicate" (ack a copy of a job already completed) | "requeue" | "dead"
    reason: str = ""
    failure: str = ""


#: What RabbitMQ's 406 PRECONDITION_FAILED says when a delivery outlived ``consumer_timeout`` (not a queue mismatch).
_ACK_TIMEOUT_TEXT = "delivery acknowledgement"


class RabbitMQJobQueue:
    """:class:`~service.queue.JobQueue` on a RabbitMQ quorum queue.

    Parameters
    ----------
    settings
        ``amqp_url``, ``queue_name`` and ``job_retry_limit`` are read here.
    spool
        When given, each delivery is counted in the job's folder, a
        duplicate of a completed job is acknowledged without running, an
        acked job's folder is removed and a dead-lettered one's moved to
        ``dead/``.
    retry_backoff_s, retry_backoff_cap_s
        Capped exponential delay before a transiently failed job is requeued.
    reconnect_backoff_s, reconnect_backoff_cap_s
        Capped exponential delay between consumer reconnection attempts.
    stop_grace_s
        On stop, how long an in-flight handler may still finish and be acked
        before the connection closes (the broker then redelivers it).
    connection_name
        Shown in the management UI / ``rabbitmqctl list_connections``.
    """

    def __init__(
        self,
        settings: Settings,
        spool: Spool | None = None,
        *,
        retry_backoff_s: float = 1.0,
        retry_backoff_cap_s: float = 300.0,
        reconnect_backoff_s: float = 0.5,
        reconnect_backoff_cap_s: float = 30.0,
        stop_grace_s: float = 30.0,
        connection_name: str = "breastai",
    ) -> None:
        self.queue_name = settings.queue_name
        self.dead_exchange = f"{settings.queue_name}.dlx"
        self.dead_queue = f"{settings.queue_name}.dead"
        self._url = settings.amqp_url
        self._retry_limit = settings.job_retry_limit
        self._spool = spool
        self._retry_backoff_s = retry_backoff_s
        self._retry_backoff_cap_s = retry_backoff_cap_s
        self._reconnect_backoff_s = reconnect_backoff_s
        self._reconnect_backoff_cap_s = reconnect_backoff_cap_s
        self._stop_grace_s = stop_grace_s
        self._connection_name = connection_name
        self._pub_lock = threading.Lock()
        self._pub_conn: BlockingConnection | None = None
        self._pub_channel: BlockingChannel | None = None
        self._worker: threading.Thread | None = None
        self.connections_opened = 0  # consumer connections, for status and tests

    # --- connection helpers ---------------------------------------------------------

    def _parameters(self, role: str) -> pika.URLParameters:
        params = pika.URLParameters(self._url)
        params.client_properties = {"connection_name": f"{self._connection_name}-{role}"}
        params.connection_attempts = 1
        params.socket_timeout = 5.0
        params.blocked_connection_timeout = 30.0
        return params

    def declare(self, channel: BlockingChannel) -> None:
        """Declare the queue, its dead-letter exchange and dead queue (idempotent)."""
        channel.exchange_declare(self.dead_exchange, exchange_type="direct", durable=True)
        channel.queue_declare(self.dead_queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(self.dead_queue, self.dead_exchange, routing_key=self.queue_name)
        channel.queue_declare(
            self.queue_name,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": self._retry_limit,
                "x-dead-letter-exchange": self.dead_exchange,
                "x-dead-letter-routing-key": self.queue_name,
            },
        )

    # --- publishing -----------------------------------------------------------------

    def _publisher(self) -> BlockingChannel:
        if self._pub_channel is not None and self._pub_channel.is_open:
            return self._pub_channel
        self._reset_publisher()
        self._pub_conn = pika.BlockingConnection(self._parameters("publisher"))
        channel = self._pub_conn.channel()
        self.declare(channel)
        channel.confirm_delivery()
        self._pub_channel = channel
        return channel

    def _reset_publisher(self) -> None:
        conn, self._pub_conn, self._pub_channel = self._pub_conn, None, None
        if conn is not None and conn.is_open:
            with contextlib.suppress(pex.AMQPError):
                conn.close()

    def publish(self, job: StudyJob) -> None:
        """Publish ``job`` persistently; return once the broker confirmed it.

        A stale publisher connection (closed by the broker while idle) is
        replaced once within the call.

        Raises
        ------
        QueueUnavailable
            If the broker is unreachable, nacks the message, or cannot route it.
        """
        body = job.to_json().encode("utf-8")
        properties = BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=job.job_id,
            type=f"{SCHEMA_ID}.v{SCHEMA_VERSION}",
            timestamp=int(time.time()),
        )
        start = time.perf_counter()
        with self._pub_lock:
            for attempt in (1, 2):
                try:
                    self._publisher().basic_publish(
                        exchange="", routing_key=self.queue_name, body=body, properties=properties, mandatory=True
                    )
                    break
                except pex.UnroutableError as exc:
                    raise QueueUnavailable(f"broker could not route job {job.job_id} to {self.queue_name!r}") from exc
                except pex.NackError as exc:
                    raise QueueUnavailable(f"broker nacked job {job.job_id}") from exc
                except (pex.AMQPError, OSError) as exc:
                    self._reset_publisher()
                    if attempt == 2:
                        raise QueueUnavailable(f"cannot publish to RabbitMQ: {type(exc).__name__}: {exc}") from exc
        metrics.QUEUE_PUBLISH_SECONDS.observe(time.perf_counter() - start)

    # --- consuming ------------------------------------------------------------------

    def consume(self, handler: JobHandler, stop: threading.Event) -> None:
        """Consume jobs until ``stop`` is set, reconnecting on connection loss.

        Raises
        ------
        ConfigurationError
            Credentials or virtual host refused, or the queue exists with
            other arguments (retrying cannot help).
        QueueUnavailable
            The broker closed the channel (queue deleted...) or closed the
            connection for a reason other than a forced close.
        """
        delay = self._reconnect_backoff_s
        while not stop.is_set():
            try:
                self._consume_session(handler, stop)
                delay = self._reconnect_backoff_s
            except (pex.ProbableAuthenticationError, pex.ProbableAccessDeniedError, pex.AuthenticationError) as exc:
                raise ConfigurationError(f"RabbitMQ refused the connection: {type(exc).__name__}: {exc}") from exc
            except pex.ChannelClosedByBroker as exc:
                if exc.reply_code == 406 and _ACK_TIMEOUT_TEXT in str(exc.reply_text):
                    # A job held past the broker's consumer_timeout (30 min by default): the message goes back to the
                    # queue and is counted; this worker reconnects rather than exit (a crash loop across workers).
                    log.warning("ack_timeout_reconnecting", reason=str(exc.reply_text))
                elif exc.reply_code == 406:
                    raise ConfigurationError(
                        f"queue {self.queue_name!r} exists with other arguments: {exc.reply_text}"
                    ) from exc
                else:
                    raise QueueUnavailable(f"broker closed the channel: {exc.reply_code} {exc.reply_text}") from exc
            except pex.AMQPChannelError as exc:
                raise QueueUnavailable(f"consumer channel failed: {type(exc).__name__}: {exc}") from exc
            except pex.ConnectionClosedByBroker as exc:
                if exc.reply_code != _CONNECTION_FORCED:
                    raise QueueUnavailable(f"broker closed the connection: {exc.reply_code} {exc.reply_text}") from exc
                log.warning("connection_forced_reconnecting", retry_in_s=delay)
            except (pex.AMQPConnectionError, OSError) as exc:
                log.warning("connection_lost_reconnecting", error=type(exc).__name__, retry_in_s=delay)
            else:
                continue
            stop.wait(delay)
            delay = min(self._reconnect_backoff_cap_s, delay * 2)

    def _consume_session(self, handler: JobHandler, stop: threading.Event) -> None:
        # A handler still running from a lost connection must finish first:
        # the broker redelivers its message and two copies must not run at once.
        if self._worker is not None:
            while self._worker.is_alive() and not stop.is_set():
                self._worker.join(0.1)
        conn = pika.BlockingConnection(self._parameters("consumer"))
        self.connections_opened += 1
        try:
            channel = conn.channel()
            self.declare(channel)
            channel.confirm_delivery()  # so that dead-letter republishes are confirmed
            channel.basic_qos(prefetch_count=1)
            on_message = functools.partial(self._on_message, conn, handler, stop)
            channel.basic_consume(self.queue_name, on_message_callback=on_message, auto_ack=False)
            while not stop.is_set():
                conn.process_data_events(time_limit=0.2)
            channel.stop_consuming()
            deadline = time.monotonic() + self._stop_grace_s
            while self._worker is not None and self._worker.is_alive() and time.monotonic() < deadline:
                conn.process_data_events(time_limit=0.1)
            conn.process_data_events(time_limit=0)  # run a final ack callback, if any
        finally:
            if conn.is_open:
                with contextlib.suppress(pex.AMQPError):
                    conn.close()

    def _on_message(
        self,
        conn: BlockingConnection,
        handler: JobHandler,
        stop: threading.Event,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        # Runs on the connection thread: keep it short, never call the handler here.
        headers = properties.headers or {}
        deliveries = int(headers.get("x-delivery-count", 0)) + 1
        try:
            job = StudyJob.from_json(body)
        except JobSchemaError as exc:
            metrics.JOBS_FAILED.labels(kind="permanent").inc()
            self._dead_letter(channel, method, properties, body, f"malformed StudyJob: {exc}", "malformed", deliveries)
            return
        worker = threading.Thread(
            target=self._run_handler,
            args=(conn, channel, method, properties, body, job, deliveries, handler, stop),
            name=f"breastai-job-{job.job_id}",
            daemon=True,
        )
        self._worker = worker
        worker.start()

    def _run_handler(
        self,
        conn: BlockingConnection,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
        job: StudyJob,
        deliveries: int,
        handler: JobHandler,
        stop: threading.Event,
    ) -> None:
        with bind_job(job_id=job.job_id, study_uid=job.study_instance_uid):
            outcome = self._outcome(job, deliveries, handler, stop)
            settle: Callable[[], None] = functools.partial(
                self._settle, channel, method, properties, body, outcome, deliveries
            )
            try:
                conn.add_callback_threadsafe(settle)
            except (pex.AMQPError, OSError, RuntimeError) as exc:
                # The connection is gone; the broker redelivers the message.
                log.warning("settle_failed_connection_closed", error=type(exc).__name__)

    def _outcome(self, job: StudyJob, deliveries: int, handler: JobHandler, stop: threading.Event) -> _Outcome:
        """What to do with one delivery.

        A duplicate of a completed job is acknowledged unrun, a job past its limit given up.
        """
        if self._already_completed(job.job_id):
            return _Outcome("duplicate")
        counted = self._count_delivery(job.job_id)
        if counted > self._retry_limit:
            return self._give_up(job, counted)
        return self._decide(job, max(deliveries, counted), handler, stop)

    def _already_completed(self, job_id: str) -> bool:
        if self._spool is None:
            return False
        try:
            return self._spool.is_completed(job_id)
        except (OSError, JobSchemaError):
            return False

    def _count_delivery(self, job_id: str) -> int:
        """Count this delivery in the job's spool folder (0 without a spool or a job folder).

        The broker's ``x-delivery-count`` does not see every return: from
        RabbitMQ 4.3 a message returned because its consumer died (out of
        memory, a native crash in a model) is redelivered without counting,
        so a job that kills every worker would loop for ever. The count in
        the spool is written before the handler runs and survives the crash.
        """
        if self._spool is None:
            return 0
        try:
            return self._spool.increment_attempts(job_id)
        except (OSError, JobSchemaError):  # no job folder here (a worker without the shared spool, or already done)
            return 0

    def _give_up(self, job: StudyJob, counted: int) -> _Outcome:
        metrics.JOBS_FAILED.labels(kind="permanent").inc()
        outcome = _Outcome(
            "dead",
            f"delivered {counted} times, {self._retry_limit} allowed: earlier deliveries ended without a result "
            "(a worker stopped or crashed while handling it)",
            "permanent",
        )
        self._move_to_dead(job, outcome.reason)
        return outcome

    def _move_to_dead(self, job: StudyJob, reason: str) -> None:
        if self._spool is not None:
            try:
                self._spool.dead_letter(job.job_id, reason)
            except (OSError, JobSchemaError) as exc:
                log.error("spool_dead_letter_failed", error=type(exc).__name__, reason=str(exc))

    def _decide(self, job: StudyJob, deliveries: int, handler: JobHandler, stop: threading.Event) -> _Outcome:
        # Where a crash or a stall happened: the delivery that started and never reached job_acked.
        log.info("job_started", delivery=deliveries)
        try:
            handler(job)
        except TransientError as exc:
            metrics.JOBS_FAILED.labels(kind="transient").inc()
            reason = f"{type(exc).__name__}: {exc}"
            if deliveries >= self._retry_limit:
                outcome = _Outcome(
                    "dead", f"transient failure on delivery {deliveries} of {self._retry_limit}: {reason}", "transient"
                )
            else:
                delay = retry_backoff(deliveries, self._retry_backoff_s, self._retry_backoff_cap_s)
                log.warning("job_retry", delivery=deliveries, retry_in_s=delay, reason=reason)
                # Back off on this worker thread; the connection thread keeps heartbeats going.
                stop.wait(delay)
                return _Outcome("requeue", reason)
        except Exception as exc:  # PermanentError and anything unexpected: never loop
            if self._already_completed(job.job_id):
                # This worker stalled past its heartbeat, the broker gave the job to another that finished it (and
                # cleared its spool folder under us): the failure is ours to drop, not the job's to dead-letter.
                log.warning("job_completed_elsewhere", delivery=deliveries, error=type(exc).__name__)
                return _Outcome("duplicate")
            metrics.JOBS_FAILED.labels(kind="permanent").inc()
            outcome = _Outcome("dead", f"{type(exc).__name__}: {exc}", "permanent")
        else:
            return _Outcome("ack")
        self._move_to_dead(job, outcome.reason)
        return outcome

    def _settle(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
        outcome: _Outcome,
        deliveries: int,
    ) -> None:
        # Runs on the connection thread (add_callback_threadsafe).
        if not channel.is_open:
            return  # delivery tag belongs to a dead channel; the broker redelivers
        if outcome.action == "ack":
            channel.basic_ack(method.delivery_tag)
            metrics.JOBS_DONE.inc()
            log.info("job_acked", delivery=deliveries)
            if self._spool is not None and properties.message_id:
                try:
                    self._spool.complete(str(properties.message_id))
                except (OSError, JobSchemaError) as exc:
                    log.error("spool_complete_failed", error=type(exc).__name__, reason=str(exc))
        elif outcome.action == "duplicate":
            channel.basic_ack(method.delivery_tag)
            log.info("duplicate_delivery_acked", delivery=deliveries)
        elif outcome.action == "requeue":
            # basic.reject, not basic.nack: RabbitMQ 4 counts x-delivery-count
            # (our retry limit) only for rejects; 3.x counts both.
            channel.basic_reject(method.delivery_tag, requeue=True)
        else:
            self._dead_letter(channel, method, properties, body, outcome.reason, outcome.failure, deliveries)

    def _dead_letter(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
        reason: str,
        failure: str,
        deliveries: int,
    ) -> None:
        """Republish to the dead-letter exchange with the reason, confirmed, then ack.

        A plain ``basic_nack(requeue=False)`` would dead-letter too, but
        without any way to record why.
        """
        headers: dict[str, Any] = dict(properties.headers or {})
        headers[REASON_HEADER] = reason[:_MAX_REASON]
        headers[FAILURE_HEADER] = failure
        headers[DELIVERIES_HEADER] = deliveries
        dead_properties = BasicProperties(
            content_type=properties.content_type,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=properties.message_id,
            type=properties.type,
            timestamp=properties.timestamp,
            headers=headers,
        )
        try:
            channel.basic_publish(
                exchange=self.dead_exchange,
                routing_key=self.queue_name,
                body=body,
                properties=dead_properties,
                mandatory=True,
            )
        except (pex.UnroutableError, pex.NackError) as exc:
            # Keep the message rather than lose it; the broker's delivery limit ends any loop.
            log.error("dead_letter_publish_refused", error=type(exc).__name__)
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        channel.basic_ack(method.delivery_tag)
        log.error("job_dead_lettered", message_id=properties.message_id, failure=failure, reason=reason)

    # --- operator tools (breastai jobs) ----------------------------------------------

    def drop_dead_letters(self, job_ids: set[str] | None) -> int:
        """Remove from ``<queue>.dead`` the messages of ``job_ids`` (``None``: all of them); how many went.

        The spool's ``dead/`` folder is what ``breastai jobs`` re-drives or
        purges; this keeps the broker's dead-letter queue in step, so it does
        not hold a job that was re-driven or purged. Other messages are put
        back untouched.

        Raises
        ------
        QueueUnavailable
            If the broker cannot be reached.
        """
        try:
            conn = pika.BlockingConnection(self._parameters("jobs-tool"))
        except (pex.AMQPError, OSError) as exc:
            raise QueueUnavailable(f"cannot reach RabbitMQ: {type(exc).__name__}: {exc}") from exc
        dropped = 0
        kept: list[int] = []
        try:
            channel = conn.channel()
            # Passive: the tool must not re-declare the service's queues (its settings may differ in arguments).
            try:
                channel.queue_declare(self.dead_queue, passive=True)
            except pex.ChannelClosedByBroker:
                return 0  # no dead-letter queue yet: nothing was ever dead-lettered through this broker
            while True:
                method, properties, _body = channel.basic_get(self.dead_queue, auto_ack=False)
                if method is None:
                    break
                if job_ids is None or (properties.message_id or "") in job_ids:
                    channel.basic_ack(method.delivery_tag)
                    dropped += 1
                else:
                    kept.append(method.delivery_tag)
            for tag in kept:  # held unacknowledged until the scan ended, so none was read twice
                channel.basic_nack(tag, requeue=True)
        finally:
            conn.close()
        return dropped

    def close(self) -> None:
        """Close the publisher connection; a consumer ends when its stop event is set."""
        with self._pub_lock:
            self._reset_publisher()
