"""Benchmarks: runner against the SDK example's pattern, side by side, plus ingest and status.

    python bench/run.py                   # N=20,000 at time scale 36 (a quota "hour" is 100 s)
    python bench/run.py --jobs 3000       # a quicker look
    python bench/run.py --skip-ingest     # only the drain comparison

Time is compressed by SCALE: every quota is SCALE times faster (10*SCALE submits/s, 5,000
submits per 3600/SCALE s, 50*SCALE polls/s) and completion latency is log-normal with a median
of 120/SCALE s (sigma 0.8, a long tail). The emulator enforces exactly the quotas each
contestant is configured with. Each contestant runs as its own process against a fresh
emulator process; CPU and peak RSS are the contestant's own (wait4 rusage).

T_min = max(N / submit_rps, N / submit_per_hour) + p99 latency: the time the quota alone
needs to submit everything, plus the latency of a late job. A rolling hourly window lets the
first "hour" start at once, so a runner that uses it can finish a little under T_min.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import emulator_stats, free_port  # noqa: E402

PY = sys.executable


def wait_rusage(proc: subprocess.Popen[bytes]) -> tuple[int, float, float]:
    """(exit code, CPU seconds, peak RSS in MB) of a child, from wait4."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def start_emulator(
    scale: float, median: float, sigma: float
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [PY, "-m", "runner", "emulator", "--port", str(port), "--seed", "1",
           "--lognormal", f"{median}:{sigma}",
           "--submit-rps", str(10 * scale), "--submit-per-hour", "5000",
           "--hour-seconds", str(3600 / scale), "--poll-rps", str(50 * scale)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            emulator_stats(url)
            return proc, url
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("emulator did not start")


def contestant(name: str, jobs: Path, url: str, scale: float, work: Path) -> list[str]:
    if name == "runner":
        return [PY, "-m", "runner", "-q", "run", str(jobs), "--db", str(work / "runner.db"),
                "-o", str(work / "runner.out.jsonl"), "--submit-rps", str(10 * scale),
                "--submit-per-hour", "5000", "--quota-window", str(3600 / scale),
                "--poll-rps", str(50 * scale), "--llm-url", url, "--operation-url", url]  # fmt: skip
    return [PY, str(ROOT / "bench" / "sdk_pattern.py"), str(jobs), url, str(scale),
            str(work / "sdk.out.jsonl")]  # fmt: skip


def drain(
    name: str, n: int, scale: float, median: float, sigma: float, work: Path
) -> dict[str, Any]:
    jobs = work / "jobs.jsonl"
    emulator, url = start_emulator(scale, median, sigma)
    env = {**os.environ, "YC_API_KEY": "bench", "YC_FOLDER_ID": "bench"}
    try:
        started = time.monotonic()
        with (work / f"{name}.stderr").open("wb") as err:
            proc = subprocess.Popen(contestant(name, jobs, url, scale, work), env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        code, cpu, rss = wait_rusage(proc)
        elapsed = time.monotonic() - started
        stats = emulator_stats(url)
    finally:
        emulator.terminate()
        emulator.wait()
    out = work / ("runner.out.jsonl" if name == "runner" else "sdk.out.jsonl")
    finished = sum(1 for _ in out.open()) if out.exists() else 0
    p99 = median * math.exp(2.326 * sigma)
    t_min = max(n / (10 * scale), n / 5000 * (3600 / scale)) + p99
    requests = stats.get("requests", 0)
    throttled = stats.get("submit_429", 0) + stats.get("poll_429", 0)
    return {
        "contestant": name, "exit": code, "jobs": n, "finished": finished,
        "drain_s": round(elapsed, 1), "t_min_s": round(t_min, 1),
        "ratio": round(elapsed / t_min, 3),
        "polls_per_job": round(stats.get("polls", 0) / max(1, finished), 2),
        "submits": stats.get("submits", 0), "http_429": throttled,
        "429_share": round(throttled / max(1, requests), 4),
        "cpu_s_per_1k": round(cpu / n * 1000, 2), "peak_rss_mb": round(rss, 1),
    }  # fmt: skip


def make_jobs(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"job-{i}", "prompt": f"Write a short note about item {i}.",
                                "completionOptions": {"temperature": 0.3, "maxTokens": 200}}) + "\n")  # fmt: skip


INGEST = """
import sys, time, anyio
from runner.inputs import read_jobs
from runner.store import Store
async def main():
    t = time.perf_counter()
    async with Store.open(sys.argv[2]) as s:
        added, _ = await s.ingest(sys.argv[1], read_jobs(sys.argv[1], "f", "gpt://f/yandexgpt-lite/latest"))
    print(added, time.perf_counter() - t)
anyio.run(main)
"""


def ingest(n: int, work: Path) -> dict[str, Any]:
    jobs, db = work / f"ingest-{n}.jsonl", work / f"ingest-{n}.db"
    make_jobs(jobs, n)
    proc = subprocess.Popen([PY, "-c", INGEST, str(jobs), str(db)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = proc.stdout.read().decode().split()
    code, _, rss = wait_rusage(proc)
    added, seconds = int(out[0]), float(out[1])
    row: dict[str, Any] = {"lines": n, "exit": code, "added": added, "seconds": round(seconds, 1),
                           "lines_per_s": round(added / seconds), "peak_rss_mb": round(rss, 1)}  # fmt: skip
    started = time.monotonic()
    status = subprocess.run(
        [PY, "-m", "runner", "status", "--db", str(db), "--json"], capture_output=True
    )
    row["status_s"] = round(time.monotonic() - started, 2)
    row["status_ok"] = status.returncode == 0 and json.loads(status.stdout)["total"] == n
    jobs.unlink()
    return row


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--scale", type=float, default=36.0)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--ingest", default="10000,100000,1000000")
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--json", help="Also write the raw figures here.")
    args = ap.parse_args()
    median = 120.0 / args.scale
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{platform.platform()}")  # fmt: skip
    print(f"N={args.jobs}, scale={args.scale:g} (quota hour = {3600 / args.scale:g} s), "
          f"latency log-normal median {median:.2f} s sigma {args.sigma}\n")  # fmt: skip
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_jobs(work / "jobs.jsonl", args.jobs)
        rows = [drain(name, args.jobs, args.scale, median, args.sigma, work)
                for name in ("runner", "sdk-pattern")]  # fmt: skip
        results["drain"] = rows
        print(table(rows) + "\n", flush=True)
        if not args.skip_ingest:
            rows = [ingest(int(n), work) for n in args.ingest.split(",")]
            results["ingest"] = rows
            print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
