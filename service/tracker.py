"""When is a study complete? A pure decision core: no threads, no clock.

DICOM has no "end of study" message: a Storage SCU sends instances over
one or more associations (PS3.7 C-STORE, PS3.8 association release) and
simply goes away. We call a study complete when

- every association that delivered to it has ended (released, aborted, or
  the connection closed) and no instance arrived for ``quiet_period_s``; or
- no instance arrived for ``stable_age_s`` at all, whatever the
  associations say (a peer that never releases must not hold a study
  forever).

A study found unsealed after a restart was being received by an
association that died with the previous process: the sender will most
likely re-send it. It stays open as if that association were still open
(:data:`INTERRUPTED`), from the restart, until a new association delivers
to it and ends (then the quiet period applies) or ``stable_age_s`` passes.

Time is passed in by the caller (any monotonic clock), so every timing
case is a plain unit test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The association that was delivering a study when the previous process stopped; it never ends by itself.
INTERRUPTED = "interrupted-by-restart"


@dataclass
class _Study:
    last_seen: float
    associations: set[str] = field(default_factory=set)


class StudyTracker:
    """Track studies being received and tell which are complete.

    Parameters
    ----------
    quiet_period_s
        Silence required after the last instance once all associations ended.
    stable_age_s
        Silence after which a study is complete regardless of associations.

    Not thread-safe: the caller serialises calls (the dispatcher holds one lock).
    """

    def __init__(self, quiet_period_s: float, stable_age_s: float) -> None:
        if quiet_period_s < 0 or stable_age_s < quiet_period_s:
            raise ValueError(f"need 0 <= quiet_period_s <= stable_age_s, got {quiet_period_s!r} and {stable_age_s!r}")
        self.quiet_period_s = quiet_period_s
        self.stable_age_s = stable_age_s
        self._studies: dict[str, _Study] = {}
        self._open: set[str] = set()

    def instance_received(self, study_uid: str, association_id: str, now: float) -> None:
        """An instance of ``study_uid`` was stored over ``association_id`` at ``now``."""
        study = self._studies.get(study_uid)
        if study is None:
            study = self._studies[study_uid] = _Study(last_seen=now)
        study.last_seen = max(study.last_seen, now)
        # The sender is back: from now on its associations, not the interrupted one, say when it is done.
        study.associations.discard(INTERRUPTED)
        study.associations.add(association_id)
        self._open.add(association_id)

    def association_released(self, association_id: str, now: float) -> None:
        """``association_id`` ended (release, abort or closed connection).

        Unknown ids are ignored (associations that stored nothing, or a
        second end event for the same association).
        """
        self._open.discard(association_id)
        for study in self._studies.values():
            study.associations.discard(association_id)

    def association_interrupted(self, association_id: str, now: float) -> None:
        """``association_id`` was cut off with the process that received it (a receiver process that died).

        Its studies are held open as :data:`INTERRUPTED` from ``now``, as a
        restart holds the studies it finds: the sender saw its connection
        drop and will most likely re-send, and the re-sent instances belong
        in the same job. Unknown ids are ignored.
        """
        self._open.discard(association_id)
        for uid, study in self._studies.items():
            if association_id in study.associations:
                study.associations.discard(association_id)
                self.restore(uid, now, interrupted=True)

    def due(self, now: float) -> list[str]:
        """Studies complete at ``now``, oldest last instance first."""
        ready = []
        for uid, study in self._studies.items():
            silent = now - study.last_seen
            released = not (study.associations & self._open)
            if silent >= self.stable_age_s or (released and silent >= self.quiet_period_s):
                ready.append((study.last_seen, uid))
        return [uid for _, uid in sorted(ready)]

    def forget(self, study_uid: str) -> None:
        """Stop tracking ``study_uid`` (it was sealed). Unknown uids are ignored."""
        self._studies.pop(study_uid, None)
        still_used = set().union(*(s.associations for s in self._studies.values())) if self._studies else set()
        self._open &= still_used

    def restore(self, study_uid: str, last_seen: float, interrupted: bool = False) -> None:
        """Re-enter a study: one found unsealed at startup, or one whose sealing must be tried again.

        ``interrupted`` (a study found at startup): its association died
        with the previous process, and its sender will most likely re-send
        it, so it is held open as by an association that has not ended (see
        the module's docstring), from ``last_seen``, the restart. Otherwise
        only the quiet period from ``last_seen`` stands between it and
        completion.
        """
        study = self._studies.get(study_uid)
        if study is None:
            study = self._studies[study_uid] = _Study(last_seen=last_seen)
        else:
            study.last_seen = max(study.last_seen, last_seen)
        if interrupted:
            study.associations.add(INTERRUPTED)
            self._open.add(INTERRUPTED)

    def oldest_last_seen(self) -> float | None:
        """When the newest instance of the least recently active study arrived; ``None`` if none is tracked."""
        return min((study.last_seen for study in self._studies.values()), default=None)

    def tracked(self) -> list[str]:
        """Every study being tracked (for status and tests)."""
        return sorted(self._studies)

    def last_seen(self, study_uid: str) -> float | None:
        """When the newest instance of ``study_uid`` arrived, if tracked."""
        study = self._studies.get(study_uid)
        return None if study is None else study.last_seen
