"""When to poll an operation next: few polls per job, yet no late tail. Pure, clock-free.

An operation's first poll goes out at a high quantile ``q`` of the completion latency seen in
this run, learned online in a log-bucketed histogram (O(1) memory). What a poll sees is
censored: a job found done at age ``a`` after a miss at age ``b`` finished somewhere in
``(b, a]``, so it is recorded at the geometric middle of that interval (at ``a/2`` when the
first poll found it done). The estimate therefore settles where a fraction ``q`` of jobs are
done at their first poll, and since only real completions are recorded, a burst of misses
cannot push it anywhere: early in a run, before slow jobs have finished, it errs low, which
costs a few polls, never a late result. Until enough jobs have finished, ``initial`` is used.

After a miss, polls back off geometrically with the job's age (next wait = age * (growth - 1)).
While jobs are still being submitted that wastes nothing; once nothing is left to submit the
slowest job decides the finish, so every wait is then capped at a small share of the run's
elapsed time, which bounds how late the last result is seen to that share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_LO = 1e-3  # seconds; the histogram's first bucket
_RATIO = 1.08  # bucket width: quantiles are read to within 8%
_BUCKETS = 300  # up to _LO * _RATIO**300, about 10^7 s


@dataclass
class LatencySketch:
    counts: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    n: int = 0
    _cache: dict[float, float] = field(default_factory=dict)  # quantiles until the next add

    def add(self, seconds: float) -> None:
        i = int(math.log(max(seconds, _LO) / _LO) / math.log(_RATIO))
        self.counts[min(i, _BUCKETS - 1)] += 1
        self.n += 1
        self._cache.clear()

    def quantile(self, q: float) -> float:
        if q not in self._cache:
            self._cache[q] = self._quantile(q)
        return self._cache[q]

    def _quantile(self, q: float) -> float:
        target = q * self.n
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= target and c:
                return float(_LO * _RATIO ** (i + 0.5))  # the bucket's middle, in log space
        return float(_LO * _RATIO**_BUCKETS)


@dataclass
class PollPolicy:
    quantile: float = 0.85
    growth: float = 2.0
    tail_share: float = 0.03
    initial: float = 1.0
    min_wait: float = 0.02
    max_wait: float = 600.0
    min_samples: int = 20
    patient_quantile: float = 0.99
    sketch: LatencySketch = field(default_factory=LatencySketch)

    @property
    def first(self) -> float:
        if self.sketch.n < self.min_samples:
            return self.initial
        return min(self.max_wait, max(self.min_wait, self.sketch.quantile(self.quantile)))

    def first_wait(self, slack: float = 0.0) -> float:
        """Delay of a new operation's first poll.

        ``slack`` is how long the run must go on anyway (the quota's time to submit what is
        still pending). A result seen before then does not bring the end nearer, so the poll
        waits up to that long, as late as the ``patient_quantile`` when there is room, and
        no earlier than the usual quantile: in a quota-bound run almost every job is then
        found done by its first poll.
        """
        first = self.first
        if self.sketch.n < self.min_samples:
            return first
        patient = min(self.max_wait, self.sketch.quantile(self.patient_quantile))
        return max(first, min(slack, patient))

    def observe_done(self, last_miss: float, age: float) -> None:
        """A poll at ``age`` found the job done; the previous poll (if any) missed at ``last_miss``."""
        self.sketch.add(math.sqrt(last_miss * age) if last_miss > 0 else age / 2)

    def cap(self, *, elapsed: float, draining: bool) -> float:
        if not draining:
            return self.max_wait
        return min(self.max_wait, max(self.min_wait, self.tail_share * elapsed))

    def next_wait(self, age: float, *, elapsed: float, draining: bool) -> float:
        """Seconds from now to the next poll of an operation ``age`` seconds old, not yet done."""
        wait = max(self.first - age, age * (self.growth - 1))
        return max(self.min_wait, min(wait, self.cap(elapsed=elapsed, draining=draining)))
