"""When to poll an operation next: the run ends as early as it can, with few polls. Pure.

What it optimizes: the time the last result is seen (the run's end) first, the number of polls
second. A poll that finds an operation done too late costs nothing unless that operation is the
last one to finish; so each operation is polled lazily (a first poll near a high quantile of the
latency learned in this run, then geometric back-off by age, ratio ``growth``), except near the
*horizon*: a lower bound on when the run can end at all, below which being late cannot delay it.
No wait reaches past the horizon, and from it on waits are cut to ``tail_share`` of the elapsed
run, so the last result is seen within that share of the earliest possible end, while only the
few operations still running at the horizon pay for the tight polling.

The horizon is the later of two bounds: the quota's (``slack``: submitting goes on that long, and
the last job then takes at least a low quantile of the latency) and the running operations' (the
time past which ``alive`` of them are still expected to run, from the learned survival function
conditioned on each one's age; with ``alive=3`` the run ends later than it with about 95%
probability). Latency is learned online in a log-bucketed histogram from censored observations
(an operation found done at age ``a`` after a miss at ``b`` finished in ``(b, a]``), with the
operations still running as right-censored ones; past every latency seen to finish, a heavy
tail stands for the share known to run longer. Before enough operations have finished, a prior
stands in (the docs say completions take minutes): the scouts (a run's first operations and a
few after) are polled at ``prior`` seconds, then back off by ``prior_growth``; the others wait
for what the scouts find (``unlearned`` priors at least). Early in a run the estimate cannot
have seen latencies longer than the run so far, so first polls not yet made are planned again
whenever the estimate moves (``replan``): most first polls then find their operation done.
Everything here is clock-free: callers pass ages and times, in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

_LO = 1e-3  # seconds; the histogram's first bucket
_RATIO = 1.08  # bucket width: quantiles are read to within 8%
_BUCKETS = 300  # up to _LO * _RATIO**300, about 10^7 s
_LOG_RATIO = math.log(_RATIO)
TAIL_EXPONENT = 20.0
UNSEEN_EXPONENT = 2.0  # the tail past every latency seen: a heavy one, see survival_function
SCOUTED = 5000  # past this many operations, scouts are ten times rarer: the estimate has enough
EXACT_UP_TO = 2000  # running operations weighed one by one in the horizon; more are bucketed


def _bucket(seconds: float) -> int:
    return min(_BUCKETS - 1, max(0, int(math.log(max(seconds, _LO) / _LO) / _LOG_RATIO)))


def _middle(i: int) -> float:
    return float(_LO * _RATIO ** (i + 0.5))  # the bucket's middle, in log space


@dataclass
class LatencySketch:
    """The latency distribution, from interval-censored observations, on log-spaced buckets.

    A poll shows only that an operation finished within an interval: ``(b, a]`` after a miss at
    age ``b`` and a hit at ``a``, or ``(0, a]`` when the first poll found it done. Recording a
    point for each (say the interval's middle) biases the estimate towards the polling schedule,
    and a patient schedule feeds on that bias; instead the distribution is the self-consistent
    (Turnbull) estimate: EM over the buckets, a few iterations per refresh, warm-started. Each
    iteration is linear in buckets plus distinct intervals, so a refresh costs microseconds.
    """

    n: int = 0
    intervals: dict[tuple[int, int], int] = field(default_factory=dict)
    censored: dict[int, int] = field(default_factory=dict)  # running: bucket of age -> count
    p: list[float] = field(default_factory=list)  # probability per bucket
    _fresh: bool = False
    _refreshed_at: int = 0  # n at the last refresh
    _cache: dict[float, float] = field(default_factory=dict)
    _tail: list[float] = field(default_factory=list)  # survival per bucket
    _done_top: int = 0  # the last bucket an operation was seen to finish in

    def add(self, lo: float, hi: float) -> None:
        """An operation finished after ``lo`` seconds and at most ``hi`` (``lo`` may be 0)."""
        top = _bucket(hi)
        # a miss at ``lo`` rules out lo's own bucket (else the hit's and the miss's intervals
        # would share it, and the estimate would pile everything there)
        key = (min(_bucket(lo) + 1, top) if lo > 0 else 0, top)
        self.intervals[key] = self.intervals.get(key, 0) + 1
        self.n += 1
        # a refresh costs about a millisecond: redo it when the sample grew by 5%, not per add
        if self.n < 40 or self.n >= self._refreshed_at * 1.05:
            self._fresh = False

    def set_running(self, ages: dict[int, int]) -> None:
        """The operations still running, by bucket of age (right-censored observations)."""
        if ages != self.censored:
            self.censored = ages
            self._fresh = False

    def _refresh(self) -> None:
        if self._fresh:
            return
        self._fresh = True
        self._refreshed_at = self.n
        self._cache.clear()
        if not self.n:
            return
        high = max(max(b for _, b in self.intervals), max(self.censored, default=0)) + 1
        spans = list(self.intervals.items())
        # a running operation finished (will finish) after its age, within the range seen
        spans += [((min(i + 1, high - 1), high - 1), c) for i, c in self.censored.items()]
        low = min(a for a, _ in self.intervals)
        # a little mass everywhere the observations reach: EM is multiplicative, and a bucket
        # that once held none could never gain any, whatever later polls show
        floor = [1e-4 / (high - low) if low <= j < high else 0.0 for j in range(_BUCKETS)]
        p = self.p or floor
        for _ in range(8 if self.p else 30):
            prefix = [0.0]
            for x in p:
                prefix.append(prefix[-1] + x)
            coef = [0.0] * (_BUCKETS + 1)
            for (a, b), c in spans:
                mass = prefix[b + 1] - prefix[a]
                w = c / (mass if mass > 1e-12 else 1e-12)
                coef[a] += w
                coef[b + 1] -= w
            run, p2 = 0.0, []
            for j in range(_BUCKETS):
                run += coef[j]
                p2.append(p[j] * run)
            total = sum(p2) or 1.0
            p = [x / total * (1 - 1e-4) + f for x, f in zip(p2, floor, strict=True)]
        self.p = p
        left, tail = 1.0, []
        for x in p:
            left -= x
            tail.append(max(left, 0.0))
        self._tail = tail
        self._done_top = max(b for _, b in self.intervals)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile. Where it lies past every latency seen to finish (only operations
        still running reach there), it comes from the unseen tail (see ``survival``)."""
        self._refresh()
        if not self.n:
            return _middle(_BUCKETS - 1)
        if q not in self._cache:
            top, beyond = _middle(self._done_top), self._tail[self._done_top]
            if beyond > 1 - q:  # the tail: beyond * (top / s) ** UNSEEN_EXPONENT = 1 - q
                self._cache[q] = top * (beyond / (1 - q)) ** (1 / UNSEEN_EXPONENT)
                return self._cache[q]
            seen, found = 0.0, top
            for i, x in enumerate(self.p[: self._done_top + 1]):
                seen += x
                if seen >= q - 1e-12 and x > 0:
                    found = _middle(i)
                    break
            self._cache[q] = found
        return self._cache[q]

    def survival_function(self) -> Callable[[float], float]:
        """P(latency > seconds), the estimate fixed for many lookups in a row (the horizon).

        Past the longest latency seen to finish there are two tails. The share of operations
        known to run longer (``beyond``: early in a run, most of them) goes on with a heavy
        power law (``UNSEEN_EXPONENT``): nothing says how much longer they take, so the
        estimate does not pretend they finish soon. And a floor, half an operation's worth,
        decays steeply (``TAIL_EXPONENT``): an operation older than any seen to finish is
        expected to finish eventually rather than to run forever.
        """
        self._refresh()
        if not self.n:
            return lambda seconds: 1.0
        tail, done = self._tail, self._done_top
        floor = 0.5 / max(self.n, 1)
        top, beyond = _middle(done), tail[done]
        # the tail beyond starts no higher than the bucket before it: survival never rises
        # with age (the horizon relies on it), and is never raised above the estimate's own
        start = min(floor + beyond, max(tail[done - 1], floor)) if done else floor + beyond

        def survival(seconds: float) -> float:
            i = int(math.log(max(seconds, _LO) / _LO) / _LOG_RATIO)
            if i < done:
                return max(tail[i], floor)
            ratio = top / max(seconds, top)
            return float(start * ratio**TAIL_EXPONENT)

        return survival

    def survival(self, seconds: float) -> float:
        """P(latency > seconds): see ``survival_function``."""
        return self.survival_function()(seconds)


@dataclass
class PollPolicy:
    quantile: float = 0.85  # first poll when the run is near its end
    patient_quantile: float = 0.99  # first poll while the quota keeps the run going anyway
    growth: float = 2.0  # back-off after a miss: next wait = age * (growth - 1)
    tail_growth: float = 1.5  # once submitting is over, for operations older than most
    tail_quantile: float = 0.9  # "older than most": past this quantile of the latency
    tail_share: float = 0.005  # from the horizon on, no wait exceeds this share of the run
    alive: float = 3.0  # the horizon: when this many operations are still expected to run
    # first poll before anything is learned: the docs say "from a couple of minutes"; a first
    # poll at 15 s cost a batch of five ~8 polls a job before its first minute (scouts in 18%
    # steps), polls its last result then lacked (bench/simulate.py --regime small --seeds 300)
    prior: float = 60.0
    # the others' first poll before anything is learned, in priors (60 s; it was 4 priors of
    # 15 s: at 4 of 60 s, a batch of 25 kept its last 5 unpolled for 4 minutes, and its last
    # result was seen 18 s late on average, not 2 s, over 300 latency draws: review L)
    unlearned: float = 1.0
    # the scouts' back-off: their results resolve the latency finely, and each is seen within
    # 12% of its latency (a batch of 20 or fewer is all scouts: mean lag within 10% in every
    # one of 300 latency draws of five jobs of 1-5 minutes; at 18%, over 10% in 19 of them)
    prior_growth: float = 1.12
    scouts: int = 20  # a run's first operations are scouts (all of a small batch) ...
    # ... and every this-many-th one after them: 1 in 100 cost the mixed regime 0.05 polls a
    # job more than 1 in 150 over eight latency draws (1.48-1.51 against 1.41-1.46); the
    # end moved by at most 0.4% of T_min either way (bench/simulate.py)
    scout_every: int = 150
    last_few: int = 2  # once submitting is over and this few are left running, ...
    cadence: float = 1 / 8  # ... each is polled at least every this many priors (7.5 s) ...
    last_cadence: float = 1 / 20  # ... the very last one every this many (3 s) ...
    last_share: float = 0.01  # ... or this share of its age, if longer
    most: int = 0  # the most operations running at once in this run so far (see ``last_cap``)
    min_wait: float = 0.02
    min_samples: int = 20
    sketch: LatencySketch = field(default_factory=LatencySketch)
    _planned_from: tuple[bool, int] = (False, -1)

    @property
    def learned(self) -> bool:
        return self.sketch.n >= self.min_samples

    @property
    def first(self) -> float:
        """The first-poll delay near the end of a run (and the expected latency, for an ETA)."""
        return self.sketch.quantile(self.quantile) if self.learned else self.prior

    def observe_done(self, last_miss: float, age: float) -> None:
        """A poll at ``age`` found it done; the previous poll (if any) missed at ``last_miss``."""
        self.sketch.add(last_miss, age)

    def horizon(self, slack: float, running: Sequence[tuple[float, float]] = ()) -> float:
        """Seconds from now before which the run cannot end (see the module docstring).

        ``slack``: how long submitting goes on; ``running``: (age now, age when last seen
        running) of the operations not yet seen done. What is known of each is only that it ran
        past its last poll (it may have finished since), so that is what it is conditioned on,
        and what it tells the estimate. With nothing learned there is no horizon: infinity.
        """
        count: dict[int, int] = {}  # known-alive ages by bucket: right-censored observations
        for _, alive in running:
            if alive > 0:
                i = _bucket(alive)
                count[i] = count.get(i, 0) + 1
        self.sketch.set_running(count)
        if not self.learned:
            return math.inf
        quota = slack + self.sketch.quantile(0.05) if slack > 0 else 0.0
        survival = self.sketch.survival_function()
        if len(running) <= EXACT_UP_TO:  # few enough to weigh each (the tail's few matter most)
            ops = [(age, 1.0 / survival(alive)) for age, alive in running]
        else:  # grouped by the bucket of their age, at the group's mean
            groups: dict[int, list[float]] = {}
            for age, alive in running:
                g = groups.setdefault(_bucket(age), [0.0, 0.0, 0.0])
                g[0], g[1], g[2] = g[0] + 1, g[1] + age, g[2] + alive
            ops = [(t / n, n / survival(a / n)) for n, t, a in groups.values()]
        if not ops or quota == math.inf:
            return quota

        def expected_alive(t: float) -> float:  # operations still running t seconds from now
            return sum(survival(age + t) * w for age, w in ops)

        # fewer than ``alive`` expected to run past the quota's bound: it is the horizon (the
        # expected count only falls with time), and no search is needed; while the quota keeps
        # a run going, this is nearly every tick
        if expected_alive(quota) < self.alive:
            return quota
        lo, hi = quota, max(1.0, 2 * quota)
        while expected_alive(hi) >= self.alive and hi < 1e7:
            lo, hi = hi, hi * 2
        while hi - lo > max(0.05, 0.01 * lo):  # to 1% or 50 ms: far finer than the polls
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if expected_alive(mid) >= self.alive else (lo, mid)
        return max(quota, lo)

    def _cap(self, horizon: float, elapsed: float) -> float:
        return max(horizon, self.tail_share * elapsed, self.min_wait)

    def first_wait(
        self, *, slack: float, horizon: float, elapsed: float, scout: bool = False
    ) -> float:
        """Delay of a new operation's first poll.

        While the quota still has a long way to go (``slack``), a result seen sooner cannot end
        the run sooner, so the first poll waits up to the ``patient_quantile`` of the latency,
        but no less than the usual ``quantile``; and never past the horizon's tail.
        """
        if not self.learned:
            if scout:
                return self.prior
            # only the scouts learn; the others wait for what they find (``replan``), unless
            # that takes long: a few priors, and past twice the oldest age seen running, but
            # no more than four times that many priors (a scout may never finish)
            oldest = _middle(max(self.sketch.censored)) if self.sketch.censored else 0.0
            few = self.unlearned * self.prior
            return min(max(few, 2 * oldest), 4 * few)
        q = self.sketch.quantile
        if scout:
            return max(self.min_wait, min(self.prior, q(0.1)))
        wait = max(q(self.quantile), min(slack, q(self.patient_quantile)))
        return max(self.min_wait, min(wait, self._cap(horizon, elapsed)))

    def replan(self, slack: float) -> bool:
        """Whether the first polls not made yet should be planned again: the estimate they
        were planned from has moved since the last time this said so (by a bucket or more).

        A first poll is planned when its operation is submitted, from what is known then;
        early in a run that is little (latencies longer than the run so far cannot have been
        seen), and a first poll planned from it mostly misses. Planned again as the estimate
        grows, most first polls find their operation done.
        """
        key = (self.learned, _bucket(self.first_wait(slack=slack, horizon=math.inf, elapsed=0.0)))
        if key == self._planned_from:
            return False
        self._planned_from = key
        return True

    def scout(self, ordinal: int) -> bool:
        """Whether the run's ``ordinal``-th operation (from 0) is a scout, polled finely: the
        others' polls show their latency only within a factor of ``growth``; the scouts' pin
        it down, which is what the estimate needs between those coarse intervals."""
        every = self.scout_every * (1 if ordinal < SCOUTED else 10)
        return ordinal < self.scouts or ordinal % every == 0

    def next_wait(
        self, age: float, *, horizon: float, elapsed: float, scout: bool = False,
        draining: bool = False, running: int = 1 << 30,
    ) -> float:  # fmt: skip
        """Seconds from now to the next poll of an operation ``age`` seconds old, not yet done,
        one of ``running`` not yet seen done.

        The last few (``last_few``, once nothing is left to submit) end the run, and polling
        them costs little: each is polled at least every ``cadence`` priors (7.5 s), the last
        one of several every ``last_cadence`` (3 s), or ``last_share`` of its age once that is
        longer (an operation left running for hours is not polled every few seconds). The SDK
        polls every 10 s, so it sees the last result 5 s after it is ready on average; runner,
        with these, 1.5 s to 3.75 s. In a batch of five, the last result was otherwise seen up
        to a back-off step (12% of its latency) late. "Of several": once more than
        ``last_few`` ran at once; a lone job or chat is polled every 7.5 s (every 3 s, a lone
        five-minute completion took 80 polls, and a lone chat as much per turn)."""
        wait = min(self._next_wait(age, horizon, elapsed, scout, draining),
                   self.last_cap(age, draining=draining, running=running))  # fmt: skip
        return max(self.min_wait, wait)

    def last_cap(self, age: float, *, draining: bool, running: int) -> float:
        """The longest wait of one of the last few of several (see ``next_wait``), else
        infinity. Also for the polls planned while more were running: once the others finish,
        the last ones' next polls are pulled in to it (else the last could sleep through the
        end for a whole back-off step planned when three were left)."""
        if not draining or running > self.last_few:
            return math.inf
        every = self.last_cadence if running <= 1 and self.most > self.last_few else self.cadence
        return max(every * self.prior, self.last_share * age)

    def at_once(self, running: int) -> None:
        """``running`` operations run at once now (one was just submitted or loaded)."""
        self.most = max(self.most, running)

    def _next_wait(
        self, age: float, horizon: float, elapsed: float, scout: bool, draining: bool
    ) -> float:
        if scout:
            wait = age * (self.prior_growth - 1)
            if self.learned:
                wait = min(wait, self._cap(horizon, elapsed))
        elif not self.learned:
            wait = max(self.prior - age, age * (self.growth - 1))
        else:
            growth = self.growth
            if draining and age > self.sketch.quantile(self.tail_quantile):
                # the likely last ones: finer steps bound their lag even if the horizon is
                # late, and give the estimate the tail it needs to place the horizon
                growth = self.tail_growth
            wait = min(max(self.first - age, age * (growth - 1)), self._cap(horizon, elapsed))
        return wait
