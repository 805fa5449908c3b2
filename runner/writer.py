"""The writer: the one task that commits outcomes, then extends the output file.

Workers send outcomes through an unbounded memory stream (producers are paced by the quotas, so
what waits there is at most the quota rate times a writer stall; a bound would turn a slow disk
into a crash). The writer commits them in batches of up to a thousand through ``Queue.apply``:
whatever a submit returned (an operation id, a sync answer, a refusal) within 20 ms, since a
kill before the commit leaves an ambiguous submit, and a chat's answer, whose next turn waits
for it; an operation's other outcomes within 250 ms, since losing one costs a poll, so that in
a busy run most answers share a commit (a commit is ~1 ms of CPU and an fsync) unless they may
be the last of the run. Finished jobs are appended to the output file at most every 250 ms
while the run goes on, and at once at its end. The writer lives outside the workers' task group
so that on Ctrl-C or a fatal error it drains and commits everything already sent before the
run ends.

When a commit fails for a storage reason (disk full, the file locked past SQLite's timeout), the
writer holds the batch, raises ``trouble`` (the submitter stops claiming) and retries with
backoff for ``patience`` seconds. If the database still cannot be written, the outcomes that
would cost money to lose (operation ids, sync answers) are written to ``<db>.rescue`` and the run
stops with ``StorageError``; the next start applies the rescue file before anything else, so
nothing is submitted twice. A failing output file stops the run the same way; the database
already holds every result and the next run completes the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from runner.database import FileGone, advice, side_file, storage_error
from runner.errors import StorageError
from runner.jobs import Answered, ApiFailure, Attempt, Completion, Failed, Outcome, Submitted
from runner.output import OutputFile, pwrite_all
from runner.queue import Applied, Queue

log = logging.getLogger("runner.writer")


class Writer:
    def __init__(
        self,
        queue: Queue,
        output: OutputFile | None,
        *,
        budget: int,
        on_applied: Callable[[Applied], None],
        batch_window: float = 0.02,
        hold: float = 0.25,
        patience: float = 60.0,
    ) -> None:
        self.queue = queue
        self.output = output
        self.budget = budget
        self.on_applied = on_applied
        self.on_fatal: Callable[[], None] = lambda: None  # stops the workers
        self.batch_window = batch_window
        self.hold = hold
        # jobs still to finish: a batch that may finish them all is committed at once, so the
        # last answer of a run never waits ``hold``
        self.remaining: Callable[[], int] = lambda: 1 << 62
        self._exported_at = -math.inf
        self._export_due = math.inf  # finite while finished jobs wait to be appended
        self.patience = patience
        self.written = 0
        self.trouble: str | None = None  # set while commits are failing
        self.recovered = anyio.Event()
        self.failed: StorageError | None = None
        self._db_failed = False
        self._kept = 0
        send, self._receive = anyio.create_memory_object_stream[Outcome](math.inf)
        self._send: MemoryObjectSendStream[Outcome] = send

    def emit(self, outcome: Outcome) -> None:
        self._send.send_nowait(outcome)

    def close(self) -> None:
        self._send.close()

    async def run(self) -> None:
        receive: MemoryObjectReceiveStream[Outcome] = self._receive
        batch: list[Outcome] = []
        due = math.inf  # when the batch must be committed
        async with receive:
            try:
                while True:
                    wait = min(due, self._export_due) - time.monotonic()
                    if wait > 0:
                        with anyio.move_on_after(wait):
                            batch.append(await receive.receive())
                            due = min(due, self._due(batch[-1]))
                    while len(batch) < 1000:  # whatever else is already there, no waiting
                        try:
                            batch.append(receive.receive_nowait())
                        except anyio.WouldBlock:
                            break
                        due = min(due, self._due(batch[-1]))
                    if batch and (due <= time.monotonic() or len(batch) >= 1000
                                  or len(batch) >= self.remaining()):  # fmt: skip
                        done, batch, due = batch, [], math.inf
                        await self.flush(done, final=False)
                    if self._export_due <= time.monotonic():
                        await self.export()
            except anyio.EndOfStream:
                await self.flush(batch)
            except anyio.get_cancelled_exc_class():
                # a worker failed: everything it sent is buffered; commit it before leaving
                with anyio.CancelScope(shield=True):
                    while True:
                        try:
                            batch.append(receive.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    await self.flush(batch)
                raise
        if self.failed is not None:
            raise StorageError(self.message())

    def _due(self, outcome: Outcome) -> float:
        """When an outcome must be committed. Within ``batch_window``: any outcome of a submit
        (until it commits the job is "submitting", and a kill makes it an ambiguous submit,
        paid again if it had an operation id or a sync answer), and a chat's answer (its next
        turn waits for the commit). An outcome of a running operation may wait ``hold`` for
        company: losing it costs a poll, not a token, and in a busy run most share a commit."""
        urgent = outcome.attempt.operation_id is None or (
            isinstance(outcome, Answered) and outcome.chat
        )
        return time.monotonic() + (self.batch_window if urgent else self.hold)

    async def flush(self, batch: list[Outcome], final: bool = True) -> None:
        """Commit a batch; after a storage failure, only keep what costs money to lose (the
        workers are being stopped meanwhile). The output is extended at most every ``hold``
        seconds while the run goes on, and at once at the end (``final``)."""
        if batch:
            with anyio.CancelScope(shield=True):
                if self._db_failed:
                    self._rescue(batch)
                    return
                try:
                    applied = await self._commit(batch)
                except _GaveUp as e:
                    self._db_failed = True
                    self._rescue(batch)
                    self._fail(f"cannot write {self.queue.db.path}: {e.error}")
                    return
            if applied.finished and self.output is not None:
                self._export_due = min(self._export_due, self._exported_at + self.hold)
            self.on_applied(applied)
        if final or self._export_due <= time.monotonic():
            await self.export()

    async def export(self) -> None:
        """Append the jobs finished since the last export to the output file."""
        waiting = self._export_due < math.inf
        self._export_due, self._exported_at = math.inf, time.monotonic()
        if not waiting or self.output is None or self.failed is not None:
            return
        with anyio.CancelScope(shield=True):
            try:
                self.written += await self.output.export()
            except StorageError as e:
                self._fail(str(e))
            except Exception as e:  # a read that failed: stop as cleanly, not with held outcomes
                log.exception("extending %s failed", self.output.path)
                self._fail(f"cannot extend {self.output.path} ({type(e).__name__}: {e})")

    def _fail(self, what: str) -> None:
        if self.failed is None:
            log.error("%s; stopping", what)
            self.failed = StorageError(what)  # completed with the rescue count at the end
            self.on_fatal()

    async def _commit(self, batch: list[Outcome]) -> Applied:
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                applied = await self.queue.apply(batch, self.budget)
            except FileGone as e:  # raised once: the file is still open, and what was sent is
                self._fail(f"cannot write {self.queue.db.path}: {e.strerror}")  # committed there
                continue
            except Exception as e:
                if not storage_error(e):
                    return await self._one_by_one(batch, e)
                attempt += 1
                waited = time.monotonic() - started
                if waited >= self.patience:
                    raise _GaveUp(e) from e
                if self.trouble is None:
                    log.error("cannot write %s (%s); holding %d outcomes and retrying",
                              self.queue.db.path, e, len(batch))  # fmt: skip
                    self.recovered = anyio.Event()
                self.trouble = str(e)
                await anyio.sleep(min(5.0, 0.1 * 2**attempt, self.patience - waited))
                continue
            if self.trouble is not None:
                log.warning("%s is writable again", self.queue.db.path)
                self.trouble = None
                self.recovered.set()
            return applied

    async def _one_by_one(self, batch: list[Outcome], error: Exception) -> Applied:
        """An outcome the store refuses (a value it cannot hold) must not take the others, and
        their operation ids, down with it: apply them one at a time; one that still fails is
        turned into its job's failure, or dropped with a log line if even that fails."""
        log.error("an outcome could not be stored (%s); applying the batch one by one", error)
        total = Applied()
        for outcome in batch:
            try:
                done = await self.queue.apply([outcome], self.budget)
            except Exception as e:
                if storage_error(e):
                    raise
                failure = ApiFailure(2, f"the answer could not be stored ({type(e).__name__})")
                try:
                    done = await self.queue.apply([Failed(outcome.attempt, time.time(), failure)])
                except Exception:
                    log.exception("dropped an outcome for job row %d", outcome.attempt.rowid)
                    continue
            for name in ("finished", "advanced", "requeued", "stale", "failed"):
                setattr(total, name, getattr(total, name) + getattr(done, name))
        return total

    def _rescue(self, batch: list[Outcome]) -> None:
        kept = [o for o in batch if isinstance(o, Submitted | Answered)]
        if not kept:
            return
        path = rescue_path(self.queue.db.path)
        try:
            saved = save_rescue(path, kept)
        except OSError:
            saved = 0
        self._kept += saved
        if saved < len(kept):
            log.error("could not save %d operation ids to %s: those jobs will count as "
                      "ambiguous submits on the rerun", len(kept) - saved, path)  # fmt: skip

    def message(self) -> str:
        assert self.failed is not None
        kept = (f"; {self._kept} operation ids and answers that could not be committed were "
                f"saved to {rescue_path(self.queue.db.path)}, applied on the next start"
                if self._kept else "")  # fmt: skip
        return f"{self.failed}{kept}. {advice(None)}"  # a deleted database: Batch._lost says


class _GaveUp(Exception):
    def __init__(self, error: Exception) -> None:
        self.error = error


# -- the rescue file: outcomes that could not be committed -------------------------------------
#
# A full disk is exactly when a new file cannot be written, so the rescue file's space is
# reserved when a run starts (RESERVE bytes of zeros, allocated) and records are written into
# it in place. Records are JSON lines; the first zero byte ends them. Applying them is
# idempotent (fenced like any outcome; a sync answer is recorded once per attempt), so a kill
# between applying and clearing them costs nothing.

RESERVE = 1 << 20


def rescue_path(db_path: str) -> str:
    return side_file(db_path, ".rescue")


def reserve(db_path: str) -> None:
    """Allocate the rescue file's space now, while the disk has room; best effort."""
    path = rescue_path(db_path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        log.warning("could not reserve %s (%s): a full disk may lose operation ids", path, e)
        return
    try:
        if os.fstat(fd).st_size < RESERVE:
            os.posix_fallocate(fd, 0, RESERVE)
            os.fsync(fd)
    except OSError as e:
        log.warning("could not reserve %s (%s): a full disk may lose operation ids", path, e)
    finally:
        os.close(fd)


def release(db_path: str) -> None:
    """The run ended cleanly: the reserve is not needed until the next one."""
    path = rescue_path(db_path)
    with contextlib.suppress(OSError), open(path, "rb") as f:
        if f.read(1) in (b"", b"\0"):
            os.unlink(path)


def _encode(o: Submitted | Answered) -> dict[str, Any]:
    a = o.attempt
    head = {"rowid": a.rowid, "fence": a.fence, "op": a.operation_id, "at": o.at}
    if isinstance(o, Submitted):
        return {**head, "submitted": o.operation_id}
    c = o.completion
    return {**head, "polls": o.polls, "answer": [c.text, c.alternative_status, c.usage,
                                                  c.model_version, c.tool_calls]}  # fmt: skip


def _decode(d: dict[str, Any]) -> Submitted | Answered:
    a = Attempt(d["rowid"], d["fence"], d["op"])
    if "submitted" in d:
        return Submitted(a, d["submitted"], d["at"])
    text, status, usage, version, tools = d["answer"]
    return Answered(a, d["at"], Completion(text, status, usage, version, tools), d["polls"])


def _records(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read().split(b"\0", 1)[0]


def save_rescue(path: str, outcomes: list[Submitted | Answered]) -> int:
    """Write the records after those already there, in the reserved space, one at a time;
    returns how many are whole on disk (a record cut short is zeroed, never left torn)."""
    at = len(_records(path)) if os.path.exists(path) else 0
    saved = 0
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for o in outcomes:
            record = (json.dumps(_encode(o), ensure_ascii=False) + "\n").encode()
            try:
                pwrite_all(fd, record, at)
            except OSError:
                with contextlib.suppress(OSError):
                    pwrite_all(fd, bytes(len(record)), at)
                break
            at, saved = at + len(record), saved + 1
        os.fsync(fd)
    finally:
        os.close(fd)
    return saved


async def apply_rescue(queue: Queue, budget: int) -> int:
    """Apply what a run that could not write its database saved, then clear it. (Before the
    rescue file was named after the database file itself, it was named as the database was
    reached: that one is read too.)"""
    applied = 0
    for path in dict.fromkeys((rescue_path(queue.db.path), queue.db.path + ".rescue")):
        applied += await _apply(queue, budget, path)
    return applied


async def _apply(queue: Queue, budget: int, path: str) -> int:
    if not os.path.exists(path):
        return 0
    raw = await anyio.to_thread.run_sync(_records, path)
    if not raw:
        return 0
    outcomes: list[Outcome] = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            outcomes.append(_decode(json.loads(line)))
    await queue.apply(outcomes, budget)

    def clear() -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            pwrite_all(fd, bytes(len(raw)), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    await anyio.to_thread.run_sync(clear)
    log.warning("applied %d outcomes saved in %s by a run that could not write", len(outcomes), path)
    return len(outcomes)
