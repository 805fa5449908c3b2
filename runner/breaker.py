"""Telling an outage from a bad job: one breaker per endpoint family (submit, poll). Pure.

A transient failure (5xx, timeout, refused or reset connection, DNS, a garbled gateway page)
says little on its own. The breaker watches them across jobs: when ``threshold`` requests in a
row fail and they span at least ``distinct`` jobs, the service (or the network) is down and the
breaker opens. Open, it lets no request of its family through except one probe at growing
intervals (``first_probe`` doubling to ``max_probe``, with jitter); the first success closes it,
and work resumes at the paced rate (the pacers space it, so there is no thundering herd).

A failure is charged to its job only on evidence that the job, not the service, is at fault: a
request sent *after* it succeeded. Until such evidence arrives the job is a suspect, requeued
uncharged; when a later-sent request succeeds its suspects are returned to be charged, and when
the breaker opens they are forgiven (``Verdict``). A job that fails again while still a suspect
with nothing else to compare it with gets ``"repeat"``, and a probe that fails gets ``"probe"``:
the caller then asks a free endpoint (the tokenizer) whether the service is up. If it is, the
failure is the job's (several prompts that each make the server fail must still fail, not hold
the run in an endless "outage"); if not, it is the outage's, and the next probe waits longer.
Any answer that is not a transient failure (a 400, a 429) shows the service reachable and
closes the breaker. Written by hand because the breakers on PyPI (purgatory, aiobreaker,
pybreaker) open on a plain failure count with a fixed reset time: none tells jobs apart, defers
a verdict, or grows its probe interval.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
Verdict = Literal["outage", "job", "unsure", "repeat", "probe"]


@dataclass
class Suspect(Generic[T]):
    job: int
    sent_at: float
    payload: T


@dataclass
class Breaker(Generic[T]):
    family: str
    threshold: int = 3
    distinct: int = 2
    first_probe: float = 1.0
    max_probe: float = 120.0
    probe_timeout: float = 300.0  # longer than any request may take
    rand: Callable[[], float] = random.random
    opened_at: float | None = None
    error: str = ""
    interval: float = 0.0
    next_probe_at: float = 0.0
    probing: bool = False
    probe_at: float = -math.inf  # when the probe in flight was let through
    last_success_sent: float = -math.inf
    streak: list[int] = field(default_factory=list)
    suspects: dict[int, Suspect[T]] = field(default_factory=dict)
    forgiven: list[Suspect[T]] = field(default_factory=list)

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def open_for(self, now: float) -> float:
        return 0.0 if self.opened_at is None else now - self.opened_at

    def wait(self, now: float) -> float:
        """Seconds until a request of this family may go (0 when closed or a probe is due)."""
        if self.opened_at is None:
            return 0.0
        if self.probing:
            return max(1.0, self.next_probe_at - now)
        return max(0.0, self.next_probe_at - now)

    def allow(self, now: float) -> bool:
        """May a request go now? While open, exactly one probe at a time, when it is due (a
        probe whose outcome never came back is given up after ``probe_timeout``)."""
        if self.opened_at is None:
            return True
        if (self.probing and now - self.probe_at < self.probe_timeout) or now < self.next_probe_at:
            return False
        self.probing, self.probe_at = True, now
        return True

    def answered(self) -> bool:
        """The service answered, though not with a success (a 400, a 429, a malformed body):
        it is reachable, so an outage is over. Proves no suspect. True if that closed it."""
        self.streak.clear()
        closed = self.opened_at is not None
        self.opened_at, self.probing, self.interval = None, False, 0.0
        return closed

    def untrip(self) -> list[Suspect[T]]:
        """It tripped, but a free request showed the service up: no outage after all. The
        suspects it forgave are returned, to be charged."""
        self.answered()
        forgiven, self.forgiven = self.forgiven, []
        return forgiven

    def success(self, sent_at: float, job: int) -> tuple[bool, list[Suspect[T]]]:
        """A request succeeded: (whether that closed the breaker, the suspects now proven)."""
        self.last_success_sent = max(self.last_success_sent, sent_at)
        self.streak.clear()
        self.suspects.pop(job, None)
        proven = [s for s in self.suspects.values() if s.sent_at < sent_at]
        for s in proven:
            del self.suspects[s.job]
        closed = self.opened_at is not None
        self.opened_at, self.probing, self.interval = None, False, 0.0
        return closed, proven

    def failure(self, now: float, sent_at: float, job: int, error: str) -> Verdict:
        """A transient failure. ``"probe"``: the probe failed while open; the caller may ask a
        free endpoint whether the service is up (then ``answered``: the job's own failure) before
        calling it an outage (``probe_failed``)."""
        if self.opened_at is not None:
            if self.probing and sent_at >= self.probe_at:  # the probe, not a straggler
                return "probe"
            return "outage"
        if self.last_success_sent > sent_at:
            return "job"  # the service answered a later request: this one is the job's
        if job in self.suspects and len(set(self.streak)) <= 1:
            return "repeat"
        self.streak.append(job)
        if len(self.streak) >= self.threshold and len(set(self.streak)) >= self.distinct:
            self.trip(now, error)
            return "outage"
        return "unsure"

    def probe_failed(self, now: float) -> None:
        """The probe failed and the service is down: the next probe waits twice as long."""
        self._schedule_probe(now, self.interval * 2)

    def suspect(self, job: int, sent_at: float, payload: T) -> None:
        self.suspects[job] = Suspect(job, sent_at, payload)

    def trip(self, now: float, error: str) -> None:
        """Open: forgive the suspects (kept in ``forgiven`` until the next trip, for
        ``untrip``) and schedule the first probe."""
        if self.opened_at is None:
            self.opened_at = now
        self.error = error
        self.forgiven = list(self.suspects.values())
        self.suspects.clear()
        self.streak.clear()
        self._schedule_probe(now, self.first_probe)

    def _schedule_probe(self, now: float, interval: float) -> None:
        self.interval = min(self.max_probe, max(self.first_probe, interval))
        self.next_probe_at = now + self.interval * (0.75 + 0.5 * self.rand())
        self.probing = False
