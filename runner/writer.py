"""The writer: the one task that commits outcomes, then extends the output file.

Workers send outcomes through an unbounded memory stream (producers are paced by the quotas, so
what waits there is at most the quota rate times a writer stall; a bound would turn a slow disk
into a crash). The writer commits them in batches of up to a thousand, every few tens of
milliseconds, through ``Queue.apply``, and after each commit appends the newly finished jobs to
the output file. The writer lives outside the workers' task group so that on Ctrl-C or a fatal
error it drains and commits everything already sent before the run ends.

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

from runner.database import storage_error
from runner.errors import StorageError
from runner.jobs import Answered, Attempt, Completion, Outcome, Submitted
from runner.output import OutputFile
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
        patience: float = 60.0,
    ) -> None:
        self.queue = queue
        self.output = output
        self.budget = budget
        self.on_applied = on_applied
        self.on_fatal: Callable[[], None] = lambda: None  # stops the workers
        self.batch_window = batch_window
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
        async with receive:
            try:
                while True:
                    batch.append(await receive.receive())
                    with anyio.move_on_after(self.batch_window):
                        while len(batch) < 1000:
                            batch.append(await receive.receive())
                    done, batch = batch, []
                    await self.flush(done)
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

    async def flush(self, batch: list[Outcome]) -> None:
        """Commit a batch and extend the output; after a storage failure, only keep what
        costs money to lose (the workers are being stopped meanwhile)."""
        if not batch:
            return
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
            if applied.finished and self.output is not None and self.failed is None:
                try:
                    self.written += await self.output.export()
                except StorageError as e:
                    self._fail(str(e))
        self.on_applied(applied)

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
            except Exception as e:
                if not storage_error(e):
                    raise
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

    def _rescue(self, batch: list[Outcome]) -> None:
        kept = [o for o in batch if isinstance(o, Submitted | Answered)]
        if not kept:
            return
        path = rescue_path(self.queue.db.path)
        try:
            save_rescue(path, kept)
            self._kept += len(kept)
        except OSError as e:
            log.error("could not save %d operation ids to %s (%s): those jobs will count as "
                      "ambiguous submits on the rerun", len(kept), path, e.strerror)  # fmt: skip

    def message(self) -> str:
        assert self.failed is not None
        kept = (f"; {self._kept} operation ids and answers that could not be committed were "
                f"saved to {rescue_path(self.queue.db.path)}, applied on the next start"
                if self._kept else "")  # fmt: skip
        return (f"{self.failed}{kept}. Every committed state is intact: free space (or fix what "
                "blocks the file) and rerun the same command to resume")  # fmt: skip


class _GaveUp(Exception):
    def __init__(self, error: Exception) -> None:
        self.error = error


# -- the rescue file: outcomes that could not be committed -----------------------------------------


def rescue_path(db_path: str) -> str:
    return db_path + ".rescue"


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


def save_rescue(path: str, outcomes: list[Submitted | Answered]) -> None:
    data = "".join(json.dumps(_encode(o), ensure_ascii=False) + "\n" for o in outcomes).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


async def apply_rescue(queue: Queue, budget: int) -> int:
    """Apply what a run that could not write its database saved; fenced like any outcome."""
    path = rescue_path(queue.db.path)
    if not os.path.exists(path):
        return 0
    outcomes: list[Outcome] = []
    for line in (await anyio.Path(path).read_text(encoding="utf-8")).splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            outcomes.append(_decode(json.loads(line)))
    await queue.apply(outcomes, budget)
    os.unlink(path)
    log.warning("applied %d outcomes saved in %s by a run that could not write", len(outcomes), path)
    return len(outcomes)
