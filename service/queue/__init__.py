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
from collections.abc import Callable
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


__all__ = ["JobHandler", "JobQueue", "open_queue", "retry_backoff"]
