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

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from runner import connect, ingest, output, pricing, reports
from runner.credentials import Credentials
from runner.database import Database, RunLock, must_exist
from runner.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, Interrupted, UsageError
from runner.inputs import DEFAULT_MODEL, Spec, model_ref, read_jobs, spec_of
from runner.jobs import Result
from runner.progress import Snapshot, snapshot
from runner.queue import Queue
from runner.scheduler import Scheduler, Settings
from runner.writer import Writer, apply_rescue

log = logging.getLogger("runner")
T = TypeVar("T")
Jobs = str | os.PathLike[str] | Iterable[str | dict[str, Any]]


@dataclass(frozen=True)
class Quotas:
    """The API's quotas for this cloud (defaults: the documented ones)."""

    submit_rps: float = 10.0
    submit_per_hour: int | None = 5000
    poll_rps: float = 50.0
    sync_concurrency: int = 10
    hour: float = 3600.0  # the hourly window's length (shorter only in compressed-time tests)


@dataclass
class RunReport:
    counts: dict[str, int]
    this_run: dict[str, int]  # the status counters' increase during this run
    recovered: int = 0  # jobs found mid-submit from a killed run, sent again (ambiguous)
    written: int = 0  # lines appended to the output file
    throttled: int = 0  # 429 answers this run received (submits and polls)
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_SOME_FAILED if self.counts["failed"] else EXIT_OK


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
        self.settings = settings or Settings(
            submit_rps=q.submit_rps, submit_per_hour=q.submit_per_hour, poll_rps=q.poll_rps,
            sync_concurrency=q.sync_concurrency, quota_window=q.hour, mode=mode,
            max_faults=max_faults, max_resubmits=max_resubmits, op_deadline=op_deadline,
            resubmit_stuck=resubmit_stuck, context_budget=context_budget, max_outage=max_outage,
            retention=retention, storage_patience=storage_patience, probe_max=probe_max,
        )  # fmt: skip
        self.mode = self.settings.mode  # given settings (benchmarks, tests) keep their own
        self.endpoints = connect.Endpoints(llm_url, operation_url, emulator)
        self._creds = (credentials, folder_id, iam_token_command)
        self.request_timeout = request_timeout
        self.prices = prices if prices is not None else dict(pricing.ASYNC_PRICE_PER_1K)
        self.progress, self.progress_interval = progress, progress_interval
        self.handle_signals = False  # the CLI turns this on: SIGINT/SIGTERM end a run gracefully
        self.jobs_path: str | None = None
        self._lock = RunLock(self.path)
        self._db: Database | None = None
        self._stack_db = contextlib.AsyncExitStack()
        self._stack: contextlib.AsyncExitStack | None = None
        self._tg: Any = None
        self._created = False
        self._running = False

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
            raise _first_error(others or group) from None
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()

    async def _close(self) -> None:
        empty = False
        if self._db is not None:
            empty = self._created and not await self._db.value("SELECT COUNT(*) FROM jobs")
            await self._stack_db.aclose()
            self._db = None
        if empty:  # a database this Batch created and never filled: leave nothing behind
            for suffix in ("", "-wal", "-shm", ".lock", ".emulator"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path + suffix)
        self._lock.release()

    async def _open(self, write: bool = True) -> Database:
        if write:
            self._lock.acquire()
        if self._db is None:
            if not write:
                must_exist(self.path)
            self._created = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            self._stack_db = contextlib.AsyncExitStack()
            self._db = await self._stack_db.enter_async_context(Database.open(self.path))
        return self._db

    # -- jobs in ----------------------------------------------------------------------------

    async def add(self, jobs: Jobs) -> ingest.Added:
        """Store jobs (a JSONL file's path, or dicts and prompt strings) atomically."""
        self._refuse_while_running("add jobs")
        specs, where = self._specs(jobs)
        db = await self._open()
        added = await ingest.ingest(db, where, specs)
        for said in pricing.warnings(await self._models(db), self.mode):
            log.warning("%s", said)
        return added

    def _specs(self, jobs: Jobs) -> tuple[Iterable[Spec | Any], str]:
        if isinstance(jobs, str | os.PathLike):
            self.jobs_path = os.fspath(jobs)
            return read_jobs(self.jobs_path, self.model), self.jobs_path
        items = list(jobs)
        specs = [spec_of(item, i, f"jobs[{i}]", self.model) for i, item in enumerate(items)]
        # a Python item without an id is known by its position, as a JSONL line is by its line
        fixed = [s if not isinstance(s, Spec) or _has_id(items[s.line]) else
                 Spec(s.line, f"item-{s.line}", s.body, s.turns) for s in specs]  # fmt: skip
        return [s if isinstance(s, Spec) else _unline(s) for s in fixed], "jobs"

    async def _models(self, db: Database) -> set[str]:
        return {str(m) for (m,) in await db.rows("SELECT DISTINCT model FROM jobs") if m}

    async def check_output(self, path: str | os.PathLike[str]) -> None:
        """Refuse an output file runner may not write (``UsageError``), changing nothing."""
        if os.path.exists(self.path):
            await output.OutputFile(await self._open(), os.fspath(path), self.jobs_path).verify()
        else:
            output.check_target(os.fspath(path), self.path, self.jobs_path)
            if os.path.exists(path) and os.path.getsize(path) > 0:
                raise UsageError(f"-o {os.fspath(path)}: the file exists and runner has no "
                                 f"record of writing it for {self.path}; give a new -o path")  # fmt: skip

    def credentials(self) -> Credentials:
        """The credentials a run would use; ``UsageError`` if there are none."""
        return connect.credentials(*self._creds, emulator=self.endpoints.emulator)

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
        try:
            return await self._execute_locked(out_path, notify)
        finally:
            self._running = False

    async def _execute_locked(self, out_path: str | None, notify: Callable[[], None]) -> RunReport:
        db = await self._open()
        queue = Queue(db)
        await apply_rescue(queue, self.settings.context_budget)
        before = await reports.totals(db)
        recovered = await queue.recover()
        counts = await reports.counts(db)
        out = output.OutputFile(db, out_path, self.jobs_path) if out_path else None
        written = 0
        if out is not None:
            await out.open()
            written = await out.export()
        outstanding = counts["pending"] + counts["running"]
        if not sum(counts.values()):
            log.warning("no jobs in %s: nothing to do (give a JOBS file to add some)", db.path)
        interrupted, throttled = False, 0
        if outstanding:
            creds = self.credentials()
            async with connect.connect(creds, self.endpoints, db.path, self.request_timeout) as client:
                writer = Writer(queue, out, budget=self.settings.context_budget,
                                on_applied=lambda _: None, batch_window=self.settings.batch_window,
                                patience=self.settings.storage_patience)  # fmt: skip
                sch = Scheduler(queue, client, writer, self.settings, creds.folder_id, outstanding)
                sch.listener = notify
                interrupted = await self._drive(sch, writer, counts)
                written, throttled = written + writer.written, sch.stats.throttled
        after = await reports.totals(db)
        return RunReport(
            await reports.counts(db), {k: after[k] - before[k] for k in reports.COUNTERS},
            recovered, written, throttled, interrupted,
        )  # fmt: skip

    async def _drive(self, sch: Scheduler, writer: Writer, base: dict[str, int]) -> bool:
        """Run the scheduler's workers and the writer; True if a signal interrupted it."""
        interrupted = False

        async def until_done(workers: Any) -> None:
            await sch.done.wait()
            workers.cancel_scope.cancel()

        async def signals(workers: Any) -> None:
            nonlocal interrupted
            import signal

            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                async for _ in received:
                    log.warning("interrupted: finishing requests on the wire and saving state")
                    interrupted = True
                    workers.cancel_scope.cancel()
                    return

        async def progress() -> None:
            assert self.progress is not None
            while True:
                await anyio.sleep(self.progress_interval)
                self.progress(await snapshot(sch, base, self.prices))

        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(writer.run)
                try:
                    async with anyio.create_task_group() as workers:
                        writer.on_fatal = workers.cancel_scope.cancel
                        await sch.run(workers)
                        workers.start_soon(until_done, workers)
                        if self.handle_signals:
                            workers.start_soon(signals, workers)
                        if self.progress is not None:
                            workers.start_soon(progress)
                finally:
                    writer.close()
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        if self.progress is not None:
            self.progress(await snapshot(sch, base, self.prices))
        return interrupted

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
        await output.export_file(db, path, output.render(lines, fmt, request))
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
        return await Queue(await self._open()).retry(status, error_code)

    async def cancel(self, pending_only: bool = False) -> dict[str, int]:
        """Cancel pending jobs; ask the server to cancel running operations (see ``plan``)."""
        from runner.plan import cancel

        self._refuse_while_running("cancel")
        must_exist(self.path)
        return await cancel(self, pending_only)

    async def plan(self, jobs: Jobs, exact: bool = False) -> dict[str, Any]:
        """Validate jobs against the database, count and price them; store and send nothing."""
        from runner.plan import plan

        return await plan(self, jobs, exact)

    async def check(self) -> dict[str, Any]:
        """One free authenticated request: are key, folder, role and model right?"""
        from runner.plan import check

        return await check(self)


class Run:
    """One run of a batch: ``async for result in run`` as jobs finish, or ``await run``."""

    def __init__(self, batch: Batch, out: str | None) -> None:
        self.batch, self.out = batch, out
        self.report: RunReport | None = None
        self._error: BaseException | None = None
        self._finished = anyio.Event()
        self._changed = anyio.Event()
        self._started = False
        self._seq: int | None = None
        self._buffer: deque[Result] = deque()

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self.batch._tg.start_soon(self._main)

    async def _main(self) -> None:
        db = await self.batch._open()
        self._seq = int(await db.value("SELECT COALESCE(MAX(finish_seq), 0) FROM jobs") or 0)
        try:
            self.report = await self.batch._execute(self.out, self._changed.set)
        except Exception as e:
            self._error = e
        finally:
            self._finished.set()
            self._changed.set()

    def __aiter__(self) -> Run:
        return self

    async def __anext__(self) -> Result:
        self._start()
        while not self._buffer:
            finished = self._finished.is_set()
            if self._seq is not None and self.batch._db is not None:
                async for seq, line in output.lines_since(self.batch._db, self._seq):
                    self._seq = seq
                    self._buffer.append(Result.from_line(line))
            if self._buffer:
                break
            if finished:
                self._raise()
                raise StopAsyncIteration
            await self._changed.wait()
            self._changed = anyio.Event()
        return self._buffer.popleft()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
        if self.report is not None and self.report.interrupted:
            raise Interrupted("interrupted: state is saved; run the same call again to resume")

    async def wait(self) -> RunReport:
        self._start()
        await self._finished.wait()
        if self._error is not None:
            raise self._error
        assert self.report is not None
        return self.report

    def __await__(self) -> Generator[Any, None, RunReport]:
        return self.wait().__await__()


def _has_id(item: Any) -> bool:
    return isinstance(item, dict) and "id" in item


def _unline(problem: Any) -> Any:
    """A problem in a Python list is named ``jobs[i]``, without a line number."""
    return type(problem)(problem.path, 0, problem.field, problem.message)


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error to report from a task group: a RunnerError if there is one."""
    from runner.errors import RunnerError

    found = group.subgroup(lambda e: isinstance(e, RunnerError))
    error: BaseException = (found or group).exceptions[0]
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


# -- the blocking helper ---------------------------------------------------------------------------


def run(
    jobs: Jobs, db: str | os.PathLike[str] = "runner.db", *,
    output: str | os.PathLike[str] | None = None, **options: Any,
) -> list[Result]:  # fmt: skip
    """Add ``jobs``, run them and return their results in input order. Blocking.

    Calling it again with the same arguments resumes: finished jobs are not sent again.
    ``options`` are ``Batch``'s keyword arguments (``emulator=True``, ``model=...``, ...).
    """

    async def main() -> list[Result]:
        async with Batch(db, **options) as batch:
            items = jobs if isinstance(jobs, str | os.PathLike) else list(jobs)
            if isinstance(items, str | os.PathLike):
                batch.jobs_path = os.fspath(items)
            if output is not None:
                await batch.check_output(output)
            await batch.add(items)
            await batch.run(output=output)
            ids = None if isinstance(items, str | os.PathLike) else _ids(items)
            return await batch.results(ids=ids)

    return blocking(main)


def _ids(items: list[str | dict[str, Any]]) -> list[str]:
    return [str(x["id"]) if _has_id(x) else f"item-{i}" for i, x in enumerate(items)]  # type: ignore[index]


def blocking(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``fn`` to completion from synchronous code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        try:
            return anyio.run(fn)
        except KeyboardInterrupt:
            raise Interrupted("interrupted: state is saved; call again to resume") from None
    # a loop is running in this thread (Jupyter): run ours in a worker thread
    with anyio.from_thread.start_blocking_portal() as portal:
        future = portal.start_task_soon(fn)
        try:
            result: T = future.result()
            return result
        except KeyboardInterrupt:
            future.cancel()
            raise Interrupted("interrupted: state is saved; call again to resume") from None

