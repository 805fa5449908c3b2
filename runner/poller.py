"""Polling running operations: a heap ordered by when each is next worth polling.

The poller pops due operations and polls them within the poll pacer (a configured share of the
poll quota, so it never plans more polls a second than that), each in its own task. When to
poll is the pure ``polling.PollPolicy``'s decision; this module feeds it what the run knows.
Once a second a tick recomputes the policy's horizon (the time before which the run cannot end,
from the quota's slack and the ages of the operations still running) and pulls every poll
scheduled past it in to it, so no operation that might be the last one sleeps through the end.
The loader feeds the heap the operations submitted before this run began (a previous run's).

A poll's answer becomes an outcome for the writer: an answer, an operation error (transient
codes resubmit the job, capped; others fail it), or an operation gone: expired past the 3-day
retention (resubmit), or answering 404 younger than that, which means a wrong URL, folder or key
and stops the run. Transient failures of polls are never the operation's fault: they feed the
poll breaker and the operation is polled again later, however long the outage lasts.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from runner import wire
from runner.backoff import delay
from runner.client import ApiError
from runner.errors import CredentialsError
from runner.jobs import Answered, ApiFailure, Cancelled, Failed, Requeued, Running

if TYPE_CHECKING:
    from runner.scheduler import Scheduler

log = logging.getLogger("runner.poller")


def slept() -> float:
    """Seconds the machine has been suspended since boot: the boot clock less the monotonic
    one (Linux); 0 where there is no boot clock."""
    boot = getattr(time, "CLOCK_BOOTTIME", None)
    if boot is None:
        return 0.0
    return time.clock_gettime(boot) - time.clock_gettime(time.CLOCK_MONOTONIC)


class Poller:
    def __init__(self, sch: Scheduler) -> None:
        self.sch = sch
        self.s = sch.s
        self.policy = sch.policy
        self.heap: list[tuple[float, int, Running]] = []
        self._seq = itertools.count()
        self._changed = anyio.Event()
        self.inflight = 0
        self.horizon_at = math.inf  # monotonic time before which the run cannot end
        self.submitted = 0  # operations this run put in the heap: the first ones are scouts
        self.loaded = 0  # a previous run's operations loaded: the first ones are scouts too
        self.newest = -math.inf  # when the newest operation polled was submitted (for the ETA)

    def schedule(self, op: Running, wait: float) -> None:
        due = time.monotonic() + wait
        if not self.heap or due < self.heap[0][0]:
            self._changed.set()
        heapq.heappush(self.heap, (due, next(self._seq), op))

    def _elapsed(self) -> float:
        return time.monotonic() - self.sch.t0

    def _horizon(self) -> float:
        return max(0.0, self.horizon_at - time.monotonic())

    def _born(self, op: Running) -> None:
        """Its submit on the monotonic clock, from the stored wall-clock time once: ages within
        a run are then immune to the wall clock stepping (NTP, a suspend on some systems)."""
        op.born = time.monotonic() - max(0.0, time.time() - op.submitted_at)
        op.slept = slept()
        self.newest = max(self.newest, op.born)

    def eta(self) -> float | None:
        """Seconds until the operations being polled are expected back: the horizon once
        anything is learned, else the prior latency less the newest operation's age, and
        None (unknown) once they have outlived the prior with nothing learned."""
        if self.horizon_at < math.inf:
            return self._horizon()
        left = self.policy.first - (time.monotonic() - self.newest)
        return left if left > 0 else None

    def submitted_now(self, op: Running) -> None:
        """A new operation: schedule its first poll."""
        op.scout, op.fresh = self.policy.scout(self.submitted), True
        self.submitted += 1
        self._born(op)
        wait = self.policy.first_wait(slack=self.sch.slack(), horizon=self._horizon(),
                                      elapsed=self._elapsed(), scout=op.scout)  # fmt: skip
        self.schedule(op, wait)
        self.policy.at_once(len(self.heap) + self.inflight)

    def _loaded(self, op: Running) -> None:
        """A previous run's operation: polled as a new one would be, a scout if among the run's
        first (else a resumed run, with nothing learned, doubled every wait: one killed at 70 s
        of its 150 s was seen 130 s late, review L); never counted as fresh, since it may have
        finished long before this poll."""
        op.scout = self.policy.scout(self.loaded)  # a count of its own: a previous run's
        self.loaded += 1  # found done teach nothing, and this run's own first are scouts too
        self._born(op)
        self.schedule(op, max(0.0, self.policy.first - (time.monotonic() - op.born)))
        self.policy.at_once(len(self.heap) + self.inflight)

    async def loader(self) -> None:
        """Operations submitted before this run began: poll them, never resubmit them."""
        after: tuple[float, int] = (-math.inf, 0)
        while page := await self.sch.queue.running_page(after, 1000, before=self.sch.started):
            for op in page:
                self._loaded(op)
            after = (page[-1].submitted_at, page[-1].attempt.rowid)
            while len(self.heap) > 50_000:  # noqa: ASYNC110 - a bound, not a handoff
                await anyio.sleep(0.5)

    async def ticker(self) -> None:
        """Once a second: the horizon, and every poll scheduled past it pulled in to it."""
        while True:
            await anyio.sleep(1.0)
            now = time.monotonic()
            running = [(now - op.born, op.last_miss) for _, _, op in self.heap]
            self.horizon_at = now + self.policy.horizon(self.sch.slack(), running)
            if self.policy.replan(self.sch.slack()):
                self._replan(now)
            log.debug("horizon in %.1f s; %d running; latency q50 %.1f q99 %.1f (%d seen)",
                      self.horizon_at - now, len(running), self.policy.sketch.quantile(0.5),
                      self.policy.sketch.quantile(0.99), self.policy.sketch.n)  # fmt: skip
            latest = now + max(self.horizon_at - now, self.policy.tail_share * self._elapsed(),
                               self.policy.min_wait)  # fmt: skip
            if latest < math.inf and any(due > latest for due, _, _ in self.heap):
                self.heap = [(min(due, latest), n, op) for due, n, op in self.heap]
                heapq.heapify(self.heap)
                self._changed.set()

    def _closing_in(self) -> None:
        """An operation just finished (it is still counted in flight): if only the last few of
        the run are left, their next polls come no later than the policy's cap for them."""
        running = len(self.heap) + self.inflight - 1
        if running > self.policy.last_few or not self.heap:
            return
        now, draining = time.monotonic(), self.sch.slack() <= 0
        caps = [now + self.policy.last_cap(now - op.born, draining=draining, running=running)
                for _, _, op in self.heap]  # fmt: skip
        if all(cap >= due for cap, (due, _, _) in zip(caps, self.heap, strict=True)):
            return
        self.heap = [(min(due, cap), n, op)
                     for cap, (due, n, op) in zip(caps, self.heap, strict=True)]  # fmt: skip
        heapq.heapify(self.heap)
        self._changed.set()

    def _replan(self, now: float) -> None:
        """First polls not made yet, planned again from the estimate as it is now."""
        wait = self.policy.first_wait(slack=self.sch.slack(), horizon=math.inf,
                                      elapsed=self._elapsed())  # fmt: skip
        self.heap = [(max(now, op.born + wait), n, op)
                     if op.fresh and not op.polls and not op.scout else (due, n, op)
                     for due, n, op in self.heap]  # fmt: skip
        heapq.heapify(self.heap)
        self._changed.set()

    async def run(self, workers: TaskGroup) -> None:
        # no checkpoint when a permit is free (one per poll cost a few percent of the CPU); the
        # pacer's slot yields only when the next slot is ahead, so at a pace higher than the
        # loop a round without a yield ends at the latest when the permits are out
        limiter = anyio.Semaphore(self.s.poll_concurrency, fast_acquire=True)
        breaker = self.sch.breakers["poll"]
        while True:
            if not self.heap:
                self._changed = anyio.Event()
                await self._changed.wait()
                continue
            due, now = self.heap[0][0], time.monotonic()
            if due > now:
                self._changed = anyio.Event()
                with anyio.move_on_after(due - now):
                    await self._changed.wait()
                continue
            await self.sch.gate("poll")
            if not self.heap:
                breaker.probing = False
                continue
            _, _, op = heapq.heappop(self.heap)
            await limiter.acquire()
            await self.sch.poll_pacer.slot()
            workers.start_soon(self._poll_one, op, limiter)

    async def _poll_one(self, op: Running, limiter: anyio.Semaphore) -> None:
        self.inflight += 1
        try:
            await self._poll(op)
        finally:
            self.inflight -= 1
            limiter.release()

    async def _poll(self, op: Running) -> None:
        op.polls += 1
        self.sch.stats.polls += 1
        sent, breaker = time.monotonic(), self.sch.breakers["poll"]
        try:
            state = await self.sch.client.poll(op.operation_id)
        except ApiError as e:
            self._failed(op, sent, e)
            self.sch.noted("poll")
            return
        breaker.success(sent, op.attempt.rowid)
        self.sch.poll_pacer.answered()
        self.sch.noted("poll")
        op.errors = op.faults = 0  # a budget for answers malformed in a row, not over a life
        now, age = time.time(), time.monotonic() - op.born
        emit = self.sch.writer.emit
        if not state.done:
            log.debug("operation %s still running at %.1f s", op.operation_id, age)
            if age > self.s.op_deadline:
                self._gone(op, f"did not finish within {self.s.op_deadline / 3600:g} h "
                           "(--op-deadline)", 4, stuck=True)  # fmt: skip
                return
            op.last_miss = age
            self.schedule(op, self.policy.next_wait(
                age, horizon=self._horizon(), elapsed=self._elapsed(), scout=op.scout,
                draining=self.sch.slack() <= 0, running=len(self.heap) + self.inflight,
            ))  # fmt: skip
            return
        log.debug("operation %s finished after %.1f s (poll %d)", op.operation_id, age, op.polls)
        if op.fresh or op.polls > 1:  # not a previous run's, found done long after it finished
            self.policy.observe_done(op.last_miss, age)
        self._closing_in()
        if state.completion is not None:
            emit(Answered(op.attempt, now, state.completion, op.polls, chat=op.chat))
        elif state.cancelled:
            emit(Cancelled(op.attempt, now))
        elif state.failure is not None and state.failure.code in wire.TRANSIENT_OPERATION_CODES:
            self._gone(op, f"ended with a transient error (code {state.failure.code}: "
                       f"{state.failure.message})", state.failure.code)  # fmt: skip
        else:
            assert state.failure is not None
            emit(Failed(op.attempt, now, state.failure, op.polls))

    def _gone(self, op: Running, why: str, code: int, stuck: bool = False) -> None:
        """The operation will not give an answer: submit the job again (capped), or fail it."""
        now = time.time()
        if (self.s.resubmit_stuck or not stuck) and op.resubmits < self.s.max_resubmits:
            self.sch.writer.emit(Requeued(op.attempt, now, polls=op.polls, resubmit=True,
                                          error=ApiFailure(code, f"operation {why}")))  # fmt: skip
            self.sch.work_changed()
            return
        hint = ("; `runner retry` then a longer --op-deadline waits for it, or rerun with "
                "--resubmit-stuck to send it again" if stuck and not
                self.s.resubmit_stuck else f" (submitted {op.resubmits + 1} times, --max-resubmits "
                f"{self.s.max_resubmits})")  # fmt: skip
        failure = ApiFailure(code, f"operation {op.operation_id} {why}{hint}")
        # past its deadline it was never seen to end (it may yet answer, or a clock jumped):
        # a retry polls it again rather than paying for it again
        self.sch.writer.emit(Failed(op.attempt, now, failure, op.polls, unfinished=stuck))

    def _failed(self, op: Running, sent: float, e: ApiError) -> None:
        # a suspend stops the monotonic clock, not the server's retention: the sleep is added
        # (from the boot clock, which a wall-clock step does not move either)
        now, age = time.time(), time.monotonic() - op.born + slept() - op.slept
        if e.kind == "not_found":
            if age >= self.s.retention:  # results are kept 3 days: this one expired
                self._gone(op, f"expired on the server ({age / 3600:.0f} h after it was "
                           "submitted)", 5)  # fmt: skip
                return
            raise CredentialsError(
                f"the operation service answered 404 for operation {op.operation_id}, submitted "
                f"{age:.0f} s ago; results are kept for 3 days, so this is not expiry: check "
                f"--operation-url ({self.sch.client.operation_url}), the folder id and the "
                "credentials. State is saved; rerun to resume"
            )
        if e.kind in ("forbidden", "invalid"):
            raise CredentialsError(f"poll refused ({e.short}): {e.message}; rerun to resume")
        op.errors += 1
        breaker = self.sch.breakers["poll"]
        if e.kind != "transient":
            breaker.answered()  # the service is reachable: no outage
        if e.kind == "rate":
            self.sch.stats.throttled += 1
            self.sch.poll_pacer.throttle(e.retry_after, sent)
        elif e.kind == "malformed":
            op.faults += 1
            if op.faults >= self.s.max_faults:
                self.sch.writer.emit(Failed(op.attempt, now, e.failure(), op.polls, charged=True,
                                            unfinished=True))  # fmt: skip
                return
        else:  # transient: never the operation's fault, and never a reason to give it up
            if breaker.failure(time.monotonic(), sent, op.attempt.rowid, e.short) == "probe":
                breaker.probe_failed(time.monotonic())
        self.schedule(op, delay(op.errors, base=0.5, cap=30.0, retry_after=e.retry_after))
