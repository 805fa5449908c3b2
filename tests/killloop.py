"""kill -9 a real ``runner run`` at random moments, restart it, and check what survives.

Used by the test suite (>= 10 cycles) and by ``bench/killloop.py`` (50 cycles, 2,000 jobs).
The emulator runs as its own process so its counts (submits per request body) outlive every
killed runner; that is what shows whether a job was paid for twice.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.emulator import body_key
from tests.procs import child_env, emulator_process, emulator_stats, make_jobs, runner_cmd


@dataclass
class KillLoopReport:
    jobs: int
    cycles: int
    killed_in_state: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    duplicate_lines: int = 0
    torn_lines: int = 0
    duplicate_submits: int = 0
    ambiguous_reported: int = 0
    unexplained_duplicates: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (
            self.lost or self.duplicate_lines or self.torn_lines or self.unexplained_duplicates
        )


def db_states(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    except sqlite3.Error:
        return {}
    finally:
        con.close()


def kill_loop(workdir: Path, n_jobs: int, cycles: int, seed: int = 1,
              latency: str = "0.2:1.0", max_sleep: float = 1.5) -> KillLoopReport:  # fmt: skip
    rng = random.Random(seed)
    jobs = make_jobs(workdir / "jobs.jsonl", n_jobs)
    db, out = workdir / "runner.db", workdir / "out.jsonl"
    report = KillLoopReport(n_jobs, cycles)
    started = time.monotonic()
    with emulator_process("--latency", latency, "--seed", str(seed)) as url:
        env = child_env(url)
        cmd = runner_cmd("run", str(jobs), "--db", str(db), "-o", str(out),
                         "--submit-rps", "200", "--poll-rps", "500")  # fmt: skip
        for _ in range(cycles):
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(rng.uniform(0.05, max_sleep))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            for state, n in db_states(db).items():
                report.killed_in_state[state] = report.killed_in_state.get(state, 0) + n
        final = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, timeout=600)
        if final.returncode != 0:
            raise RuntimeError(
                f"final run exited {final.returncode}: {final.stderr.decode()[-2000:]}"
            )
        stats = emulator_stats(url)
        status = subprocess.run(runner_cmd("status", "--db", str(db), "--json"), env=env,
                                capture_output=True, timeout=60)  # fmt: skip
    report.ambiguous_reported = json.loads(status.stdout)["ambiguousSubmits"]

    seen: dict[str, int] = {}
    for raw in out.read_bytes().splitlines():
        try:
            line: dict[str, Any] = json.loads(raw)
        except ValueError:
            report.torn_lines += 1
            continue
        seen[line["id"]] = seen.get(line["id"], 0) + 1
    report.duplicate_lines = sum(n - 1 for n in seen.values())
    report.lost = n_jobs - len(seen)

    con = sqlite3.connect(db)
    rows = con.execute("SELECT body, ambiguous, state FROM jobs").fetchall()
    con.close()
    per_body = stats["submits_per_body"]
    for body, ambiguous, state in rows:
        extra = per_body.get(body_key(json.loads(body)), 0) - 1
        report.duplicate_submits += max(0, extra)
        # a second charge is only allowed where runner itself said "ambiguous"
        report.unexplained_duplicates += max(0, extra - ambiguous)
        if state != "done":
            report.lost += 1
    report.seconds = time.monotonic() - started
    return report
