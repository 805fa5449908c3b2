"""Shared fixtures: a real emulator on loopback, real SQLite files, real environment variables."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from runner import backoff, commands
from runner import emulator as emu
from runner.polling import PollPolicy
from runner.scheduler import Settings

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
    kw.setdefault("submit_rps", 200.0)
    kw.setdefault("submit_per_hour", None)
    kw.setdefault("poll_rps", 500.0)
    kw.setdefault("policy", PollPolicy(initial=0.02, min_wait=0.01))
    return Settings(**kw)


async def run_against(
    e: Emu, tmp_path: Path, jobs: Path | None, *, output: str | None = "out.jsonl", **kw: Any
) -> commands.RunReport:
    out = str(tmp_path / output) if output else None
    settings = kw.pop("settings", None) or fast_settings(output=out)
    settings.output = out
    opts = commands.RunOptions(
        jobs=str(jobs) if jobs else None, db=str(tmp_path / "runner.db"), output=out,
        llm_url=e.url, operation_url=e.url, settings=settings, **kw,
    )  # fmt: skip
    return await commands.run(opts)


def read_out(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def db_rows(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()
