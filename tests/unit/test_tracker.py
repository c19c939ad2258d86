"""StudyTracker timing: release + quiet period, or stable age."""

from __future__ import annotations

import pytest

from service.tracker import StudyTracker

S1, S2 = "1.2.3.1", "1.2.3.2"


def make() -> StudyTracker:
    return StudyTracker(quiet_period_s=5.0, stable_age_s=60.0)


def test_not_due_while_association_open() -> None:
    t = make()
    t.instance_received(S1, "a", now=0.0)
    assert t.due(10.0) == []
    assert t.due(59.9) == []


def test_due_after_release_and_quiet_period() -> None:
    t = make()
    t.instance_received(S1, "a", now=0.0)
    t.association_released("a", now=1.0)
    assert t.due(4.9) == []
    assert t.due(5.0) == [S1]


def test_release_long_after_last_instance_is_due_at_once() -> None:
    t = make()
    t.instance_received(S1, "a", now=0.0)
    t.association_released("a", now=30.0)
    assert t.due(30.0) == [S1]


def test_two_associations_both_must_release() -> None:
    t = make()
    t.instance_received(S1, "a", now=0.0)
    t.instance_received(S1, "b", now=1.0)
    t.association_released("a", now=2.0)
    assert t.due(20.0) == []
    t.association_released("b", now=21.0)
    assert t.due(21.0) == [S1]


def test_instance_after_quiet_period_restarts_it() -> None:
    t = make()
    t.instance_received(S1, "a", now=0.0)
    t.association_released("a", now=0.5)
    assert t.due(4.0) == []
    t.instance_received(S1, "b", now=4.0)  # a new association delivers more
    t.association_released("b", now=4.5)
    assert t.due(8.9) == []
    assert t.due(9.0) == [S1]


def test_stable_age_fallback_when_association_never_releases() -> None:
    t = make()
    t.instance_received(S1, "a", now=0.0)
    t.instance_received(S1, "a", now=10.0)
    assert t.due(69.9) == []
    assert t.due(70.0) == [S1]


def test_aborted_association_counts_as_released() -> None:
    # The listener reports EVT_ABORTED and connection close as association_released.
    t = make()
    t.instance_received(S1, "a", now=0.0)
    t.association_released("a", now=0.1)
    t.association_released("a", now=0.2)  # second end event is harmless
    assert t.due(5.0) == [S1]


def test_one_association_two_studies() -> None:
    t = make()
    t.instance_received(S1, "a", now=0.0)
    t.instance_received(S2, "a", now=2.0)
    assert t.due(10.0) == []
    t.association_released("a", now=10.0)
    assert t.due(10.0) == [S1, S2]  # oldest last instance first


def test_forget_and_new_instances_make_a_new_study() -> None:
    t = make()
    t.instance_received(S1, "a", now=0.0)
    t.association_released("a", now=0.0)
    assert t.due(5.0) == [S1]
    t.forget(S1)
    assert t.due(100.0) == [] and t.tracked() == []
    t.instance_received(S1, "b", now=100.0)
    assert t.due(106.0) == []  # b is still open
    t.association_released("b", now=106.0)
    assert t.due(106.0) == [S1]


def test_forget_after_stable_age_with_open_association_then_more_data() -> None:
    t = make()
    t.instance_received(S1, "a", now=0.0)
    assert t.due(60.0) == [S1]
    t.forget(S1)
    t.instance_received(S1, "a", now=61.0)  # same still-open association keeps sending
    assert t.due(70.0) == []
    t.association_released("a", now=70.0)
    assert t.due(70.0) == [S1]


def test_restore_completes_after_quiet_period() -> None:
    t = make()
    t.restore(S1, last_seen=-3.0)
    assert t.due(1.9) == []
    assert t.due(2.0) == [S1]
    t.restore(S1, last_seen=-10.0)  # never moves last_seen backwards
    assert t.last_seen(S1) == -3.0


def test_unknown_ids_are_ignored() -> None:
    t = make()
    t.association_released("never-seen", now=0.0)
    t.forget(S1)
    assert t.due(1000.0) == []


def test_zero_quiet_period() -> None:
    t = StudyTracker(quiet_period_s=0.0, stable_age_s=1.0)
    t.instance_received(S1, "a", now=0.0)
    assert t.due(0.0) == []
    t.association_released("a", now=0.0)
    assert t.due(0.0) == [S1]


def test_rejects_inconsistent_periods() -> None:
    with pytest.raises(ValueError):
        StudyTracker(quiet_period_s=10.0, stable_age_s=5.0)
    with pytest.raises(ValueError):
        StudyTracker(quiet_period_s=-1.0, stable_age_s=5.0)


def test_a_study_interrupted_by_a_restart_waits_for_its_sender_or_the_stable_age() -> None:
    tracker = StudyTracker(quiet_period_s=5.0, stable_age_s=60.0)
    tracker.restore("1.2.3", last_seen=100.0, interrupted=True)  # found unsealed at the restart, at t=100
    assert tracker.due(110.0) == [], "the quiet period alone does not complete it: its association never ended"
    assert tracker.due(160.0) == ["1.2.3"], "nobody came back: complete after stable_age_s from the restart"


def test_an_interrupted_study_completes_once_the_re_sending_association_ends() -> None:
    tracker = StudyTracker(quiet_period_s=5.0, stable_age_s=60.0)
    tracker.restore("1.2.3", last_seen=100.0, interrupted=True)
    tracker.instance_received("1.2.3", "resend", now=130.0)
    assert tracker.due(140.0) == [], "the re-sending association is still open"
    tracker.instance_received("1.2.3", "resend", now=141.0)
    tracker.association_released("resend", now=142.0)
    assert tracker.due(145.0) == [] and tracker.due(146.0) == ["1.2.3"], "quiet period from the last instance"
    tracker.forget("1.2.3")
    assert tracker.tracked() == [] and tracker.due(1000.0) == []


def test_an_interrupted_association_holds_its_studies_until_the_re_send_ends_or_stable_age() -> None:
    """A receiver process died with the association (service.receivers): as after a restart, wait for the re-send."""
    t = make()
    t.instance_received(S1, "a", now=0.0)
    t.instance_received(S2, "b", now=0.0)
    t.association_interrupted("a", now=10.0)
    assert t.due(30.0) == [], "neither sealed: a's study waits for its re-send, b is still open"
    t.instance_received(S1, "c", now=40.0)  # the sender is back
    t.association_released("c", now=41.0)
    assert t.due(44.9) == []
    assert t.due(45.0) == [S1]  # the quiet period after the re-sent instance
    t.forget(S1)  # sealed
    t.association_interrupted("unknown", now=50.0)  # ignored
    assert t.due(61.0) == [S2]  # b never ended: stable age, as before


def test_a_study_only_an_interrupted_association_fed_completes_at_stable_age_after_the_interruption() -> None:
    t = make()
    t.instance_received(S1, "a", now=0.0)
    t.association_interrupted("a", now=30.0)
    assert t.due(89.9) == []
    assert t.due(90.0) == [S1]
