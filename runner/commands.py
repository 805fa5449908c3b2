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
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio

from runner import emulator as emu
from runner import pricing
from runner.api import DEFAULT_LLM_URL, DEFAULT_OPERATION_URL, Client, Credentials, check_url
from runner.backoff import Pacer
from runner.errors import Problem, RunnerError, UsageError
from runner.inputs import DEFAULT_MODEL, Spec, model_uri, read_jobs
from runner.progress import Progress
from runner.reports import must_exist
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
    prices: dict[str, float] = field(default_factory=lambda: dict(pricing.ASYNC_PRICE_PER_1K))
    progress: str = "off"  # "tty" | "plain" | "off"
    progress_interval: float = 10.0
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
                progress = Progress(scheduler, opts.prices, opts.progress, opts.progress_interval)
                stats = await scheduler.run(progress)
            counts = await store.counts()
    except RunnerError:
        if not existed and not added:
            _remove_db(opts.db)  # leave no empty database behind a rejected first run
        raise
    return RunReport(added, known, stats, counts)


@contextlib.asynccontextmanager
async def _locked_store(db: str) -> AsyncIterator[Store]:
    """The store, with the run lock held: operator actions never race a live run."""
    must_exist(db)
    lock = RunLock(db)
    lock.acquire()
    try:
        async with Store.open(db) as store:
            yield store
    finally:
        lock.release()


async def retry(db: str, states: tuple[str, ...], error_code: int | None) -> int:
    async with _locked_store(db) as store:
        return await store.retry(states, error_code)


async def cancel(opts: RunOptions, pending_only: bool) -> dict[str, int]:
    """Cancel pending jobs; ask the server to cancel running ones (best effort)."""
    report = {"cancelledPending": 0, "cancelledRunning": 0, "leftRunning": 0}
    async with _locked_store(opts.db) as store:
        report["cancelledPending"] = await store.cancel_pending()
        running = [] if pending_only else await store.running_operations()
        if not running:
            report["leftRunning"] = len(await store.running_operations())
            return report
        creds = credentials(opts)
        cancelled: list[int] = []
        async with (
            _endpoints(opts) as (llm_url, op_url),
            aiohttp.ClientSession() as session,
        ):
            client = Client(session, creds, llm_url=llm_url, operation_url=op_url,
                            timeout=opts.request_timeout)  # fmt: skip
            pacer = Pacer(opts.settings.poll_rps)
            for rowid, op_id in running:
                await pacer.slot()
                if await client.cancel(op_id):
                    cancelled.append(rowid)
        await store.mark_cancelled(cancelled)
        report["cancelledRunning"] = len(cancelled)
        report["leftRunning"] = len(running) - len(cancelled)
    return report


async def dry_run(opts: RunOptions) -> dict[str, Any]:
    """Validate the file against the database, count and price it; store and send nothing."""
    if not opts.jobs:
        raise UsageError("--dry-run needs a JOBS file")
    folder = opts.folder_id or _env("YC_FOLDER_ID", "FOLDER_ID") or EMULATOR_FOLDER
    try:
        default_uri = model_uri(opts.model, folder)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    existed = os.path.exists(opts.db)
    models: dict[str, int] = {}
    chars: dict[str, int] = {}

    def tally(items: Iterator[Spec | Problem]) -> Iterator[Spec | Problem]:
        # counted on the way into the (rolled-back) ingest: the file is read once
        for item in items:
            if isinstance(item, Spec):
                body = json.loads(item.body)
                uri = body["modelUri"]
                models[uri] = models.get(uri, 0) + 1
                text = sum(len(m.get("text", "")) for m in body["messages"])
                text += sum(len(t) for t in json.loads(item.turns)) if item.turns else 0
                chars[uri] = chars.get(uri, 0) + text
            yield item

    lock = RunLock(opts.db)
    lock.acquire()
    try:
        async with Store.open(opts.db) as store:
            added, known = await store.ingest(
                opts.jobs, tally(read_jobs(opts.jobs, folder, default_uri)), dry_run=True
            )
    finally:
        lock.release()
        if not existed:
            _remove_db(opts.db)
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock.path)
    tokens = {uri: round(n / CHARS_PER_TOKEN) for uri, n in chars.items()}
    return {
        "jobs": sum(models.values()),
        "new": added,
        "known": known,
        "models": {pricing.model_name(u): n for u, n in models.items()},
        "estimatedInputTokens": sum(tokens.values()),
        "cost": pricing.estimate(tokens, opts.prices, opts.settings.mode),
        "note": f"input tokens estimated at {CHARS_PER_TOKEN} characters per token; answers cost extra",
    }


CHARS_PER_TOKEN = 3.5


async def emulator(host: str, port: int, config: emu.Config) -> None:
    server, url = await emu.serve(emu.Emulator(config), host, port)
    print(f"emulator listening on {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await server.cleanup()
