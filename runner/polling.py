"""When to poll an operation next: few polls per job, yet no late tail. Pure, clock-free.

An operation's first poll goes out near a high quantile ``q`` of the completion latency seen in
this run, learned online. What a poll sees is censored (done at the first poll only says
latency <= that age), so instead of a latency histogram the first delay itself is the estimate:
a Robbins-Monro step in log space, up by ``eta*q`` when the first poll finds the job still
running and down by ``eta*(1-q)`` when it finds it done, settles where a fraction ``q`` of jobs
is done at their first poll, which is the q-quantile by definition.

After a miss, polls back off geometrically with the job's age (next wait = age * (growth - 1)).
While jobs are still being submitted that wastes nothing; once nothing is left to submit the
slowest job decides the finish, so every wait is then capped at a small share of the run's
elapsed time, which bounds how late the last result is seen to that share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class PollPolicy:
    quantile: float = 0.85
    growth: float = 2.0
    tail_share: float = 0.03
    initial: float = 1.0
    min_wait: float = 0.02
    max_wait: float = 600.0
    eta: float = 0.02  # the step's floor; early steps are larger (see observe_first_poll)

    def __post_init__(self) -> None:
        self._log_first = math.log(self.initial)
        self.observed = 0

    @property
    def first(self) -> float:
        return min(self.max_wait, max(self.min_wait, math.exp(self._log_first)))

    def observe_first_poll(self, done: bool) -> None:
        self.observed += 1
        # big steps first (from a 1 s guess to minutes within ~100 jobs), then small ones
        eta = max(self.eta, 0.5 / math.sqrt(self.observed))
        self._log_first += -eta * (1 - self.quantile) if done else eta * self.quantile
        lo, hi = math.log(self.min_wait), math.log(self.max_wait)
        self._log_first = min(hi, max(lo, self._log_first))

    def next_wait(self, age: float, *, elapsed: float, draining: bool) -> float:
        """Seconds from now to the next poll of an operation ``age`` seconds old, not yet done."""
        wait = max(self.first - age, age * (self.growth - 1))
        cap = self.max_wait
        if draining:
            cap = min(cap, max(self.min_wait, self.tail_share * elapsed))
        return max(self.min_wait, min(wait, cap))
