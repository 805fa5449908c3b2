"""A run of a batch: the scheduler's workers and the writer, driven to the end.

``execute`` is what ``Batch.run`` does: apply a rescue file left by a run that could not write,
send again what a killed run left mid-submit (counted as ambiguous), make the output file agree
with the database, and, if anything is left to do, connect and drive the scheduler and the
writer in one task group until every job is finished, a signal arrives (the CLI's SIGINT and
SIGTERM) or an error stops it; a run with nothing to send needs no credentials at all. The
report's counters are the increase of the same persistent counters ``status`` shows.

``Run`` is the object ``Batch.run`` returns: awaited, it gives the ``RunReport``; iterated, it
yields each ``Result`` as its job finishes, read back from the database after each commit, so
what a caller sees is exactly what is stored.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from runner import connect, output, reports
from runner.database import storage_error
from runner.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, Interrupted
from runner.jobs import Result
from runner.progress import snapshot
from runner.queue import TOP_SEQ, Queue
from runner.scheduler import Scheduler
from runner.writer import Writer, apply_rescue, release, reserve

if TYPE_CHECKING:
    from runner.batch import Batch

log = logging.getLogger("runner")


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


async def execute(batch: Batch, out_path: str | None, notify: Callable[[], None]) -> RunReport:
    """One run of ``batch`` to the end; ``notify`` is told after every commit."""
    db = await batch._open()
    found = await reports.counts(db)
    connect.refuse_emulator_batch(
        db.path, batch.endpoints, found["pending"] + found["submitting"] + found["running"]
    )
    queue = Queue(db)
    await apply_rescue(queue, batch.settings.context_budget)
    await anyio.to_thread.run_sync(reserve, db.path)  # room for ids a full disk would lose
    before = await reports.totals(db)
    recovered = await queue.recover()
    counts = await reports.counts(db)
    out = output.OutputFile(db, out_path, batch.jobs_path) if out_path else None
    try:
        written = 0
        if out is not None:
            await out.open()
            written = await out.export()
        outstanding = counts["pending"] + counts["running"]
        if not sum(counts.values()):
            why = f"{batch.jobs_path} holds none" if batch.jobs_path else "give a JOBS file to add some"
            log.warning("no jobs in %s: nothing to do (%s)", db.path, why)
        interrupted, throttled = False, 0
        if outstanding:
            creds = batch.credentials()
            async with connect.connect(creds, batch.endpoints, db.path, batch.request_timeout) as client:
                s = batch.settings
                writer = Writer(queue, out, budget=s.context_budget, on_applied=lambda _: None,
                                batch_window=s.batch_window, hold=s.hold_window,
                                patience=s.storage_patience)  # fmt: skip
                sch = Scheduler(queue, client, writer, s, creds.folder_id, outstanding)
                sch.listener = notify
                interrupted = await drive(batch, sch, writer, counts)
                written, throttled = written + writer.written, sch.stats.throttled
    finally:
        if out is not None:
            out.close()  # the file's lock goes with it
    after = await reports.totals(db)
    await anyio.to_thread.run_sync(release, db.path)
    return RunReport(
        await reports.counts(db), {k: after[k] - before[k] for k in reports.COUNTERS},
        recovered, written, throttled, interrupted,
    )  # fmt: skip


async def drive(batch: Batch, sch: Scheduler, writer: Writer, base: dict[str, int]) -> bool:
    """Run the scheduler's workers and the writer; True if a signal interrupted it."""
    interrupted = False

    async def until_done(workers: Any) -> None:
        await sch.done.wait()
        workers.cancel_scope.cancel()

    async def signals(workers: Any) -> None:
        nonlocal interrupted
        import signal

        if batch.interrupt is not None:  # the CLI listens from its start
            await batch.interrupt.wait()
        else:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                async for _ in received:
                    break
        log.warning("interrupted: finishing requests on the wire and saving state")
        interrupted = True
        workers.cancel_scope.cancel()

    async def progress() -> None:
        assert batch.progress is not None
        while True:
            await anyio.sleep(batch.progress_interval)
            batch.progress(await snapshot(sch, base, batch.prices))

    try:
        async with anyio.create_task_group() as outer:
            outer.start_soon(writer.run)
            try:
                async with anyio.create_task_group() as workers:
                    writer.on_fatal = workers.cancel_scope.cancel
                    batch.driving = True
                    if batch.handle_signals:  # first: a signal already received stops the rest
                        workers.start_soon(signals, workers)
                        await anyio.lowlevel.checkpoint()
                    await sch.run(workers)
                    workers.start_soon(until_done, workers)
                    if batch.progress is not None:
                        workers.start_soon(progress)
            finally:
                writer.close()
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    if batch.progress is not None:
        batch.progress(await snapshot(sch, base, batch.prices))
    return interrupted


def first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error to report from a task group: a RunnerError if there is one."""
    from runner.errors import RunnerError

    found = group.subgroup(lambda e: isinstance(e, RunnerError)) or group.subgroup(storage_error)
    error: BaseException = (found or group).exceptions[0]
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


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
        try:  # every error, the refusal to open included, is raised where the run is awaited
            db = await self.batch._open()
            self._seq = int(await db.value(TOP_SEQ) or 0)
            # looked up at each call: the iterator replaces the event after every wake-up
            self.report = await self.batch._execute(self.out, lambda: self._changed.set())
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
