"""The Python API: the same durable batches from a script, a notebook or the command line.

``Batch`` is an async context manager over one database. ``add`` takes the jobs (a JSONL path,
or a list of dicts and plain prompt strings) and stores them atomically after validating them
as the CLI does; ``run`` submits and polls, and is both an async iterator of results as they
finish and an awaitable of the run's report; ``results``, ``status``, ``show``, ``retry``,
``cancel``, ``plan`` and ``check`` do what the CLI commands of the same names do, because the
CLI calls exactly these. Anything that changes the database takes the run lock first and keeps
it until the ``Batch`` closes; reading needs no lock.

``runner.run(prompts, db=...)`` is the blocking helper: it adds, runs and returns the results in
input order. Called again with the same arguments it resumes (nothing is paid twice, nothing is
lost, even after the kernel or process was killed). Inside Jupyter, where an event loop is
already running, it runs its own loop in a worker thread, and an interrupt stops it gracefully.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from runner import connect, exports, ingest, output, pricing, reports
from runner.credentials import Credentials
from runner.database import Database, RunLock, must_exist, side_file, storage_guard
from runner.errors import StorageError, UsageError
from runner.execution import Run, RunReport, execute, first_error
from runner.inputs import DEFAULT_MODEL, Spec, model_ref, read_jobs, spec_of
from runner.jobs import Result
from runner.polling import PollPolicy
from runner.progress import Snapshot
from runner.queue import Queue
from runner.settings import Settings
from runner.writer import apply_rescue

log = logging.getLogger("runner")
Jobs = str | os.PathLike[str] | Iterable[str | dict[str, Any]]


def as_list(jobs: Iterable[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
    """The items of a Python list of jobs; ``UsageError`` for one job object (a dict iterates
    over its keys, which would run "id" and "prompt" as prompts)."""
    if isinstance(jobs, Mapping | bytes) or not isinstance(jobs, Iterable):
        raise UsageError(f"jobs: give a list of prompts or job objects, not {type(jobs).__name__}")
    return list(jobs)


def listed(jobs: Jobs) -> bool:
    """Jobs given as a Python list (problems name ``jobs[i]``), not as a file."""
    return not isinstance(jobs, str | os.PathLike)


@dataclass(frozen=True)
class Quotas:
    """The API's quotas for this cloud (defaults: the documented ones)."""

    submit_rps: float = 10.0
    submit_per_hour: int | None = 5000
    poll_rps: float = 50.0
    sync_concurrency: int = 10
    hour: float = 3600.0  # the hourly window's length (shorter only in compressed-time tests)


EMULATOR_PRIOR = 1.0  # seconds: the built-in emulator's default latency is 0.05-0.2 s


class Batch:
    def __init__(
        self,
        db: str | os.PathLike[str] = "runner.db",
        *,
        model: str = DEFAULT_MODEL,
        folder_id: str | None = None,
        credentials: Credentials | None = None,
        quotas: Quotas | None = None,
        mode: str = "async",
        emulator: bool = False,
        llm_url: str | None = None,
        operation_url: str | None = None,
        iam_token_command: str | None = None,
        request_timeout: float = 60.0,
        max_faults: int = 5,
        max_resubmits: int = 2,
        op_deadline: float = 24 * 3600.0,
        resubmit_stuck: bool = False,
        context_budget: int = 32768,
        max_outage: float | None = None,
        retention: float = 3 * 24 * 3600.0,
        storage_patience: float = 60.0,
        probe_max: float = 120.0,
        latency_prior: float | None = None,
        prices: dict[str, float] | None = None,
        progress: Callable[[Snapshot], None] | None = None,
        progress_interval: float = 10.0,
        settings: Settings | None = None,
    ) -> None:
        if mode not in ("async", "sync"):
            raise UsageError(f"mode: {mode!r}; use 'async' or 'sync'")
        try:
            self.model = model_ref(model)
        except ValueError as e:
            raise UsageError(f"--model: {e}") from None
        self.path = os.fspath(db)
        self.mode = mode
        q = quotas or Quotas()
        if latency_prior is None:  # the docs say minutes; the built-in emulator answers at once
            latency_prior = EMULATOR_PRIOR if emulator else PollPolicy.prior
        for name, value, least in (
            ("quotas.submit_rps", q.submit_rps, 0.01), ("quotas.poll_rps", q.poll_rps, 0.01),
            ("quotas.hour", q.hour, 0.1), ("request_timeout", request_timeout, 0.1),
            ("op_deadline", op_deadline, 1e-3), ("retention", retention, 0.0),
            ("max_outage", 0.0 if max_outage is None else max_outage, 0.0),
            ("storage_patience", storage_patience, 0.0), ("probe_max", probe_max, 0.05),
            ("latency_prior", latency_prior, 1e-3), ("progress_interval", progress_interval, 0.01),
        ):  # as the CLI's options: nan passes every comparison, inf overflows the pacers
            if not (math.isfinite(value) and value >= least):
                option = "--" + name.split(".")[-1].replace("_", "-")
                raise UsageError(f"{name} ({option}): {value!r}; give a finite number from {least:g}")
        self.settings = settings or Settings(
            submit_rps=q.submit_rps, submit_per_hour=q.submit_per_hour, poll_rps=q.poll_rps,
            sync_concurrency=q.sync_concurrency, quota_window=q.hour, mode=mode,
            max_faults=max_faults, max_resubmits=max_resubmits, op_deadline=op_deadline,
            resubmit_stuck=resubmit_stuck, context_budget=context_budget, max_outage=max_outage,
            retention=retention, storage_patience=storage_patience, probe_max=probe_max,
            policy=PollPolicy(prior=latency_prior),
        )  # fmt: skip
        self.mode = self.settings.mode  # given settings (benchmarks, tests) keep their own
        self.endpoints = connect.Endpoints(llm_url, operation_url, emulator)
        self._creds = (credentials, folder_id, iam_token_command)
        self.request_timeout = request_timeout
        self.prices = prices if prices is not None else dict(pricing.ASYNC_PRICE_PER_1K)
        self.progress, self.progress_interval = progress, progress_interval
        self.handle_signals = False  # the CLI turns this on: SIGINT/SIGTERM end a run gracefully
        # the CLI's: set on SIGINT/SIGTERM; ``driving`` once the run's workers start
        self.interrupt: anyio.Event | None = None
        self.driving = False
        self.jobs_path: str | None = None
        self._lock = RunLock(self.path)
        self._db: Database | None = None
        self._stack_db = contextlib.AsyncExitStack()
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: Any = None
        self._created = ""  # "new", "empty" (a 0-byte file was there) or ""
        self._running = False
        self._gone: StorageError | None = None  # the database was deleted or replaced mid-run

    # -- lifetime -------------------------------------------------------------------------

    async def __aenter__(self) -> Batch:
        self._stack = contextlib.AsyncExitStack()
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        return self

    async def __aexit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        assert self._stack is not None
        try:
            self._tg.cancel_scope.cancel()
            await self._stack.__aexit__(kind, error, tb)
        except BaseExceptionGroup as group:
            # the task group wraps whatever the body raised: hand the caller its own exception
            _, others = group.split(lambda e: e is error)
            if others is None and error is not None:
                return  # falls through: the body's exception propagates unchanged
            raise first_error(others or group) from None
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()

    async def _close(self) -> None:
        empty = False
        if self._db is not None:
            empty = bool(self._created) and not await self._db.value("SELECT COUNT(*) FROM jobs")
            await self._stack_db.aclose()
            self._db = None
        if empty:
            self._forget()
        self._lock.release()

    def _forget(self) -> None:
        """A database this Batch created and never filled: leave nothing behind."""
        if not self._created:
            return
        for suffix in ("-wal", "-shm", ".lock", ".emulator"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(side_file(self.path, suffix))
        if self._created == "new":  # the file itself: --db may be a link to where it was made
            with contextlib.suppress(FileNotFoundError):
                os.remove(side_file(self.path, ""))
        else:  # an empty file the user made (say with mkstemp) is left as it was: empty
            with contextlib.suppress(FileNotFoundError):
                os.truncate(side_file(self.path, ""), 0)

    async def _open(self, write: bool = True) -> Database:
        if self._gone is not None:  # its file is gone: what it held is in the copy named
            raise StorageError(str(self._gone))
        if write:
            self._lock.acquire()
        if self._db is None:
            if not write:
                must_exist(self.path)
            self._created = "new" if not os.path.exists(self.path) else (
                "empty" if os.path.getsize(self.path) == 0 else "")
            self._stack_db = contextlib.AsyncExitStack()
            try:
                self._db = await self._stack_db.enter_async_context(Database.open(self.path))
            except BaseException:  # cancelled (Ctrl-C) or refused while it was being made
                self._forget()
                raise
        return self._db

    # -- jobs in ----------------------------------------------------------------------------

    async def add(self, jobs: Jobs) -> ingest.Added:
        """Store jobs (a JSONL file's path, or dicts and prompt strings) atomically."""
        self._refuse_while_running("add jobs")
        specs, where = self._specs(jobs)
        db = await self._open()
        with storage_guard(self.path):
            added = await ingest.ingest(db, where, specs, listed=listed(jobs))
        for said in pricing.warnings(await self._models(db), self.mode):
            log.warning("%s", said)
        return added

    def _specs(self, jobs: Jobs) -> tuple[Iterable[Spec | Any], str]:
        if isinstance(jobs, str | os.PathLike):
            self.jobs_path = os.fspath(jobs)
            return read_jobs(self.jobs_path, self.model), self.jobs_path
        items = as_list(jobs)
        specs = [spec_of(item, i, "jobs", self.model) for i, item in enumerate(items)]
        # a Python item without an id is known by its position, as a JSONL line is by its line
        fixed = [s if not isinstance(s, Spec) or has_id(items[s.line]) else
                 Spec(s.line, f"item-{s.line}", s.body, s.turns) for s in specs]  # fmt: skip
        return fixed, "jobs"

    async def _models(self, db: Database) -> set[str]:
        return {str(m) for (m,) in await db.rows("SELECT DISTINCT model FROM jobs") if m}

    async def check_output(self, path: str | os.PathLike[str]) -> None:
        """Refuse an output file runner may not write (``UsageError``), changing nothing."""
        if os.path.exists(self.path):
            await output.OutputFile(await self._open(), os.fspath(path), self.jobs_path).verify()
        else:
            output.check_target(os.fspath(path), self.path, self.jobs_path)
            output.check_free(os.fspath(path))
            if os.path.exists(path) and os.path.getsize(path) > 0:
                raise UsageError(f"-o {os.fspath(path)}: the file exists and runner has no "
                                 f"record of writing it for {self.path}; give a new -o path")  # fmt: skip

    def credentials(self) -> Credentials:
        """The credentials a run would use; ``UsageError`` if there are none."""
        return connect.credentials(*self._creds, emulator=self.endpoints.emulator)

    async def require_credentials(self, jobs: Jobs | None = None) -> None:
        """Refuse (``UsageError``), before anything is stored, a run that would send something
        without credentials: ``jobs`` adds new ones, or some are left unfinished. A run with
        nothing to send (say, writing a new -o after the batch finished) needs none. Refuse the
        same run of a batch begun with the built-in emulator, without it."""
        try:
            self.credentials()
            missing: UsageError | None = None
        except UsageError as e:
            missing = e
        if missing is None and not os.path.exists(side_file(self.path, ".emulator")):
            return
        unfinished = 0
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            found = await reports.counts(await self._open())
            unfinished = found["pending"] + found["submitting"] + found["running"]
        if not unfinished and jobs is not None:
            unfinished = (await self.plan(jobs))["new"]
        connect.refuse_emulator_batch(self.path, self.endpoints, unfinished)
        if missing is not None and unfinished:
            raise missing

    # -- running ----------------------------------------------------------------------------

    def run(self, *, output: str | os.PathLike[str] | None = None) -> Run:
        """Submit and poll until every job is finished; iterate it, or await it."""
        return Run(self, os.fspath(output) if output is not None else None)

    def _refuse_while_running(self, what: str) -> None:
        if self._running:
            raise UsageError(f"cannot {what} while this batch is running")

    async def _execute(self, out_path: str | None, notify: Callable[[], None]) -> RunReport:
        self._refuse_while_running("start a second run")
        self._running = True
        out_folder = os.path.dirname(os.path.abspath(out_path)) if out_path else None  # cwd may go
        try:
            with storage_guard(self.path):
                report = await execute(self, out_path, notify)
        finally:
            self._running = False
            if self._db is not None and self._db.check_gone():  # whatever else ended the run
                with anyio.CancelScope(shield=True):
                    self._gone = await self._lost(self._db, out_folder)
                    raise self._gone  # this error is the news
        return report

    async def _lost(self, db: Database, out_folder: str | None) -> StorageError:
        """The database was deleted or replaced mid-run: what the open file holds (every
        operation id sent) is copied out, so the operations still running can be collected
        (with the built-in emulator's state, which holds them in an emulator batch)."""
        try:
            copy = await db.save_copy(also=(out_folder,) if out_folder else ())
        except (OSError, sqlite3.Error) as e:
            saved = f"its state could not be copied out ({e}): the operations still running are lost"
        else:
            with contextlib.suppress(OSError):
                shutil.copyfile(side_file(self.path, ".emulator"), copy + ".emulator")
            saved = (f"its state, every operation id sent included, was saved to {copy}: run again "
                     f"with --db {copy} (and the same -o) to collect what is still running")  # fmt: skip
        return StorageError(f"{db.gone}; the run stopped and sent nothing more; {saved}")

    # -- reading ----------------------------------------------------------------------------

    async def results(
        self, status: str | None = None, ids: list[str] | None = None
    ) -> list[Result]:
        """Finished jobs: all in finishing order, or those named by ``ids`` in that order."""
        db = await self._open(write=False)
        if ids is None:
            states = (status,) if status else ("done", "failed", "cancelled")
            return [Result.from_line(line) async for _, line in output.lines_since(db, 0, states)]
        found: dict[str, Result] = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            rows = await db.rows(
                f"SELECT {output.COLUMNS} FROM jobs WHERE finish_seq IS NOT NULL AND id IN "
                f"({','.join('?' * len(part))})",
                *part,
            )
            found.update((r["id"], Result.from_line(output.result_line(r))) for r in rows)
        return [found[i] for i in ids if i in found]

    async def export(self, path: str, fmt: str = "jsonl", status: str | None = None,
                     request: bool = False) -> int:  # fmt: skip
        """Write results to a file (through a temporary file and os.replace); lines written."""
        db = await self._open(write=False)
        states = (status,) if status else ("done", "failed", "cancelled")
        lines = [line async for _, line in output.lines_since(db, 0, states, request)]
        await exports.export_file(db, path, exports.render(lines, fmt, request))
        return len(lines)

    async def status(self) -> dict[str, Any]:
        return await reports.status(await self._open(write=False), self.prices)

    async def jobs(self, state: str | None = None, limit: int = 50) -> tuple[list[dict[str, Any]], int]:
        return await reports.jobs(await self._open(write=False), state, limit)

    async def show(self, job_id: str) -> dict[str, Any] | None:
        return await reports.show(await self._open(write=False), job_id)

    # -- operator actions -----------------------------------------------------------------

    async def retry(self, status: tuple[str, ...] = ("failed",), error_code: int | None = None) -> int:
        """Move failed (or cancelled) jobs back to pending, keeping their history."""
        self._refuse_while_running("retry")
        must_exist(self.path)
        with storage_guard(self.path):
            queue = Queue(await self._open())
            await apply_rescue(queue, self.settings.context_budget)  # ids a full disk kept apart
            return await queue.retry(status, error_code)

    async def cancel(self, pending_only: bool = False) -> dict[str, int]:
        """Cancel pending jobs; ask the server to cancel running operations (see ``plan``)."""
        from runner.plan import cancel

        self._refuse_while_running("cancel")
        must_exist(self.path)
        with storage_guard(self.path):
            await apply_rescue(Queue(await self._open()), self.settings.context_budget)
            return await cancel(self, pending_only)

    async def plan(self, jobs: Jobs, exact: bool = False) -> dict[str, Any]:
        """Validate jobs against the database, count and price them; store and send nothing."""
        from runner.plan import plan

        return await plan(self, jobs, exact)

    async def check(self) -> dict[str, Any]:
        """One free authenticated request: are key, folder, role and model right?"""
        from runner.plan import check

        return await check(self)


def has_id(item: Any) -> bool:
    return isinstance(item, dict) and "id" in item
