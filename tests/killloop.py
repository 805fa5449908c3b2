"""kill -9 a real ``runner run`` at random moments, restart it, and check what survives.

Used by the test suite (>= 10 cycles) and by ``bench/killloop.py`` (50 cycles, 2,000 jobs). The
batch mixes plain prompts and three-turn chats; the cycles alternate between two output files,
and half-way a ``runner retry`` sends failed jobs again (the emulator fails a few operations on
purpose). The emulator runs as its own process so its counts (submits per request body) outlive
every killed runner; that is what shows whether a job was paid for twice. At the end, per job:
exactly one line in each output file, every chat's turns in order with each answer the one the
emulator gives for exactly the history sent on that turn, and every second submit of a request
explained by an ambiguous submit, a resubmit or a retry that runner itself recorded.
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

from runner.emulator import answer_for, body_key
from runner.inputs import expand
from tests.procs import child_env, emulator_process, emulator_stats, runner_cmd

FOLDER = "b1gtestfolder"


@dataclass
class KillLoopReport:
    jobs: int
    cycles: int
    killed_in_state: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    duplicate_lines: int = 0
    torn_lines: int = 0
    wrong_answers: int = 0  # a chat turn whose answer is not its own question's
    duplicate_submits: int = 0
    ambiguous_reported: int = 0
    unexplained_duplicates: int = 0
    retried: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicate_lines or self.torn_lines or self.wrong_answers
                    or self.unexplained_duplicates)  # fmt: skip


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


def make_batch(path: Path, n: int, chat_every: int = 4) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            if i % chat_every == 0:
                job: dict[str, Any] = {"id": f"c{i}", "turns": [f"chat {i} q{k}" for k in range(3)]}
            else:
                job = {"id": f"j{i}", "prompt": f"prompt number {i}"}
            f.write(json.dumps(job) + "\n")
    return path


def kill_loop(workdir: Path, n_jobs: int, cycles: int, seed: int = 1,
              latency: str = "0.2:1.0", max_sleep: float = 1.5) -> KillLoopReport:  # fmt: skip
    rng = random.Random(seed)
    jobs = make_batch(workdir / "jobs.jsonl", n_jobs)
    db = workdir / "runner.db"
    outputs = [workdir / "out.jsonl", workdir / "out2.jsonl"]
    report = KillLoopReport(n_jobs, cycles)
    started = time.monotonic()
    with emulator_process("--latency", latency, "--seed", str(seed),
                          "--op-error-rate", "0.03") as url:  # fmt: skip
        env = child_env(url)

        def cmd(out: Path) -> list[str]:
            return runner_cmd("run", str(jobs), "--db", str(db), "-o", str(out),
                              "--submit-rps", "200", "--poll-rps", "500")  # fmt: skip

        for cycle in range(cycles):
            proc = subprocess.Popen(cmd(outputs[cycle % 2]), cwd=workdir, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(rng.uniform(0.05, max_sleep))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            for state, n in db_states(db).items():
                report.killed_in_state[state] = report.killed_in_state.get(state, 0) + n
            if cycle == cycles // 2:
                retry = subprocess.run(runner_cmd("retry", "--db", str(db), "--json"), env=env,
                                       capture_output=True, timeout=60)  # fmt: skip
                report.retried = json.loads(retry.stdout)["moved"]
        for out in outputs:
            final = subprocess.run(cmd(out), cwd=workdir, env=env, capture_output=True, timeout=600)
            if final.returncode not in (0, 1):  # 1: some jobs failed, as the emulator intends
                raise RuntimeError(
                    f"final run exited {final.returncode}: {final.stderr.decode()[-2000:]}"
                )
        stats = emulator_stats(url)
        status = subprocess.run(runner_cmd("status", "--db", str(db), "--json"), env=env,
                                capture_output=True, timeout=60)  # fmt: skip
    report.ambiguous_reported = json.loads(status.stdout)["ambiguousSubmits"]
    check(report, db, outputs, stats["submits_per_body"])
    report.seconds = time.monotonic() - started
    return report


def check(report: KillLoopReport, db: Path, outputs: list[Path], per_body: dict[str, int]) -> None:
    con = sqlite3.connect(db)
    rows = {r[0]: r[1:] for r in con.execute(
        "SELECT j.id, COALESCE(j.origin, j.body), j.turns, j.state, j.ambiguous, j.resubmits, "
        "(SELECT COUNT(*) FROM job_history h WHERE h.job = j.rowid) FROM jobs j"
    )}  # fmt: skip
    con.close()
    report.lost += sum(1 for r in rows.values() if r[2] not in ("done", "failed"))
    last: dict[str, dict[str, Any]] = {}
    for out in outputs:  # each file on its own: one line per job, each line right
        seen: dict[str, int] = {}
        for raw in out.read_bytes().splitlines():
            try:
                line: dict[str, Any] = json.loads(raw)
            except ValueError:
                report.torn_lines += 1
                continue
            seen[line["id"]] = seen.get(line["id"], 0) + 1
            origin, turns = rows[line["id"]][0], rows[line["id"]][1]
            if turns is not None:
                _, wrong = chat_bodies(json.loads(origin), json.loads(turns), line)
                report.wrong_answers += wrong
            last[line["id"]] = line
        report.duplicate_lines += sum(n - 1 for n in seen.values())
        report.lost += report.jobs - len(seen)
    for job_id, (origin, turns, _, ambiguous, resubmits, retries) in rows.items():
        first = json.loads(origin)
        bodies = [first]
        if turns is not None:
            bodies, _ = chat_bodies(first, json.loads(turns), last.get(job_id, {}))
        sent = [per_body.get(body_key(json.loads(expand(json.dumps(b), FOLDER))), 0) for b in bodies]
        extra = sum(max(0, n - 1) for n in sent)
        report.duplicate_submits += extra
        # a second charge is only allowed where runner itself said why
        report.unexplained_duplicates += max(0, extra - ambiguous - resubmits - retries)


def chat_bodies(
    first: dict[str, Any], questions: list[str], line: dict[str, Any]
) -> tuple[list[dict[str, Any]], int]:
    """The request of every turn a chat's line shows (and of a failed turn), and how many of
    its answers are not the emulator's answer to exactly the history sent on that turn."""
    history = list(first["messages"])
    bodies, wrong = [], 0
    answered = line.get("turns", [])
    for k, turn in enumerate(answered):
        body = {**first, "messages": list(history)}
        bodies.append(body)
        if turn["text"] != answer_for(body) or history[-1]["text"] != questions[k]:
            wrong += 1
        history.append({"role": "assistant", "text": turn["text"]})
        if k + 1 < len(questions):
            history.append({"role": "user", "text": questions[k + 1]})
    if line.get("status") == "failed" and len(answered) < len(questions):
        bodies.append({**first, "messages": list(history)})  # the turn that failed
    if line.get("status") == "done":
        users = [m["text"] for m in line["messages"] if m["role"] == "user"]
        wrong += users[-len(questions):] != questions
    return bodies, wrong
