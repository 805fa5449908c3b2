"""The run loop: submit within the quota, poll within the quota, write outcomes in batches.

One anyio task group holds the workers: the submitter claims a few pending jobs at a time (the
claim commits ``submitting`` before any request leaves), waits for a slot from the submit pacer
(per second and per rolling hour, halved on 429) and sends each in its own task; the poller
keeps a heap of running operations ordered by when each is next worth polling (``polling``)
and polls the due ones within the poll quota; the loader feeds it the operations a previous
run left running. Outcomes go through one memory stream to the writer, which commits them in
batches and then appends finished jobs to the output file.

The writer lives in an outer group so it outlasts the workers: on Ctrl-C/SIGTERM, or when a
worker hits a fatal error, the workers are cancelled first (a submit already on the wire is
shielded for a short grace period so its operation id is not lost), then the stream is closed
and the writer drains and commits everything sent to it. Nothing is committed per job on the
hot path except the claim, which is batched too.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import signal
import time
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from runner.api import ApiError, Client
from runner.backoff import Pacer, delay
from runner.errors import FatalApiError
from runner.jobs import ApiFailure, Claim, Running
from runner.polling import PollPolicy
from runner.progress import Progress
from runner.store import Finished, Requeue, Store, Submitted, Update

log = logging.getLogger("runner.scheduler")


@dataclass
class Settings:
    submit_rps: float = 10.0
    submit_per_hour: int | None = 5000
    quota_window: float = 3600.0  # seconds in the hourly quota's window (compressed in benchmarks)
    poll_rps: float = 50.0
    mode: str = "async"  # or "sync": POST /completion, no polling
    sync_concurrency: int = 10
    max_faults: int = 5
    submit_concurrency: int = 0  # 0: enough for the pace (rate x 100 ms), at least 4
    poll_concurrency: int = 64
    op_deadline: float = 24 * 3600.0
    resubmit_stuck: bool = False
    context_budget: int = 32768  # tokens a chat's next turn may need (history + answer)
    output: str | None = None
    batch_window: float = 0.02
    policy: PollPolicy = field(default_factory=PollPolicy)


@dataclass
class Stats:
    submitted: int = 0
    polls: int = 0
    finished: int = 0
    failed: int = 0
    throttled: int = 0
    faults: int = 0
    resubmits: int = 0
    recovered: int = 0
    written: int = 0
    interrupted: bool = False


class Scheduler:
    def __init__(
        self,
        store: Store,
        client: Client,
        settings: Settings,
    ) -> None:
        self.store = store
        self.client = client
        self.s = settings
        self.policy = settings.policy
        self.stats = Stats()
        sync = settings.mode == "sync"
        self.submit_pacer = Pacer(
            settings.submit_rps,
            None if sync else settings.submit_per_hour,
            hour=settings.quota_window,
        )
        self.poll_pacer = Pacer(settings.poll_rps)
        self._heap: list[tuple[float, int, Running]] = []
        self._seq = itertools.count()
        self._heap_changed = anyio.Event()
        self._work_changed = anyio.Event()
        self._all_done = anyio.Event()
        self.outstanding = 0
        self.draining = False
        self._started = 0.0
        self._send: MemoryObjectSendStream[Update] | None = None
        self._inflight = 0
        self.base: dict[str, int] = {}
        self.total = 0

    # -- the whole run ------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Jobs not yet submitted (or waiting to be resubmitted), from in-memory counts."""
        return max(0, self.outstanding - self.tracked)

    def slack(self) -> float:
        """How long the run goes on in any case: the quota's time to submit what is pending."""
        return self.submit_pacer.horizon(self.pending)

    @property
    def tracked(self) -> int:
        """Operations the poller is watching (or, in sync mode, requests on the wire)."""
        return len(self._heap) + self._inflight

    async def run(self, progress: Progress | None = None) -> Stats:
        self.stats.recovered = await self.store.recover()
        counts = await self.store.counts()
        self.base = counts
        self.total = sum(counts.values())
        self.outstanding = counts["pending"] + counts["running"]
        if self.s.output:
            await self.store.open_output(self.s.output)
            self.stats.written += await self.store.export(self.s.output)
        if self.outstanding == 0:
            return self.stats
        self._started = anyio.current_time()
        # unbounded: producers are paced by the quotas, so what waits here is at most the
        # quota rate times a writer stall; a bound would turn a slow disk into a crash
        send, receive = anyio.create_memory_object_stream[Update](math.inf)
        self._send = send
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._writer, receive)
            try:
                async with anyio.create_task_group() as workers:
                    workers.start_soon(self._until_done, workers)
                    if progress is not None:
                        workers.start_soon(progress.run)
                    workers.start_soon(self._signals, workers)
                    workers.start_soon(self._submitter, workers)
                    if self.s.mode == "async":
                        workers.start_soon(self._poller, workers)
                        workers.start_soon(self._loader)
            finally:
                send.close()
        return self.stats

    async def _until_done(self, workers: TaskGroup) -> None:
        await self._all_done.wait()
        workers.cancel_scope.cancel()

    async def _signals(self, workers: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                log.warning("interrupted: finishing requests on the wire and saving state")
                self.stats.interrupted = True
                workers.cancel_scope.cancel()
                return

    def _emit(self, update: Update) -> None:
        assert self._send is not None
        self._send.send_nowait(update)

    # -- submitting ---------------------------------------------------------------------

    async def _submitter(self, workers: TaskGroup) -> None:
        if self.s.mode == "sync":
            concurrency = self.s.sync_concurrency
        else:
            concurrency = self.s.submit_concurrency or max(4, math.ceil(self.s.submit_rps * 0.1))
        limiter = anyio.Semaphore(concurrency)
        while True:
            # first whether there is anything to send at all: with nothing pending, waiting
            # for quota room would hide that the run is draining (and delay its tail rule
            # by up to an hour)
            next_at = await self.store.next_pending_at()
            if next_at is None or next_at > time.time():
                await self._wait_for_work(next_at)
                continue
            # claim what the pacer will let out in the next ~100 ms: few jobs are ever
            # "submitting" at once, so a kill leaves few ambiguous submits behind
            batch = max(1, min(64, int(self.submit_pacer.rate * 0.1)))
            if self.s.mode == "sync":
                batch = min(batch, concurrency)
            # a claimed job is "submitting": never hold one through a quota pause
            batch = min(batch, await self.submit_pacer.room())
            claims = await self.store.claim(batch, time.time())
            if not claims:
                continue
            self.draining = False
            unsent = list(claims)
            try:
                while unsent:
                    await limiter.acquire()
                    try:
                        await self.submit_pacer.slot()
                    except BaseException:
                        limiter.release()
                        raise
                    workers.start_soon(self._send_one, unsent.pop(0), limiter)
            finally:
                if unsent:  # stopped with claims in hand that never left: not ambiguous
                    with anyio.CancelScope(shield=True):
                        await self.store.unclaim([c.rowid for c in unsent])

    async def _wait_for_work(self, next_at: float | None) -> None:
        if next_at is None:
            self._start_draining()
            wait = 1.0
        else:
            wait = min(1.0, max(0.0, next_at - time.time()))
        self._work_changed = anyio.Event()
        with anyio.move_on_after(wait):
            await self._work_changed.wait()

    async def _send_one(self, claim: Claim, limiter: anyio.Semaphore) -> None:
        try:
            # shielded: a submit on the wire finishes (bounded by the client's timeout) so its
            # operation id is stored, rather than leaving an ambiguous "submitting" job behind
            with anyio.CancelScope(shield=True):
                if self.s.mode == "sync":
                    self._inflight += 1
                try:
                    await self._submit(claim)
                finally:
                    if self.s.mode == "sync":
                        self._inflight -= 1
        finally:
            limiter.release()

    async def _submit(self, claim: Claim) -> None:
        now = time.time()
        try:
            if self.s.mode == "sync":
                completion = await self.client.complete(claim.body, claim.idem_key)
            else:
                op_id = await self.client.submit(claim.body, claim.idem_key)
        except ApiError as e:
            self._submit_failed(claim, e)
            return
        except FatalApiError:
            self._emit(Requeue(claim.rowid, 0.0))
            raise
        self.submit_pacer.success()
        self.stats.submitted += 1
        if self.s.mode == "sync":
            self._emit(Finished(claim.rowid, time.time(), 0, completion=completion))
            return
        self._emit(Submitted(claim.rowid, op_id, now))
        self._schedule(Running(claim.rowid, op_id, now), self.policy.first_wait(self.slack()))

    def _submit_failed(self, claim: Claim, e: ApiError) -> None:
        now = time.time()
        if e.kind == "rate":
            self.stats.throttled += 1
            self.submit_pacer.throttle(e.retry_after)
            self._emit(Requeue(claim.rowid, now))
        elif e.kind == "invalid":
            self._emit(Finished(claim.rowid, now, 0, failure=e.failure()))
        elif e.kind in ("forbidden", "not_found"):
            self._emit(Requeue(claim.rowid, 0.0))
            what = (
                "permission denied (403)" if e.kind == "forbidden" else "endpoint not found (404)"
            )
            raise FatalApiError(
                f"submit refused: {what}: {e.message}. Check the service account's role "
                "(ai.languageModels.user), the folder id and --llm-url, then rerun to resume"
            )
        else:
            self.stats.faults += 1
            faults = claim.faults + 1
            if faults >= self.s.max_faults:
                self._emit(Finished(claim.rowid, now, 0, failure=e.failure()))
            else:
                wait = delay(faults, retry_after=e.retry_after)
                self._emit(Requeue(claim.rowid, now + wait, fault=e.failure(), ambiguous=e.sent))

    # -- polling ------------------------------------------------------------------------

    def _start_draining(self) -> None:
        """Nothing left to submit: from now on the slowest job decides the finish, so pull
        every poll already scheduled in to the tail cap (waits set earlier did not have it)."""
        if self.draining:
            return
        self.draining = True
        now = anyio.current_time()
        latest = now + self.policy.cap(elapsed=now - self._started, draining=True)
        self._heap = [(min(due, latest), seq, op) for due, seq, op in self._heap]
        heapq.heapify(self._heap)
        self._heap_changed.set()

    def _schedule(self, op: Running, wait: float) -> None:
        due = anyio.current_time() + wait
        if not self._heap or due < self._heap[0][0]:
            self._heap_changed.set()
        heapq.heappush(self._heap, (due, next(self._seq), op))

    async def _loader(self) -> None:
        """Operations a previous run left running: poll them, never resubmit them."""
        after: tuple[float, int] = (-math.inf, 0)
        first = self.policy.first
        while True:
            page = await self.store.running_page(after, 1000)
            if not page:
                return
            now = time.time()
            for op in page:
                age = now - op.submitted_at
                self._schedule(op, max(0.0, first - age))
            # a running job's next_at is its submit time: the page key
            after = (page[-1].submitted_at, page[-1].rowid)
            while len(self._heap) > 50_000:  # noqa: ASYNC110 - a bound, not a handoff
                await anyio.sleep(0.5)

    async def _poller(self, workers: TaskGroup) -> None:
        limiter = anyio.Semaphore(self.s.poll_concurrency)
        while True:
            if not self._heap:
                self._heap_changed = anyio.Event()
                await self._heap_changed.wait()
                continue
            due = self._heap[0][0]
            now = anyio.current_time()
            if due > now:
                self._heap_changed = anyio.Event()
                with anyio.move_on_after(due - now):
                    await self._heap_changed.wait()
                continue
            _, _, op = heapq.heappop(self._heap)
            await limiter.acquire()
            await self.poll_pacer.slot()
            workers.start_soon(self._poll_one, op, limiter)

    async def _poll_one(self, op: Running, limiter: anyio.Semaphore) -> None:
        self._inflight += 1
        try:
            await self._poll(op)
        finally:
            self._inflight -= 1
            limiter.release()

    async def _poll(self, op: Running) -> None:
        op.polls += 1
        self.stats.polls += 1
        now = time.time()
        age = now - op.submitted_at
        try:
            state = await self.client.poll(op.operation_id)
        except ApiError as e:
            self._poll_failed(op, e)
            return
        self.poll_pacer.success()
        op.errors = 0
        if state.done:
            if op.polls > 1 or age < 2 * self.policy.first:  # not a resumed, long-gone job
                self.policy.observe_done(op.last_miss, age)
            self._emit(Finished(op.rowid, now, op.polls, state.completion, state.failure))
        elif age > self.s.op_deadline:
            self._expired(op, now, "did not finish")
        else:
            op.last_miss = age
            elapsed = anyio.current_time() - self._started
            self._schedule(op, self.policy.next_wait(age, elapsed=elapsed, draining=self.draining))

    def _poll_failed(self, op: Running, e: ApiError) -> None:
        now = time.time()
        if e.kind == "not_found":
            # results live 3 days; a run paused longer finds them gone: submit again
            self.stats.resubmits += 1
            self._emit(Requeue(op.rowid, now, resubmit=True, polls=op.polls))
            self._work_changed.set()
            return
        if e.kind == "forbidden":
            raise FatalApiError(f"poll refused: permission denied (403): {e.message}")
        op.errors += 1
        if e.kind == "rate":
            self.stats.throttled += 1
            self.poll_pacer.throttle(e.retry_after)
        else:
            self.stats.faults += 1
        if op.errors >= 10 * self.s.max_faults and e.kind != "rate":
            self._emit(Finished(op.rowid, now, op.polls, failure=e.failure()))
            return
        self._schedule(op, delay(op.errors, base=0.5, cap=30.0, retry_after=e.retry_after))

    def _expired(self, op: Running, now: float, why: str) -> None:
        hours = self.s.op_deadline / 3600
        if self.s.resubmit_stuck:
            self.stats.resubmits += 1
            self._emit(Requeue(op.rowid, now, resubmit=True, polls=op.polls))
            self._work_changed.set()
        else:
            message = (
                f"operation {op.operation_id} {why} within {hours:g} h (--op-deadline); "
                "rerun with --resubmit-stuck to send it again"
            )
            self._emit(Finished(op.rowid, now, op.polls, failure=ApiFailure(4, message)))

    # -- writing ------------------------------------------------------------------------

    async def _writer(self, receive: MemoryObjectReceiveStream[Update]) -> None:
        batch: list[Update] = []
        async with receive:
            try:
                while True:
                    batch.append(await receive.receive())
                    with anyio.move_on_after(self.s.batch_window):
                        while len(batch) < 1000:
                            batch.append(await receive.receive())
                    done, batch = batch, []
                    await self._flush(done)
            except anyio.EndOfStream:
                await self._flush(batch)
            except anyio.get_cancelled_exc_class():
                # a worker failed: everything it sent is buffered; commit it before leaving
                with anyio.CancelScope(shield=True):
                    while True:
                        try:
                            batch.append(receive.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    await self._flush(batch)
                raise

    async def _flush(self, batch: list[Update]) -> None:
        if not batch:
            return
        with anyio.CancelScope(shield=True):
            finished, advanced = await self.store.apply(batch, self.s.context_budget)
            if finished and self.s.output:
                self.stats.written += await self.store.export(self.s.output)
        if advanced or any(isinstance(u, Requeue) for u in batch):
            self._work_changed.set()
        for u in batch:
            if isinstance(u, Finished) and u.failure is not None:
                self.stats.failed += 1
        self.stats.finished += finished
        self.outstanding -= finished
        if self.outstanding <= 0:
            self._all_done.set()
