"""Backoff and pacing: how long to wait, and how fast to go.

``delay`` is a pure function (capped exponential with full jitter, overridden upward by a
server's ``Retry-After``) so it can be tested without a clock. ``Pacer`` hands out request
slots one at a time under a lock: a per-second rate (adaptive: halved on 429, recovering
additively while requests succeed) and, optionally, a rolling one-hour window; a global pause
honours ``Retry-After`` for everyone at once. Waiters queue on the lock and leave one slot
apart, so a pause never ends in a thundering herd.

``set_testing(True)`` (or ``RUNNER_ZERO_BACKOFF=1`` for subprocesses) zeroes the retry waits,
not the pacing, which is the behaviour under test.
"""

from __future__ import annotations

import collections
import math
import os
import random

import anyio

_testing = os.environ.get("RUNNER_ZERO_BACKOFF") == "1"


def set_testing(on: bool) -> None:
    global _testing
    _testing = on


def delay(
    attempt: int,
    *,
    base: float = 1.0,
    factor: float = 2.0,
    cap: float = 60.0,
    retry_after: float | None = None,
    rand: float | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based)."""
    if _testing:
        return 0.0
    ceiling = min(cap, base * factor ** max(0, attempt - 1))
    wait = ceiling * (0.5 + 0.5 * (random.random() if rand is None else rand))
    if retry_after is not None:
        wait = max(wait, min(retry_after, 3600.0))
    return wait


class Pacer:
    """Hands out request slots at ``rate`` per second and ``per_hour`` per rolling hour."""

    def __init__(
        self, rate: float, per_hour: int | None = None, floor: float = 0.05, hour: float = 3600.0
    ) -> None:
        self.limit = rate
        self.rate = rate
        self.per_hour = per_hour
        # 1% longer than the server's hour: our stamps are taken before the request travels,
        # the server's after, so an exact window would free a slot a little early
        self.hour = hour * 1.01
        self.floor = min(floor, rate)
        self._next = 0.0
        self._paused_until = 0.0
        self._hour: collections.deque[float] = collections.deque()
        self._lock = anyio.Lock()
        self.throttled = 0

    def _earliest(self, now: float) -> float:
        at = max(now, self._next, self._paused_until)
        if self.per_hour is not None:
            while self._hour and self._hour[0] <= at - self.hour:
                self._hour.popleft()
            if len(self._hour) >= self.per_hour:
                at = max(at, self._hour[0] + self.hour)
        return at

    async def room(self) -> int:
        """Wait until a slot could be had, without taking it; returns how many the hourly
        window has left (so a caller can claim no more work than it can send soon)."""
        # a deadline that a 429 may push later, re-read after each sleep; not a handoff
        while (at := self._earliest(anyio.current_time())) > anyio.current_time():  # noqa: ASYNC110
            await anyio.sleep(at - anyio.current_time())
        return (self.per_hour - len(self._hour)) if self.per_hour is not None else 1 << 30

    def horizon(self, n: int) -> float:
        """Seconds until ``n`` more slots could have been handed out, at the current pace.

        An estimate, without waiting: the per-second pace, and for the hourly window the
        free room now, then a full window's worth each time the oldest slots roll out.
        """
        if n <= 0:
            return 0.0
        now = anyio.current_time()
        t = max(0.0, self._paused_until - now) + n / self.rate
        if self.per_hour is not None:
            room = self.per_hour - len(self._hour)
            if n > room:
                oldest = self._hour[0] if self._hour else now
                windows = math.ceil((n - room) / self.per_hour)
                t = max(t, oldest + self.hour - now + (windows - 1) * self.hour)
        return t

    async def slot(self) -> None:
        async with self._lock:
            now = anyio.current_time()
            at = self._earliest(now)
            if at > now:
                await anyio.sleep(at - now)
            self._next = at + 1.0 / self.rate
            if self.per_hour is not None:
                self._hour.append(at)

    def success(self) -> None:
        # additive increase: a tenth of the limit per second of successes, roughly
        if self.rate < self.limit:
            self.rate = min(self.limit, self.rate + self.limit / (10 * self.rate))

    def throttle(self, retry_after: float | None) -> None:
        """A 429: halve the pace and, if the server said how long, pause everyone that long."""
        self.throttled += 1
        self.rate = max(self.floor, self.rate / 2)
        now = anyio.current_time()
        pause = retry_after if retry_after is not None else 1.0 / self.rate
        self._paused_until = max(self._paused_until, now + min(pause, 3600.0))
