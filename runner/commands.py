"""What each CLI command does, as async functions over plain options.

``cli`` parses flags and calls one of these through ``anyio.run``; they resolve credentials
from the environment, take the run lock, open the store, start the built-in emulator when asked
and hand over to the scheduler. Keeping them free of click makes them callable from tests and
benchmarks exactly as the CLI calls them.

Credentials come only from the environment (``YC_API_KEY`` or ``YC_IAM_TOKEN``, and
``YC_FOLDER_ID``; also the API docs' plain ``API_KEY``, ``IAM_TOKEN``, ``FOLDER_ID``) and stay in
memory: nothing here writes them to the database, the output or a log line.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO, Any

import aiohttp
import anyio

from runner import emulator as emu
from runner.api import DEFAULT_LLM_URL, DEFAULT_OPERATION_URL, Client, Credentials, check_url
from runner.errors import RunnerError, UsageError
from runner.inputs import DEFAULT_MODEL, model_uri, read_jobs
from runner.scheduler import Scheduler, Settings, Stats
from runner.store import RunLock, Store

log = logging.getLogger("runner")

EMULATOR_FOLDER = "emulator-folder"
EXIT_INTERRUPTED = 130


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


@dataclass
class RunOptions:
    jobs: str | None = None
    db: str = "runner.db"
    output: str | None = None
    model: str = DEFAULT_MODEL
    folder_id: str | None = None
    emulator: bool = False
    llm_url: str | None = None
    operation_url: str | None = None
    iam_token_command: str | None = None
    request_timeout: float = 60.0
    settings: Settings = field(default_factory=Settings)
    emulator_config: emu.Config = field(default_factory=emu.Config)


@dataclass
class RunReport:
    added: int
    known: int
    stats: Stats
    counts: dict[str, int]

    @property
    def exit_code(self) -> int:
        if self.stats.interrupted:
            return EXIT_INTERRUPTED
        return 1 if self.counts["failed"] else 0


def credentials(opts: RunOptions) -> Credentials:
    folder = opts.folder_id or _env("YC_FOLDER_ID", "FOLDER_ID")
    api_key = _env("YC_API_KEY", "API_KEY")
    token = _env("YC_IAM_TOKEN", "IAM_TOKEN")
    command = opts.iam_token_command or _env("RUNNER_IAM_TOKEN_COMMAND")
    if opts.emulator and not (api_key or token or command):
        return Credentials(folder or EMULATOR_FOLDER, api_key="emulator-key")
    if not (api_key or token or command):
        raise UsageError(
            "no credentials: set YC_API_KEY (a service account API key) or YC_IAM_TOKEN "
            "(or pass --iam-token-command), and YC_FOLDER_ID; or add --emulator to try the "
            "built-in emulator"
        )
    if not folder:
        raise UsageError("no folder id: set YC_FOLDER_ID or pass --folder-id")
    return Credentials(folder, api_key=api_key, iam_token=token, token_command=command)


def _remove_db(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


@contextlib.asynccontextmanager
async def _endpoints(opts: RunOptions) -> AsyncIterator[tuple[str, str]]:
    if opts.emulator:
        server, url = await emu.serve(emu.Emulator(opts.emulator_config), "127.0.0.1", 0)
        try:
            yield url, url
        finally:
            await server.cleanup()
        return
    llm = opts.llm_url or _env("RUNNER_LLM_URL") or DEFAULT_LLM_URL
    ops = opts.operation_url or _env("RUNNER_OPERATION_URL") or DEFAULT_OPERATION_URL
    yield check_url(llm, "--llm-url"), check_url(ops, "--operation-url")


async def run(opts: RunOptions) -> RunReport:
    creds = credentials(opts)
    try:
        default_uri = model_uri(opts.model, creds.folder_id)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    lock = RunLock(opts.db)
    lock.acquire()
    try:
        return await _run_locked(opts, creds, default_uri)
    finally:
        lock.release()


async def _run_locked(opts: RunOptions, creds: Credentials, default_uri: str) -> RunReport:
    existed = os.path.exists(opts.db) and os.path.getsize(opts.db) > 0
    added = known = 0
    try:
        async with Store.open(opts.db) as store:
            if opts.jobs:
                added, known = await store.ingest(
                    opts.jobs, read_jobs(opts.jobs, creds.folder_id, default_uri)
                )
                log.info("%s: %d new jobs, %d already known", opts.jobs, added, known)
            async with (
                _endpoints(opts) as (llm_url, op_url),
                aiohttp.ClientSession(raise_for_status=False) as session,
            ):
                client = Client(
                    session, creds, llm_url=llm_url, operation_url=op_url,
                    timeout=opts.request_timeout,
                )  # fmt: skip
                scheduler = Scheduler(store, client, opts.settings)
                stats = await scheduler.run()
            counts = await store.counts()
    except RunnerError:
        if not existed and not added:
            _remove_db(opts.db)  # leave no empty database behind a rejected first run
        raise
    return RunReport(added, known, stats, counts)


async def status(db: str) -> dict[str, Any]:
    _must_exist(db)
    async with Store.open(db) as store:
        counts = await store.counts()
        totals = await store.totals()
    usage = {
        k: totals[k]
        for k in ("inputTextTokens", "completionTokens", "reasoningTokens", "totalTokens")
    }
    return {
        "total": sum(counts.values()),
        **counts,
        "usage": usage,
        "ambiguousSubmits": totals["ambiguousSubmits"],
        "resubmits": totals["resubmits"],
        "faults": totals["faults"],
        "submits": totals["submits"],
    }


def _must_exist(db: str) -> None:
    if not os.path.exists(db):
        raise UsageError(f"{db}: no such database; run `runner run JOBS.jsonl --db {db}` first")


CSV_COLUMNS = (
    "id", "status", "text", "alternativeStatus", "inputTextTokens", "completionTokens",
    "reasoningTokens", "totalTokens", "modelVersion", "operationId", "attempts",
    "errorCode", "errorMessage",
)  # fmt: skip


def _csv_row(line: dict[str, Any]) -> list[Any]:
    usage = line.get("usage") or {}
    error = line.get("error") or {}
    flat = {**line, **usage, "errorCode": error.get("code"), "errorMessage": error.get("message")}
    return ["" if flat.get(c) is None else flat.get(c) for c in CSV_COLUMNS]


async def results(db: str, out: IO[str], fmt: str, state: str | None) -> int:
    _must_exist(db)
    n = 0
    writer = csv.writer(out) if fmt == "csv" else None
    if writer:
        writer.writerow(CSV_COLUMNS)
    async with Store.open(db) as store:
        async for line in store.iter_results(state):
            if writer:
                writer.writerow(_csv_row(line))
            else:
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            n += 1
    return n


async def emulator(host: str, port: int, config: emu.Config) -> None:
    server, url = await emu.serve(emu.Emulator(config), host, port)
    print(f"emulator listening on {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await server.cleanup()
