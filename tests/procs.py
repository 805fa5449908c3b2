"""Helpers for tests that run runner as real subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import SENTINEL_KEY

ROOT = Path(__file__).resolve().parent.parent
# the runner under test is this tree's, unless RUNNER_TREE_UNDER_TEST names another checkout
# (used to show that a regression test fails on an older commit); the emulator is always ours
TREE = os.environ.get("RUNNER_TREE_UNDER_TEST", str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runner_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "runner", *args]


def child_env(url: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YC_", "RUNNER_"))}
    env.update(YC_API_KEY=SENTINEL_KEY, YC_FOLDER_ID="b1gtestfolder", RUNNER_ZERO_BACKOFF="1",
               PYTHONPATH=TREE, RUNNER_LATENCY_PRIOR="0.2")  # the emulator answers in seconds
    if url:
        env.update(RUNNER_LLM_URL=url, RUNNER_OPERATION_URL=url)
    env.update(extra)
    return env


def _emulator(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    """An emulator process on a free port, once it answers."""
    port = free_port()
    proc = subprocess.Popen(
        runner_cmd("emulator", "--port", str(port), *args),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/emulator/stats", timeout=1).read()
            return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("emulator did not start") from None
            time.sleep(0.05)


@contextmanager
def emulator_process(*args: str) -> Iterator[str]:
    proc, url = _emulator(*args)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def stoppable_emulator(*args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """An emulator the test may stop (SIGSTOP), killed at the end, requests held open or not."""
    import signal

    proc, url = _emulator(*args)
    try:
        yield url, proc
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def emulator_detail(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/emulator/stats?detail=1", timeout=10) as resp:
        data: dict[str, Any] = json.load(resp)
        return data


def emulator_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/emulator/stats", timeout=5) as resp:
        data: dict[str, Any] = json.load(resp)
        return data


def make_jobs(path: Path, n: int) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"j{i}", "prompt": f"prompt number {i}"}) + "\n")
    return path


def emulator_post(url: str, path: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    urllib.request.urlopen(req, timeout=5).read()


def run(args: list[str], cwd: Path, url: str | None = None, timeout: float = 120,
        **env: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``runner ARGS`` in a subprocess, to the end; text output."""
    return subprocess.run(runner_cmd(*args), cwd=cwd, env=child_env(url, **env),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def kill_when_running(cwd: Path, url: str, n: int, rps: str = "50", timeout: float = 20) -> None:
    """``runner run jobs.jsonl`` in ``cwd``, killed with SIGKILL once ``n`` of its jobs are
    running (or after ``timeout``): a run that died with operations in flight."""
    import signal
    import sqlite3

    def running() -> int:
        try:
            con = sqlite3.connect(cwd / "runner.db", timeout=10)
            try:
                return int(con.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone()[0])
            finally:
                con.close()
        except sqlite3.Error:
            return 0

    proc = subprocess.Popen(runner_cmd("run", "jobs.jsonl", "--submit-rps", rps), cwd=cwd,
                            env=child_env(url), stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + timeout
    while running() < n and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
