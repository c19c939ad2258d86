"""Job queues: the durable hand-over from listener to workers.

Two adapters implement :class:`JobQueue`:

- :mod:`service.queue.embedded` - in-process, durable through the spool
  (one process runs listener and workers);
- :mod:`service.queue.rabbitmq` - a RabbitMQ quorum queue with publisher
  confirms and a dead-letter queue (listener and workers may scale apart).

Both obey the same contract, so that the workers' handler decides retries
with the exception tree of :mod:`service.errors` alone:

=======================================  ====================================
handler outcome                          queue action
=======================================  ====================================
returns                                  ack (the job is finished)
raises :class:`~service.errors.TransientError`
                                         requeue after capped exponential
                                         backoff; dead-letter once the job
                                         was delivered ``job_retry_limit`` times
raises :class:`~service.errors.PermanentError`
or any other ``Exception``               dead-letter with the reason, never retried
=======================================  ====================================

Spool ownership: the handler never deletes spool files, so a job
redelivered after a crash between results and ack still finds its
instances. The queue settles the spool: on ack it removes the job's
folder with ``spool.complete`` (the RabbitMQ queue only when given a
spool), and a dead-lettered job's folder goes to ``dead/``. Both count
each delivery in the job's folder before the handler runs, so a job that
crashes every worker still reaches ``job_retry_limit``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from service.errors import ConfigurationError
from service.schema import StudyJob

if TYPE_CHECKING:
    from service.settings import Settings
    from service.spool import Spool

JobHandler = Callable[[StudyJob], None]


def retry_backoff(delivery: int, base_s: float, cap_s: float) -> float:
    """Capped exponential backoff before redelivery number ``delivery + 1``.

    ``delivery`` counts from 1: the first retry waits ``base_s``, then the
    wait doubles up to ``cap_s``.
    """
    return float(min(cap_s, base_s * (2 ** max(0, delivery - 1))))


@runtime_checkable
class JobQueue(Protocol):
    """What the listener publishes to and the workers consume from."""

    def publish(self, job: StudyJob) -> None:
        """Return only once ``job`` is durable; raise QueueUnavailable otherwise.

        Publishing the same job id again is harmless (results are idempotent).
        """
        ...

    def consume(self, handler: JobHandler, stop: threading.Event) -> None:
        """Run ``handler`` on each job until ``stop`` is set (see module table)."""
        ...

    def close(self) -> None:
        """Release connections and threads; idempotent."""
        ...


def consume_concurrently(queues: Sequence[JobQueue], handler: JobHandler, stop: threading.Event) -> None:
    """Run ``handler`` on jobs from every queue in ``queues`` at once, one consumer thread each, until ``stop`` is set.

    ``worker_concurrency``: several jobs in one worker process, sharing its
    loaded models. One queue: its consume loop runs on this thread, as it
    always did. Several: a thread each; the embedded queue may be listed
    more than once (its consume loop takes jobs under its own lock), while
    RabbitMQ consumers need a queue object, and so a connection, each (pika
    connections are not thread-safe). A consumer that raises (credentials
    refused, the queue deleted) sets ``stop``, as the lone consumer's
    exception ends the process: the others finish their current job and
    return, and the first exception is raised here.
    """
    if len(queues) == 1:
        queues[0].consume(handler, stop)
        return
    errors: list[BaseException] = []

    def consume(queue: JobQueue) -> None:
        try:
            queue.consume(handler, stop)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [
        threading.Thread(target=consume, args=(queue,), name=f"breastai-consumer-{number}", daemon=True)
        for number, queue in enumerate(queues, start=1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)  # with a timeout, so SIGTERM's handler runs on this (main) thread meanwhile
    if errors:
        raise errors[0]


def open_queue(settings: Settings, spool: Spool) -> JobQueue:
    """Build the queue named by ``settings.queue``.

    Raises
    ------
    ConfigurationError
        For an unknown queue kind.
    """
    if settings.queue == "embedded":
        from service.queue.embedded import EmbeddedJobQueue

        return EmbeddedJobQueue(settings, spool)
    if settings.queue == "rabbitmq":
        from service.queue.rabbitmq import RabbitMQJobQueue

        return RabbitMQJobQueue(settings, spool)
    raise ConfigurationError(f"unknown queue kind {settings.queue!r}")


__all__ = ["JobHandler", "JobQueue", "consume_concurrently", "open_queue", "retry_backoff"]
