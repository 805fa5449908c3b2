"""Shared fixtures: a real emulator on loopback, real SQLite files, real environment variables."""

from __future__ import annotations

import json
import os
import sqlite3
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from runner import backoff
from runner import emulator as emu
from runner.batch import Batch
from runner.execution import RunReport
from runner.polling import PollPolicy
from runner.settings import Settings

SENTINEL_KEY = "sk-SENTINEL-7f3a9c"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("YC_API_KEY", "YC_IAM_TOKEN", "YC_FOLDER_ID", "API_KEY", "IAM_TOKEN", "FOLDER_ID",
                 "RUNNER_LLM_URL", "RUNNER_OPERATION_URL", "RUNNER_IAM_TOKEN_COMMAND", "RUNNER_DB"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("YC_API_KEY", SENTINEL_KEY)
    monkeypatch.setenv("YC_FOLDER_ID", "b1gtestfolder")
    monkeypatch.setenv("RUNNER_LATENCY_PRIOR", "0.2")  # the emulator answers in a second, not minutes
    backoff.set_testing(True)


class Emu:
    def __init__(self, emulator: emu.Emulator, server: TestServer) -> None:
        self.emulator = emulator
        self.server = server

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def stats(self) -> Any:
        return self.emulator.stats


@pytest.fixture
def make_emulator() -> Callable[..., Any]:
    servers: list[TestServer] = []

    async def start(**config: Any) -> Emu:
        config.setdefault("latency", (0.01, 0.05))
        config.setdefault("seed", 7)
        e = emu.Emulator(emu.Config(**config))
        server = TestServer(e.app(), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Emu(e, server)

    yield start


@pytest.fixture
async def emulator(make_emulator: Callable[..., Any]) -> AsyncIterator[Emu]:
    e = await make_emulator()
    yield e
    await e.server.close()


def write_jobs(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "".join(
            (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows
        ),
        encoding="utf-8",
    )
    return path


def fast_settings(**kw: Any) -> Settings:
    """Settings for tests: quotas far above what a test sends, short waits."""
    kw.setdefault("submit_rps", 200.0)
    kw.setdefault("submit_per_hour", None)
    kw.setdefault("poll_rps", 500.0)
    kw.setdefault("probe_first", 0.05)
    kw.setdefault("probe_max", 0.2)
    kw.setdefault("paid_probe_every", 0.2)
    kw.setdefault("policy", PollPolicy(prior=0.02, min_wait=0.01))
    return Settings(**kw)


def batch_for(e: Emu | None, tmp_path: Path, **kw: Any) -> Batch:
    kw.setdefault("settings", fast_settings())
    if e is not None:
        kw.setdefault("llm_url", e.url)
        kw.setdefault("operation_url", e.url)
    return Batch(tmp_path / "runner.db", **kw)


async def run_against(
    e: Emu | None, tmp_path: Path, jobs: Path | list[Any] | None, *,
    output: str | None = "out.jsonl", **kw: Any,
) -> RunReport:  # fmt: skip
    """Add ``jobs`` (a file or a list) and run the batch to the end, through the Python API."""
    async with batch_for(e, tmp_path, **kw) as batch:
        if jobs is not None:
            await batch.add(str(jobs) if isinstance(jobs, Path) else jobs)
        return await batch.run(output=str(tmp_path / output) if output else None)


def read_out(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def db_rows(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def execute(db: Path, sql: str, *args: Any) -> None:
    con = sqlite3.connect(db)
    with con:
        con.execute(sql, args)
    con.close()


def uncommit_last_line(db: Path, out: Path, keep: int) -> None:
    """Leave ``out`` as a kill in the middle of appending its last line would: the database's
    record of the file rewound to before that line, and ``keep`` bytes of it on disk."""
    data = out.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    previous = json.loads(data[:start].splitlines()[-1])["id"] if start else None
    con = sqlite3.connect(db)
    try:
        seq = con.execute("SELECT finish_seq FROM jobs WHERE id = ?", (previous,)).fetchone()
        con.execute(
            "UPDATE outputs SET last_seq = ?, size = ?, tail = ? WHERE path = ?",
            (seq[0] if seq else 0, start, f"crc32:{zlib.crc32(data[:start]):08x}",
             os.path.realpath(out)),
        )
        con.commit()
    finally:
        con.close()
    out.write_bytes(data[: start + keep])
