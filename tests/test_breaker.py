"""The outage breaker on its own: pure, with the clock passed in (issue 10)."""

from __future__ import annotations

import pytest

from runner.breaker import Breaker


def breaker(**kw: object) -> Breaker[str]:
    return Breaker("submit", rand=lambda: 0.5, **kw)  # type: ignore[arg-type]


def test_failures_across_jobs_open_it_one_jobs_repeated_failures_do_not() -> None:
    b = breaker(threshold=3, distinct=2)
    assert b.failure(1.0, 0.9, job=1, error="HTTP 503") == "unsure"
    b.suspect(1, 0.9, "fault of 1")
    assert b.failure(1.1, 1.0, job=1, error="HTTP 503") == "repeat"  # nothing else to compare
    assert not b.is_open
    assert b.failure(1.2, 1.1, job=2, error="HTTP 503") == "unsure"
    assert b.failure(1.3, 1.2, job=3, error="HTTP 503") == "outage"
    assert b.is_open and b.error == "HTTP 503" and b.suspects == {}  # suspects are forgiven


def test_a_failure_is_the_jobs_own_when_a_later_request_succeeded() -> None:
    b = breaker()
    b.success(sent_at=5.0, job=2)
    assert b.failure(6.0, 4.0, job=1, error="HTTP 500") == "job"  # sent before that success
    assert b.failure(6.0, 5.5, job=1, error="HTTP 500") == "unsure"


def test_suspects_are_proven_by_a_later_sent_success_and_cleared_by_their_own() -> None:
    b = breaker()
    b.suspect(1, 1.0, "one")
    b.suspect(2, 3.0, "two")
    closed, proven = b.success(sent_at=2.0, job=9)
    assert not closed and [s.payload for s in proven] == ["one"]  # 2 was sent after
    b.success(sent_at=4.0, job=2)  # its own success clears it, uncharged
    assert b.suspects == {}


def test_open_it_lets_one_probe_through_at_growing_capped_intervals() -> None:
    b = breaker(threshold=2, distinct=2, first_probe=1.0, max_probe=8.0)
    b.failure(0.0, 0.0, 1, "x")
    assert b.failure(0.0, 0.0, 2, "x") == "outage"
    waits = []
    now = 0.0
    for _ in range(6):
        assert not b.allow(now)
        now = b.next_probe_at
        waits.append(b.interval)
        assert b.allow(now) and not b.allow(now)  # one probe at a time
        assert b.failure(now + 0.1, now, 7, "x") == "probe"
        b.probe_failed(now + 0.1)
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    closed, _ = b.success(now, job=7)
    assert closed and not b.is_open and b.allow(now) and b.allow(now)


def test_a_stragglers_failure_does_not_reschedule_the_probe() -> None:
    b = breaker(threshold=2, distinct=2)
    b.failure(0.0, 0.0, 1, "x")
    b.failure(0.0, 0.0, 2, "x")
    assert b.allow(b.next_probe_at)
    due = b.next_probe_at
    b.failure(due + 0.1, sent_at=-1.0, job=3, error="x")  # sent before the breaker opened
    assert b.probing and b.next_probe_at == due


@pytest.mark.parametrize("r", [0.0, 1.0])
def test_probe_jitter_stays_within_a_quarter_of_the_interval(r: float) -> None:
    b = Breaker[str]("poll", threshold=1, distinct=1, first_probe=4.0, rand=lambda: r)
    b.failure(10.0, 10.0, 1, "x")
    assert b.next_probe_at == pytest.approx(10.0 + 4.0 * (0.75 + 0.5 * r))


def test_any_answer_that_is_not_a_transient_failure_ends_an_outage() -> None:
    # a probe answered 400 or 429 left the breaker "probing" forever: the run hung
    b = breaker(threshold=2, distinct=2)
    b.failure(0.0, 0.0, 1, "x")
    b.failure(0.0, 0.0, 2, "x")
    assert b.allow(b.next_probe_at)
    assert b.answered() and not b.is_open and b.allow(b.next_probe_at)


def test_a_probe_whose_outcome_never_came_is_given_up() -> None:
    b = breaker(threshold=2, distinct=2, probe_timeout=30.0)
    b.failure(0.0, 0.0, 1, "x")
    b.failure(0.0, 0.0, 2, "x")
    due = b.next_probe_at
    assert b.allow(due) and not b.allow(due + 29.0) and b.allow(due + 30.0)


def test_a_probe_that_failed_on_its_own_job_ends_the_outage() -> None:
    b = breaker(threshold=2, distinct=2, first_probe=1.0)
    b.failure(0.0, 0.0, 1, "x")
    b.failure(0.0, 0.0, 2, "x")
    for _ in range(3):  # the service grows its interval while down...
        now = b.next_probe_at
        assert b.allow(now) and b.failure(now, now, 1, "x") == "probe"
        b.probe_failed(now)
    assert b.interval == 8.0
    now = b.next_probe_at
    assert b.allow(now) and b.failure(now, now, 1, "x") == "probe"
    b.answered()  # ...but a job's own failure, with the service up, is no outage
    assert not b.is_open and b.allow(now)
