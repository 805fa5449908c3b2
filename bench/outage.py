"""An API outage in the middle of a batch, at real length: what is lost, what is spent, how fast
the run gets back to full pace.

    python bench/outage.py                       # 400 jobs at 20 submits/s, 3-minute 503 outage at 5 s
    python bench/outage.py --kind refuse         # connections refused instead (a partition)
    python bench/outage.py --tree /path/to/old   # the same scenario against another checkout too

The emulator (its own process) enforces the submit rate and switches to the outage at
``--outage-at`` seconds after it starts, for ``--length`` seconds. runner runs as a real
subprocess with its defaults (probe schedule 1 s doubling to 120 s). Reported per contestant:
exit code, jobs done / failed / lost (lost must be 0), faults charged to jobs, requests that
reached the emulator during the outage (refused connections cannot be counted there), the time
from the end of the outage to the first 5-second window at 90% of the submit rate, and the
whole run's length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import spawn_emulator  # noqa: E402

PY = sys.executable


def stats(url: str, detail: bool = False) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/emulator/stats{'?detail=1' if detail else ''}", timeout=10) as r:
        data: dict[str, Any] = json.load(r)
        return data


def emulator(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    return spawn_emulator("--seed", "1", "--latency", args.latency, "--submit-rps", str(args.rps),
                          "--outage", f"{args.outage_at}:{args.length}:{args.kind}")


def recovery(times: list[float], end: float, rate: float) -> float | None:
    """Seconds from ``end`` to the first 5 s window holding 90% of ``rate`` submits."""
    after = sorted(t for t in times if t >= end)
    for i, t in enumerate(after):
        j = i
        while j < len(after) and after[j] < t + 5.0:
            j += 1
        if j - i >= 0.9 * rate * 5.0:
            return round(t - end, 1)
    return None


def contestant(name: str, tree: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    work.mkdir()
    with (work / "jobs.jsonl").open("w") as f:
        for i in range(args.jobs):
            f.write(json.dumps({"id": f"j{i}", "prompt": f"note {i}"}) + "\n")
    proc_e, url = emulator(args)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("YC_", "RUNNER_"))},
           "YC_API_KEY": "bench", "YC_FOLDER_ID": "bench", "PYTHONPATH": str(tree),
           "RUNNER_LLM_URL": url, "RUNNER_OPERATION_URL": url}  # fmt: skip
    started = time.monotonic()
    try:
        run = subprocess.run([PY, "-m", "runner", "-q", "run", "jobs.jsonl", "-o", "out.jsonl",
                              "--submit-rps", str(args.rps)], cwd=work, env=env,
                             capture_output=True, text=True, timeout=args.length + 900)  # fmt: skip
        elapsed = time.monotonic() - started
        seen = stats(url, detail=True)
    finally:
        proc_e.terminate()
        proc_e.wait()
    lines = [json.loads(x) for x in (work / "out.jsonl").read_text().splitlines()] if (work / "out.jsonl").exists() else []
    con = sqlite3.connect(work / "runner.db")
    faults = con.execute("SELECT COALESCE(SUM(faults), 0) FROM jobs").fetchone()[0]
    con.close()
    done = sum(1 for x in lines if x["status"] == "done")
    failed = sum(1 for x in lines if x["status"] == "failed")
    return {
        "contestant": name, "exit": run.returncode, "done": done, "failed": failed,
        "lost": args.jobs - len({x["id"] for x in lines}), "faults charged": faults,
        "requests in outage": seen.get("outage_requests", 0), "submits": seen.get("submits", 0),
        "recovery to full pace (s)": recovery(seen.get("submit_times", []),
                                              args.outage_at + args.length, args.rps),
        "run (s)": round(elapsed, 1),
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(out + ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--rps", type=float, default=20.0)
    ap.add_argument("--outage-at", type=float, default=5.0)
    ap.add_argument("--length", type=float, default=180.0)
    ap.add_argument("--kind", choices=["503", "refuse", "reset"], default="503")
    ap.add_argument("--latency", default="0.5:3")
    ap.add_argument("--tree", help="Another checkout to run the same scenario against.")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{args.jobs} jobs at {args.rps:g} submits/s, latency U({args.latency}) s; {args.kind} "
          f"outage from {args.outage_at:g} s for {args.length:g} s\n")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(contestant("runner", ROOT, args, Path(tmp) / "runner"))
        if args.tree:
            rows.append(contestant(f"runner at {args.tree}", Path(args.tree), args, Path(tmp) / "other"))
    print(table(rows))
    return 0 if rows[0]["lost"] == 0 and rows[0]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
