"""Replay a latency sample through the poll policy alone (no HTTP, no clock): a cheap way to
explore the trade-off between polls and the run's end before running the real benchmark.

    python bench/simulate.py                     # every regime, the default policy
    python bench/simulate.py --regime latency --set tail_share=0.003 --set growth=1.8

Submit slots follow the quotas exactly (per second and per hourly window, of the chosen shape);
each job's latency is drawn the way the emulator draws it; polls happen when the policy says.
T_min is the earliest any client could see the last result submitting in input order:
max over jobs of (its earliest submit slot + its latency). runner's own pacing margins are
applied to its submit times, so the simulation shows their cost too.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.polling import PollPolicy


@dataclass(frozen=True)
class Regime:
    name: str
    jobs: int
    rps: float
    per_hour: int | None
    hour: float
    median: float
    sigma: float
    cap: float | None = None
    uniform: tuple[float, float] | None = None
    shape: str = "rolling"
    prior: float = 15.0


REGIMES = {
    # 20,000 jobs at time scale 36: the hourly window dominates
    "quota": Regime("quota", 20_000, 360.0, 5000, 100.0, 120 / 36, 0.8),
    "quota-bucket": Regime("quota-bucket", 20_000, 360.0, 5000, 100.0, 120 / 36, 0.8, shape="bucket"),
    # a few thousand prompts, submitting about as long as the latency's tail
    "latency": Regime("latency", 3000, 100.0, None, 3600.0, 4.0, 0.8, cap=40.0),
    # submitting ~2x a typical latency
    "mixed": Regime("mixed", 3000, 100.0, None, 3600.0, 15.0, 0.8, cap=150.0),
    # 5 jobs of 1 to 5 minutes
    "small": Regime("small", 5, 10.0, None, 3600.0, 0, 0, uniform=(60.0, 300.0)),
    # latency far longer than submitting (hours at real scale, compressed 60x)
    "long": Regime("long", 6000, 100.0, None, 3600.0, 120.0, 0.5),
}


def latency(i: int, r: Regime) -> float:
    u = (int.from_bytes(hashlib.sha256(f"{r.name}:{i}".encode()).digest()[:8], "big") + 0.5) / 2**64
    if r.uniform:
        return r.uniform[0] + u * (r.uniform[1] - r.uniform[0])
    x = r.median * math.exp(r.sigma * statistics.NormalDist().inv_cdf(u))
    return x if r.cap is None else min(x, r.cap)


def slots(n: int, rate: float, per_hour: int | None, hour: float, shape: str,
          margin: float = 0.0) -> list[float]:  # fmt: skip
    """Earliest submit times under the quotas (``margin`` widens the window, as runner does)."""
    out: list[float] = []
    window = hour + margin
    for k in range(n):
        t = k / rate
        if per_hour is not None and k >= per_hour:
            if shape == "rolling":
                t = max(t, out[k - per_hour] + window)
            elif shape == "fixed":
                t = max(t, (k // per_hour) * window)
            else:  # bucket: capacity per_hour, refilled per_hour/hour per second, starting full
                t = max(t, (k - per_hour + 1) * window / per_hour)
        if out:
            t = max(t, out[-1])
        out.append(t)
    return out


def simulate(r: Regime, policy: PollPolicy, margin: float = 0.25) -> dict[str, Any]:
    lat = [latency(i, r) for i in range(r.jobs)]
    server = slots(r.jobs, r.rps, r.per_hour, r.hour, r.shape)
    t_min = max(s + x for s, x in zip(server, lat, strict=True))
    # runner paces with a rolling window (the safest assumption); a margin for clock skew
    sent = slots(r.jobs, r.rps, r.per_hour, r.hour, "rolling", margin) if r.per_hour else server
    last = sent[-1]
    heap: list[tuple[float, int, int]] = [(s, 1, k) for k, s in enumerate(sent)]
    heap.append((0.0, 2, 0))  # the scheduler's one-second tick: the horizon is recomputed
    heapq.heapify(heap)
    polls = [0] * r.jobs
    miss = [0.0] * r.jobs
    seen = [math.nan] * r.jobs
    running: set[int] = set()
    horizon_at, next_horizon = 0.0, 0.0
    per_second: dict[int, int] = {}
    while heap:
        t, kind, k = heapq.heappop(heap)
        if t >= next_horizon:  # the scheduler recomputes the horizon once a second
            slack = max(0.0, last - t)
            horizon_at = t + policy.horizon(slack, [(t - sent[j], miss[j]) for j in running])
            next_horizon = t + 1.0
            cap = max(horizon_at - t, policy.tail_share * t, policy.min_wait)
            if cap < math.inf and any(kd == 0 and due > t + cap for due, kd, _ in heap):
                heap = [(min(due, t + cap) if kd == 0 else due, kd, j) for due, kd, j in heap]
                heapq.heapify(heap)
        horizon = max(0.0, horizon_at - t) if horizon_at < math.inf else math.inf
        if kind == 2:
            if running or any(kd != 2 for _, kd, _ in heap[:1]):
                heapq.heappush(heap, (t + 1.0, 2, 0))
            continue
        if kind == 1:
            running.add(k)
            wait = policy.first_wait(slack=max(0.0, last - t), horizon=horizon, elapsed=t,
                                     scout=policy.scout(k))  # fmt: skip
            heapq.heappush(heap, (t + wait, 0, k))
            continue
        polls[k] += 1
        per_second[int(t)] = per_second.get(int(t), 0) + 1
        age = t - sent[k]
        if age >= lat[k]:
            seen[k] = t
            running.discard(k)
            policy.observe_done(miss[k], age)
        else:
            miss[k] = age
            wait = policy.next_wait(age, horizon=horizon, elapsed=t, scout=policy.scout(k),
                                    draining=t >= last)  # fmt: skip
            heapq.heappush(heap, (t + wait, 0, k))
    lags = [seen[k] - (sent[k] + lat[k]) for k in range(r.jobs)]
    return {
        "regime": r.name, "jobs": r.jobs, "t_min": round(t_min, 1), "end": round(max(seen), 1),
        "ratio": round(max(seen) / t_min, 4), "polls/job": round(sum(polls) / r.jobs, 3),
        "mean lag": round(statistics.fmean(lags), 2), "max lag": round(max(lags), 1),
        "lag/latency max": round(max(g / x for g, x in zip(lags, lat, strict=True)), 2),
        "peak polls/s": max(per_second.values()),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--regime", action="append", choices=sorted(REGIMES))
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="A PollPolicy field to change, e.g. tail_share=0.003.")  # fmt: skip
    ap.add_argument("--margin", type=float, default=0.25, help="runner's hourly-window margin (s)")
    args = ap.parse_args()
    rows = []
    for name in args.regime or list(REGIMES):
        r = REGIMES[name]
        overrides: dict[str, Any] = {"prior": r.prior}
        for item in args.set:
            key, _, value = item.partition("=")
            overrides[key] = float(value)
        rows.append(simulate(r, PollPolicy(**overrides), args.margin))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
