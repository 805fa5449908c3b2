"""Replay a regime's latencies through the poll policy alone (no HTTP, no clock): a cheap way to
explore the trade-off between polls and the run's end before running the real benchmark.

    python bench/simulate.py                     # every regime of bench/run.py, default policy
    python bench/simulate.py --regime latency --set tail_share=0.003 --set growth=1.8
    python bench/simulate.py --regime quota --detail   # polls per job along the input
    python bench/simulate.py --regime small --seeds 300  # over 300 latency draws, not one

The regimes are bench/run.py's own: the same jobs, the same latency draws (the emulator's), the
same quotas and the same compressed latency prior runner is given there, so a policy's polls
here are the ones the real run makes (checked: mixed 2.639 simulated, 2.638 measured). Submit
slots follow the quotas with runner's rolling-window pacing; polls happen when the policy says.
T_min is the earliest any client could see the last result submitting in input order: max over
jobs of (its earliest submit slot + its latency).
"""

from __future__ import annotations

import argparse
import heapq
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import PRIOR, REGIMES, Regime, latencies, slots
from runner.polling import PollPolicy


def simulate(
    r: Regime, policy: PollPolicy, margin: float = 0.25, seed: int = 1
) -> tuple[dict[str, Any], list[int]]:
    """The run's figures, and the polls each job took (``seed``: the emulator's latency draw)."""
    lat = latencies(r, seed)
    server = slots(r.jobs, r.rps, r.per_hour, r.hour, r.shape)
    t_min = max(s + x for s, x in zip(server, lat, strict=True))
    # runner paces with a rolling window (the safest assumption); a margin for clock skew
    sent = slots(r.jobs, r.rps, r.per_hour, r.hour, "rolling", margin) if r.per_hour else server
    last = sent[-1]
    heap: list[tuple[float, int, int]] = [(s, 1, k) for k, s in enumerate(sent)]
    heapq.heapify(heap)
    polls, miss, seen = [0] * r.jobs, [0.0] * r.jobs, [math.nan] * r.jobs
    running: set[int] = set()
    horizon_at, next_tick = math.inf, 0.0
    per_second: dict[int, int] = {}
    while heap:
        t, kind, k = heapq.heappop(heap)
        while t >= next_tick:  # the poller's one-second tick: the horizon, polls pulled in to it
            tick = next_tick
            ages = [(tick - sent[j], miss[j]) for j in running]
            horizon_at = tick + policy.horizon(max(0.0, last - tick), ages)
            next_tick = tick + 1.0
            cap = tick + max(horizon_at - tick, policy.tail_share * tick, policy.min_wait)
            slack = max(0.0, last - tick)
            if policy.replan(slack):  # first polls not made yet: from the estimate as it is now
                wait = policy.first_wait(slack=slack, horizon=math.inf, elapsed=tick)
                heap = [(max(t, sent[j] + wait), kd, j)
                        if kd == 0 and not polls[j] and not policy.scout(j) else (due, kd, j)
                        for due, kd, j in heap]  # fmt: skip
                heapq.heapify(heap)
            if cap < math.inf and any(kd == 0 and due > cap for due, kd, _ in heap):
                heap = [(min(due, cap) if kd == 0 else due, kd, j) for due, kd, j in heap]
                heapq.heapify(heap)
            if heap and heap[0][0] < t:
                heapq.heappush(heap, (t, kind, k))
                break
        else:
            horizon = max(0.0, horizon_at - t)
            if kind == 1:
                running.add(k)
                policy.at_once(len(running))
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
                if len(running) <= policy.last_few:  # the last ones' polls pulled in, as runner does
                    heap = [(min(due, t + policy.last_cap(t - sent[j], draining=t >= last,
                                                          running=len(running))), kd, j)
                            if kd == 0 else (due, kd, j) for due, kd, j in heap]  # fmt: skip
                    heapq.heapify(heap)
            else:
                miss[k] = age
                wait = policy.next_wait(age, horizon=horizon, elapsed=t, scout=policy.scout(k),
                                        draining=t >= last, running=len(running))  # fmt: skip
                heapq.heappush(heap, (t + wait, 0, k))
    lags = [seen[k] - (sent[k] + lat[k]) for k in range(r.jobs)]
    end_lag = max(seen) - max(s + x for s, x in zip(sent, lat, strict=True))
    return {
        "regime": r.name, "jobs": r.jobs, "t_min": round(t_min, 1), "end": round(max(seen), 1),
        "ratio": round(max(seen) / t_min, 4), "polls/job": round(sum(polls) / r.jobs, 3),
        "mean lag": round(statistics.fmean(lags), 2), "max lag": round(max(lags), 1),
        "mean lag/latency": round(statistics.fmean(g / x for g, x in zip(lags, lat, strict=True)), 3),
        "lag/latency max": round(max(g / x for g, x in zip(lags, lat, strict=True)), 2),
        "peak polls/s": max(per_second.values()), "end lag": round(end_lag, 2),
    }, polls  # fmt: skip


def over_draws(r: Regime, overrides: dict[str, Any], margin: float, n: int) -> dict[str, Any]:
    """The policy over ``n`` latency draws, and its end against the naive pattern's phase.

    Once its submits are done, the naive pattern polls everything every 10 s (real), so it
    sees the last result ``U`` after it is ready, ``U`` uniform in [0, 10 s) by the phase of its
    polls; runner, ``lag`` after. Runner is no later with probability ``1 - lag / 10 s``. This
    is the phase alone: where the naive pattern submits later (the quota regimes), it loses more.
    """
    period = 10.0 / r.scale
    runs = [simulate(r, PollPolicy(**overrides), margin, seed)[0] for seed in range(1, n + 1)]

    def spread(key: str) -> str:
        values = [run[key] for run in runs]
        return f"{statistics.fmean(values):.3f} (max {max(values):.3f})"

    lags = [run["end lag"] for run in runs]
    return {
        "regime": r.name, "draws": n, "end / T_min": spread("ratio"),
        "end lag (s)": f"{statistics.fmean(lags):.2f}", "naive's (s)": f"{period / 2:.2f}",
        "P(no later than naive)": f"{statistics.fmean(max(0.0, 1 - g / period) for g in lags):.2f}",
        "polls/job": spread("polls/job"), "mean lag / latency": spread("mean lag/latency"),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--regime", action="append", choices=sorted(REGIMES))
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="A PollPolicy field to change, e.g. tail_share=0.003.")  # fmt: skip
    ap.add_argument("--margin", type=float, default=0.25, help="runner's hourly-window margin (s)")
    ap.add_argument("--detail", action="store_true", help="polls per job, a twentieth at a time")
    ap.add_argument("--seeds", type=int, default=0, metavar="N",
                    help="Over N latency draws: how the end compares with the naive pattern's.")  # fmt: skip
    args = ap.parse_args()
    rows = []
    for name in args.regime or list(REGIMES):
        r = REGIMES[name]
        overrides: dict[str, Any] = {"prior": PRIOR / r.scale}
        for item in args.set:
            key, _, value = item.partition("=")
            overrides[key] = float(value)
        if args.seeds:
            rows.append(over_draws(r, overrides, args.margin, args.seeds))
            continue
        row, polls = simulate(r, PollPolicy(**overrides), args.margin)
        rows.append(row)
        step = max(1, r.jobs // 20)
        for a in range(0, r.jobs, step) if args.detail else ():
            part = polls[a : a + step]
            print(f"{name} jobs {a}-{a + len(part) - 1}: {sum(part) / len(part):.2f} polls/job")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
