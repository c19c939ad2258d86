"""The audit trail of associations: who sent what, when, and what we answered (one JSON line per association).

Written to ``<spool>/audit/associations-YYYY-MM-DD.jsonl`` (UTC) when an
association ends (released, aborted or its connection closed): the calling
AE title, the peer's address, when it started and ended, how it ended, the
Study Instance UIDs it delivered to, and how many C-STOREs got each status
(PS3.4 B.2.3). Never patient identity. Appended and flushed, not fsynced:
the instances themselves are the durable record; this answers "did the PACS
send it, and what did we say" for an operator or an audit.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

log = structlog.get_logger("service.audit")


def _append_line(path: Path, line: bytes) -> None:
    """Append ``line`` in one ``write`` to a file opened ``O_APPEND``.

    Associations end on many threads, and in several receiver processes
    (service.receivers): each line must land whole. A buffered text stream
    may split a long line (many studies) into several writes that another
    writer's line could come between; one append-mode write of a regular
    file goes in whole at the end (POSIX ``write``, ``O_APPEND``).
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(descriptor, line)
        if written != len(line):  # only a full disk does this to a regular file
            raise OSError(errno.ENOSPC, f"audit line cut short ({written} of {len(line)} bytes)")
    finally:
        os.close(descriptor)


@dataclass
class _Association:
    calling_ae: str
    peer: str
    started: datetime
    statuses: Counter[str] = field(default_factory=Counter)
    studies: set[str] = field(default_factory=set)


class AuditTrail:
    """Collects each association's C-STORE outcomes and writes one line when it ends.

    Parameters
    ----------
    folder
        Where the daily ``associations-*.jsonl`` files go (made if missing).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._open: dict[str, _Association] = {}
        self._lock = threading.Lock()

    def stored(self, association_id: str, calling_ae: str, peer: str, status: int, study_uid: str | None) -> None:
        """Count one C-STORE of ``association_id`` and the status we answered."""
        with self._lock:
            record = self._open.get(association_id)
            if record is None:
                record = self._open[association_id] = _Association(calling_ae, peer, datetime.now(UTC))
            record.statuses[f"0x{status:04X}"] += 1
            if study_uid:
                record.studies.add(study_uid)

    def rejected(self, calling_ae: str, peer: str, reason: str) -> None:
        """Write the line of an association we refused before it was established (``how``: rejected: reason)."""
        association_id = uuid.uuid4().hex
        with self._lock:
            self._open[association_id] = _Association(calling_ae, peer, datetime.now(UTC))
        self.ended(association_id, f"rejected: {reason}")

    def ended(self, association_id: str, how: str) -> None:
        """Write the association's line (once: a release is often followed by a connection-closed event)."""
        with self._lock:
            record = self._open.pop(association_id, None)
        if record is None:
            return
        now = datetime.now(UTC)
        line = {
            "association": association_id,
            "calling_ae": record.calling_ae,
            "peer": record.peer,
            "started": record.started.isoformat(),
            "ended": now.isoformat(),
            "how": how,
            "statuses": dict(sorted(record.statuses.items())),
            "studies": sorted(record.studies),
        }
        path = self.folder / f"associations-{now:%Y-%m-%d}.jsonl"
        try:
            _append_line(path, (json.dumps(line, sort_keys=True) + "\n").encode("utf-8"))
        except OSError as exc:  # a full disk must not take the listener down: the log line below still says it
            log.warning("audit_write_failed", error=type(exc).__name__)
        log.info(
            "association_ended",
            calling_ae=record.calling_ae,
            peer=record.peer,
            how=how,
            statuses=line["statuses"],
            studies=len(record.studies),
        )
