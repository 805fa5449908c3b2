"""Measurements for benchmarks: how late clients notice results, and how hard they poll.

For every operation the emulator knows when it became ready; ``seen_done`` records when a poll
first answered it ``done``. The gap is the *notice lag*: the time a result sat finished on the
server before the client learned of it. Its mean and maximum, and the largest lag relative to
the operation's own latency, say how well a client's polling schedule fits the latencies it
meets. ``polled`` keeps the busiest one-second bucket of poll requests (the peak load a client
puts on the operation endpoint); ``submitted`` keeps when each accepted submit arrived.

Aggregates are kept running (O(1) per event), so the default ``/emulator/stats`` answer stays
small and cheap; the per-operation lists are built only for ``?detail=1``. Times reported are
seconds relative to when the emulator began serving.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from runner.emulator.state import Op
from runner.emulator.wire import body_key


class Measurements:
    def __init__(self, origin_wall: float, origin_mono: float) -> None:
        self.origin_wall = origin_wall
        self.origin_mono = origin_mono
        self.submit_times: list[float] = []  # wall clock of accepted submits
        self.seen = 0
        self.lag_sum = 0.0
        self.lag_max = 0.0
        self.ratio_max = 0.0
        self._bucket = -1
        self._bucket_polls = 0
        self.polls_peak = 0

    def submitted(self, at: float) -> None:
        self.submit_times.append(at)

    def polled(self, now_mono: float) -> None:
        bucket = math.floor(now_mono - self.origin_mono)
        if bucket != self._bucket:
            self._bucket, self._bucket_polls = bucket, 0
        self._bucket_polls += 1
        self.polls_peak = max(self.polls_peak, self._bucket_polls)

    def seen_done(self, op: Op, now: float) -> None:
        """A poll at ``now`` (wall clock) answered ``op`` done; only the first one counts."""
        if op.seen_done_at is not None or op.cancelled:
            return
        op.seen_done_at = now
        lag = max(0.0, now - op.ready_at)
        self.seen += 1
        self.lag_sum += lag
        self.lag_max = max(self.lag_max, lag)
        if op.latency > 0:
            self.ratio_max = max(self.ratio_max, lag / op.latency)

    def summary(self) -> dict[str, Any]:
        return {
            "ops_seen_done": self.seen,
            "notice_lag_mean": self.lag_sum / self.seen if self.seen else 0.0,
            "notice_lag_max": self.lag_max,
            "notice_lag_ratio_max": self.ratio_max,
            "polls_peak_per_second": self.polls_peak,
        }

    def detail(self, ops: Iterable[Op]) -> dict[str, Any]:
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - self.origin_wall, 6)

        return {
            "ops": [
                {
                    "id": op.id,
                    "body_key": body_key(op.body),
                    "created": rel(op.created),
                    "ready_at": rel(op.ready_at),
                    "seen_done_at": rel(op.seen_done_at),
                }
                for op in ops
            ],
            "submit_times": [rel(t) for t in self.submit_times],
        }
