"""How long to wait before trying again: one small pure function, clamped.

``delay`` is capped exponential backoff with jitter (half fixed, half random, so retries of
many jobs spread out), overridden upward by a server's ``Retry-After`` (itself capped at an
hour). It is pure so it can be tested without a clock. Retries themselves are not loops around
a call here but rows put back in the queue with a ``next_at``, so a retry survives a restart;
that is why this is a function and not a retry decorator such as stamina's.

``set_testing(True)`` (or ``RUNNER_ZERO_BACKOFF=1`` for subprocesses) zeroes the waits, not
the pacing, which is the behaviour under test.
"""

from __future__ import annotations

import os
import random

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
