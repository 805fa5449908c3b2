"""Benchmarks: runner against the SDK example's pattern, side by side, in every regime a user meets.

    python bench/run.py --regime latency          # one regime
    python bench/run.py --regime all              # all of them (about 45 minutes)
    python bench/run.py --ingest                  # ingest and status at 10k, 100k and 1M lines

Regimes (time is compressed by each regime's SCALE: quotas SCALE times faster, latencies
drawn as given, the SDK pattern's sleeps and runner's latency prior divided by SCALE):

    quota         20,000 jobs, the hourly window dominates (scale 36: a 100 s "hour")
    quota-bucket  the same against a token-bucket hourly quota
    latency       3,000 jobs at 100 submits/s, log-normal latency median 4 s, sigma 0.8, cap 40 s
    mixed         3,000 jobs at 100 submits/s, median latency 15 s (submitting ~2x a latency)
    small         5 jobs, latency uniform 60-300 s at scale 10 (6-30 s)
    long          3,000 jobs, median latency 60 s at scale 60 (an hour), far beyond submitting

The emulator (its own process) enforces exactly the quotas both contestants are given, and each
job's latency is a fixed draw from its request body, so both meet the same latencies. T_min is
the earliest any client submitting in input order could see the last result: max over jobs of
(the job's earliest submit slot under the quotas, with the emulator's window shape, + its
latency). "end" runs from the first submit the emulator saw to the last result a contestant
saw (the emulator notes when a poll first returned each operation done); "wall" is the
contestant's whole process. CPU and peak RSS are the contestant's own (wait4).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner import emulator as emu  # noqa: E402
from runner.polling import PollPolicy  # noqa: E402
from tests.procs import free_port  # noqa: E402

PY = sys.executable
PRIOR = PollPolicy.prior  # runner's default --latency-prior, real seconds


@dataclass(frozen=True)
class Regime:
    name: str
    jobs: int
    scale: float
    rps: float
    per_hour: int | None
    hour: float
    poll_rps: float
    lognormal: tuple[float, float] | None = None
    cap: float | None = None
    uniform: tuple[float, float] | None = None
    shape: str = "rolling"


REGIMES = {
    r.name: r
    for r in (
        Regime("quota", 20_000, 36, 360, 5000, 100, 1800, (120 / 36, 0.8)),
        Regime("quota-bucket", 20_000, 36, 360, 5000, 100, 1800, (120 / 36, 0.8), shape="bucket"),
        Regime("latency", 3000, 10, 100, 5000, 360, 500, (4.0, 0.8), cap=40.0),
        Regime("mixed", 3000, 10, 100, 5000, 360, 500, (15.0, 0.8), cap=150.0),
        Regime("small", 5, 10, 100, 5000, 360, 500, uniform=(6.0, 30.0)),
        Regime("long", 3000, 60, 600, 5000, 60, 3000, (60.0, 0.5), cap=200.0),
    )
}


def stats(url: str, detail: bool = False) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/emulator/stats{'?detail=1' if detail else ''}", timeout=30) as r:
        data: dict[str, Any] = json.load(r)
        return data


def emulator_args(r: Regime) -> list[str]:
    args = ["--seed", "1", "--submit-rps", str(r.rps), "--poll-rps", str(r.poll_rps),
            "--hour-seconds", str(r.hour), "--hour-shape", r.shape]  # fmt: skip
    if r.per_hour:
        args += ["--submit-per-hour", str(r.per_hour)]
    if r.lognormal:
        cap = f":{r.cap}" if r.cap else ""
        args += ["--lognormal", f"{r.lognormal[0]}:{r.lognormal[1]}{cap}"]
    else:
        assert r.uniform
        args += ["--latency", f"{r.uniform[0]}:{r.uniform[1]}"]
    return args


def start_emulator(r: Regime) -> tuple[subprocess.Popen[bytes], str]:
    return spawn_emulator(*emulator_args(r))


def spawn_emulator(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    """``runner emulator ARGS`` in its own process, once it answers; (process, base URL)."""
    port = free_port()
    cmd = [PY, "-m", "runner", "emulator", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            stats(url)
            return proc, url
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("emulator did not start")


def body(i: int) -> dict[str, Any]:
    """The request both contestants send for job i (runner's canonical form of the job)."""
    return {"modelUri": "gpt://bench/yandexgpt-lite/latest", "completionOptions": {"stream": False},
            "messages": [{"role": "user", "text": f"Write a short note about item {i}."}]}  # fmt: skip


def make_jobs(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"job-{i}", "prompt": body(i)["messages"][0]["text"]}) + "\n")


def latencies(r: Regime, seed: int = 1) -> list[float]:
    """Each job's latency, as the regime's emulator (``--seed 1``) draws it from the job's body."""
    config = emu.Config(seed=seed, lognormal=r.lognormal, latency_cap=r.cap,
                        latency=r.uniform or (0.05, 0.2))  # fmt: skip
    e = emu.Emulator(config)
    return [e.latency_of(body(i)) for i in range(r.jobs)]


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


def t_min(r: Regime) -> float:
    first = slots(r.jobs, r.rps, r.per_hour, r.hour, r.shape)
    return max(s + x for s, x in zip(first, latencies(r), strict=True))


def contestant(name: str, r: Regime, url: str, work: Path) -> list[str]:
    if name == "runner":
        return [PY, "-m", "runner", "-q", "run", str(work / "jobs.jsonl"), "--db",
                str(work / "runner.db"), "-o", str(work / "runner.out.jsonl"),
                "--submit-rps", str(r.rps), "--submit-per-hour", str(r.per_hour or 10**9),
                "--quota-window", str(r.hour), "--poll-rps", str(r.poll_rps),
                "--latency-prior", str(PRIOR / r.scale), "--llm-url", url, "--operation-url", url]  # fmt: skip
    return [PY, str(ROOT / "bench" / "sdk_pattern.py"), str(work / "jobs.jsonl"), url,
            str(r.scale), str(work / "sdk.out.jsonl")]  # fmt: skip


def wait_rusage(proc: subprocess.Popen[bytes]) -> tuple[int, float, float]:
    """Exit code, CPU seconds and peak RSS (MB) of the contestant alone. The peak is read
    from /proc (VmHWM, which exec resets): wait4's ru_maxrss would include this process's own
    RSS at fork time, which a child inherits on Linux."""
    peak = 0
    while True:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime, peak / 1024


def in_its_order(r: Regime, ops: list[dict[str, Any]]) -> float:
    """T_min for the order a contestant really submitted in (its jobs' first operations by
    creation time). A submit refused and sent again later leaves input order, and a job with a
    long latency moved ahead can end the run below the input-order T_min: this says by how much
    the order alone explains an end/T_min under 1."""
    index = {emu.body_key(body(i)): i for i in range(r.jobs)}
    order: dict[int, float] = {}
    for op in ops:
        i = index.get(op["body_key"])
        if i is not None and (i not in order or op["created"] < order[i]):
            order[i] = op["created"]
    lat = latencies(r)
    earliest = slots(r.jobs, r.rps, r.per_hour, r.hour, r.shape)
    ranked = sorted(order, key=order.__getitem__)
    return max(s + lat[i] for s, i in zip(earliest, ranked, strict=False))


def drain(name: str, r: Regime, tmin: float, work: Path) -> dict[str, Any]:
    emulator, url = start_emulator(r)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("YC_", "RUNNER_"))},
           "YC_API_KEY": "bench", "YC_FOLDER_ID": "bench", "PYTHONPATH": str(ROOT)}  # fmt: skip
    try:
        started = time.monotonic()
        with (work / f"{name}.stderr").open("wb") as err:
            proc = subprocess.Popen(contestant(name, r, url, work), env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        code, cpu, rss = wait_rusage(proc)
        wall = time.monotonic() - started
        seen = stats(url, detail=True)
    finally:
        emulator.terminate()
        emulator.wait()
    ops = seen["ops"]
    first = min(op["created"] for op in ops)
    last = max(op["seen_done_at"] or math.inf for op in ops)
    lags = [op["seen_done_at"] - op["ready_at"] for op in ops if op["seen_done_at"] is not None]
    ratios = [(op["seen_done_at"] - op["ready_at"]) / max(1e-9, op["ready_at"] - op["created"])
              for op in ops if op["seen_done_at"] is not None]  # fmt: skip
    requests = seen.get("requests", 0)
    refused = seen.get("submit_429", 0) + seen.get("poll_429", 0)
    return {
        "contestant": name, "exit": code, "end (s)": round(last - first, 1),
        "end / T_min": round((last - first) / tmin, 4),
        "T_min, its order (s)": round(in_its_order(r, ops), 1), "wall (s)": round(wall, 1),
        "polls/job": round(seen.get("polls", 0) / r.jobs, 3), "429s": refused,
        "429 share": f"{100 * refused / max(1, requests):.2f}%",
        "mean lag (s)": round(statistics.fmean(lags), 2) if lags else None,
        "lag/latency max": round(max(ratios), 1) if ratios else None,
        "mean lag/latency": round(statistics.fmean(ratios), 3) if ratios else None,
        "peak polls/s": seen.get("polls_peak_per_second", 0),
        "CPU s/1k": round(cpu / r.jobs * 1000, 2), "RSS MB": round(rss, 1),
    }  # fmt: skip


INGEST = """
import sys, time, anyio
from runner.database import Database
from runner.ingest import ingest
from runner.inputs import read_jobs
async def main():
    t = time.perf_counter()
    async with Database.open(sys.argv[2]) as db:
        added = await ingest(db, sys.argv[1], read_jobs(sys.argv[1], "yandexgpt-lite"))
    print(added.added, time.perf_counter() - t)
anyio.run(main)
"""


def ingest(n: int, work: Path) -> dict[str, Any]:
    jobs, db = work / f"ingest-{n}.jsonl", work / f"ingest-{n}.db"
    make_jobs(jobs, n)
    proc = subprocess.Popen([PY, "-c", INGEST, str(jobs), str(db)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    code, _, rss = wait_rusage(proc)  # first: a reaped process has no VmHWM (one short line waits)
    out = proc.stdout.read().decode().split()
    added, seconds = int(out[0]), float(out[1])
    row: dict[str, Any] = {"lines": n, "exit": code, "seconds": round(seconds, 1),
                           "lines/s": round(added / seconds), "peak RSS MB": round(rss, 1)}  # fmt: skip
    started = time.monotonic()
    status = subprocess.run([PY, "-m", "runner", "status", "--db", str(db), "--json"],
                            capture_output=True)  # fmt: skip
    row["status (s)"] = round(time.monotonic() - started, 2)
    row["status ok"] = status.returncode == 0 and json.loads(status.stdout)["total"] == n
    jobs.unlink()
    return row


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--regime", action="append", choices=[*REGIMES, "all"], default=[])
    ap.add_argument("--contestants", default="runner,sdk-pattern")
    ap.add_argument("--ingest", action="store_true")
    ap.add_argument("--json", help="Also write the raw figures here.")
    args = ap.parse_args()
    names = list(REGIMES) if "all" in args.regime else args.regime
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, {platform.platform()}\n", flush=True)  # fmt: skip
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = REGIMES[name]
            tmin = t_min(r)
            print(f"## {name}: {r.jobs} jobs, scale {r.scale:g}, {r.rps:g} submits/s, "
                  f"{r.per_hour} per {r.hour:g} s ({r.shape}), {r.poll_rps:g} polls/s; "
                  f"T_min = {tmin:.1f} s", flush=True)  # fmt: skip
            rows = []
            for who in args.contestants.split(","):
                work = Path(tmp) / f"{name}-{who}"
                work.mkdir()
                make_jobs(work / "jobs.jsonl", r.jobs)
                rows.append(drain(who, r, tmin, work))
            results[name] = {"t_min": tmin, "rows": rows}
            print(table(rows) + "\n", flush=True)
        if args.ingest:
            rows = [ingest(n, Path(tmp)) for n in (10_000, 100_000, 1_000_000)]
            results["ingest"] = rows
            print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
