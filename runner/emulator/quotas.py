"""Rate limits of three shapes behind one interface: ``admit(now) -> bool``.

The public docs give the quotas (10 submits/s, 5,000 submits/hour, 50 polls/s) but not the
shape of the hourly window, so the emulator offers all three plausible ones and a client is
benchmarked against each: ``RollingWindow`` (at most N events in any span: the strictest
reading, and the per-second quotas always use it), ``TokenBucket`` (capacity N refilled
continuously at N/span per second, starting full) and ``FixedWindow`` (at most N per
``[origin + k*span, origin + (k+1)*span)``).

Every quota takes the current time as an argument and never reads a clock, so each shape is a
pure state machine that unit tests drive through hours of simulated time without sleeping. An
``admit`` that returns ``True`` has consumed one unit; ``False`` consumes nothing.
"""

from __future__ import annotations

import collections
import math
from typing import Protocol

_EPSILON = 1e-9  # float slack, so that refills of exactly one unit are not lost to rounding


class Quota(Protocol):
    limit: float
    span: float

    def admit(self, now: float) -> bool: ...


class RollingWindow:
    """At most ``limit`` events in any ``span`` seconds."""

    def __init__(self, limit: float, span: float) -> None:
        self.limit = limit
        self.span = span
        self.events: collections.deque[float] = collections.deque()

    def admit(self, now: float) -> bool:
        while self.events and self.events[0] <= now - self.span:
            self.events.popleft()
        if len(self.events) >= self.limit:
            return False
        self.events.append(now)
        return True


class TokenBucket:
    """Capacity ``limit``, refilled continuously at ``limit / span`` per second, starting full."""

    def __init__(self, limit: float, span: float, now: float = 0.0) -> None:
        self.limit = limit
        self.span = span
        self.tokens = float(limit)
        self.last = now

    def admit(self, now: float) -> bool:
        if now > self.last:
            self.tokens = min(self.limit, self.tokens + (now - self.last) * self.limit / self.span)
            self.last = now
        if self.tokens < 1 - _EPSILON:
            return False
        self.tokens = max(0.0, self.tokens - 1)
        return True


class FixedWindow:
    """At most ``limit`` events per fixed window ``[origin + k*span, origin + (k+1)*span)``."""

    def __init__(self, limit: float, span: float, origin: float = 0.0) -> None:
        self.limit = limit
        self.span = span
        self.origin = origin
        self.window = -1
        self.count = 0

    def admit(self, now: float) -> bool:
        window = math.floor((now - self.origin) / self.span + _EPSILON)
        if window != self.window:
            self.window, self.count = window, 0
        if self.count >= self.limit:
            return False
        self.count += 1
        return True


def hourly(shape: str, limit: float, span: float, origin: float) -> Quota:
    """The hourly quota of the given shape; ``origin`` is when the emulator began serving."""
    if shape == "rolling":
        return RollingWindow(limit, span)
    if shape == "bucket":
        return TokenBucket(limit, span, origin)
    if shape == "fixed":
        return FixedWindow(limit, span, origin)
    raise ValueError(f"unknown hour shape {shape!r}")
