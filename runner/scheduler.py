"""The run loop: what to send when. How a row changes is ``queue``'s business, not this one's.

One anyio task group holds the workers. The submitter claims a few due jobs at a time (the
claim commits ``submitting`` before any request leaves), takes a slot from the submit pacer and
sends each in its own task, shielded so that a submit on the wire finishes and its operation id
is stored. The poller keeps a heap of running operations ordered by when each is next worth
polling (``polling``) and polls the due ones within the poll quota; the loader feeds it the
operations submitted before this run started. Every outcome names its attempt and goes to the
``Writer``; a stale one is refused there, so the loader and a repeated poll can do no harm.

Failures go through one breaker per endpoint family (``breaker``): an outage pauses the family
and probes it, charges no job and fails none, and ``max_outage`` (if set) ends the run with
``OutageError``. Once five submits in a row were lost after sending (each may have created a
billed operation), one goes at a time, 1 s after the last lost doubling to 10 minutes, until
one succeeds. A job's own failures (a malformed answer; a transient one while later requests
succeed) spend its budget. 401/403, and a 404 for an operation too young to have expired, stop
the run with ``CredentialsError``; state stays committed and the next run resumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from runner.backoff import delay
from runner.breaker import Breaker
from runner.client import ApiError, Client
from runner.errors import CredentialsError, OutageError
from runner.inputs import expand
from runner.jobs import (
    Answered,
    ApiFailure,
    Attempt,
    Charged,
    Claim,
    Failed,
    Requeued,
    Running,
    Submitted,
)  # fmt: skip
from runner.pacing import Pacer
from runner.poller import Poller
from runner.queue import Applied, Queue
from runner.settings import Outage, Settings, Stats
from runner.writer import Writer

# submits in a row (no success between them) whose answers were lost after sending, so that
# each may have created a billed operation, after which one submit at a time goes, 1 s after
# the last one lost, doubling up to ``Settings.paid_probe_every``, until one succeeds, whatever
# the breaker or the tokenizer say (a 429 closing the breaker, or a tokenizer that answers
# while completionAsync creates and times out, let them through before)
LOST_SUBMITS = 5
log = logging.getLogger("runner.scheduler")
class Scheduler:
    def __init__(self, queue: Queue, client: Client, writer: Writer, settings: Settings,
                 folder_id: str, outstanding: int) -> None:  # fmt: skip
        self.queue, self.client, self.writer, self.s = queue, client, writer, settings
        self.folder_id = folder_id
        self.outstanding = outstanding
        self.policy = settings.policy
        self.stats = Stats()
        sync = settings.mode == "sync"
        self.submit_pacer = Pacer(settings.submit_rps, None if sync else settings.submit_per_hour,
                                  hour=settings.quota_window)  # fmt: skip
        self.poll_pacer = Pacer(settings.poll_rps * settings.poll_share)
        kw: dict[str, Any] = {"first_probe": settings.probe_first, "max_probe": settings.probe_max}
        self.breakers: dict[str, Breaker[Any]] = {
            "submit": Breaker[tuple[Attempt, ApiFailure]]("submit", distinct=2, **kw),
            "poll": Breaker[None]("poll", distinct=1, **kw),
        }
        self._outage_since: dict[str, float] = {}
        self._work_changed = anyio.Event()
        self._in_hand = 0  # claimed jobs the submitter holds, not sent yet
        # submits lost after sending (maybe paid) since one last succeeded, and when the last
        # was: a 429 closing the breaker between them does not start a new count
        self._lost, self._lost_at, self._lost_since = 0, -math.inf, -math.inf
        self._gated = 0  # submits sent one at a time since five were lost in a row
        self._gated_out: int | None = None  # the row of the one on its way, until it is done
        self._batch_sent = anyio.Event()  # set each time the submitter is done with a batch
        self.done = anyio.Event()
        self.started = time.time()
        self.t0 = time.monotonic()
        self._inflight = 0  # sync requests on the wire
        self.poller = Poller(self)
        self.listener: Callable[[], None] = lambda: None  # told after every commit
        writer.on_applied = self._applied
        writer.remaining = lambda: self.outstanding

    @property
    def tracked(self) -> int:
        """Operations the poller is watching (or, in sync mode, requests on the wire)."""
        return len(self.poller.heap) + self.poller.inflight + self._inflight

    @property
    def pending(self) -> int:
        return max(0, self.outstanding - self.tracked)

    def slack(self) -> float:
        """How long the run goes on in any case: the quota's time to submit what is pending."""
        return self.submit_pacer.horizon(self.pending)

    def outages(self) -> list[Outage]:
        now = time.monotonic()
        return [Outage(f, self._outage_since.get(f, time.time()), b.error, b.wait(now))
                for f, b in self.breakers.items() if b.is_open]  # fmt: skip

    async def run(self, workers: TaskGroup) -> None:
        """Start the workers in ``workers``; ``done`` is set when nothing is left to do."""
        if self.outstanding <= 0:
            self.done.set()
            return
        since = time.time() - self.submit_pacer.hour
        offset = time.monotonic() - time.time()
        self.submit_pacer.seed(t + offset for t in await self.queue.recent_submits(since))
        workers.start_soon(self._submitter, workers)
        workers.start_soon(self._watchdog)
        # in sync mode too: operations an async run left running are still to be collected
        workers.start_soon(self.poller.run, workers)
        workers.start_soon(self.poller.loader)
        workers.start_soon(self.poller.ticker)

    def _applied(self, applied: Applied) -> None:
        self.stats.finished += applied.finished
        self.stats.failed += applied.failed
        self.stats.stale += applied.stale
        self.outstanding -= applied.finished
        if applied.advanced or applied.requeued:
            self.work_changed()
        if self.outstanding <= 0:
            self.done.set()
        self.listener()

    # -- outages --------------------------------------------------------------------------

    def work_changed(self) -> None:
        self._work_changed.set()

    def noted(self, family: str) -> None:
        """Log once when a breaker opens and once when it closes. The outage's own record says
        which: a request sent before it opened that fails after must not open it again (every
        request on the wire when it tripped did, each restarting its clock)."""
        b, since = self.breakers[family], self._outage_since.get(family)
        if b.is_open and since is None:
            self._outage_since[family] = time.time()
            log.warning("API unreachable (%s requests: %s); pausing them and probing", family, b.error)
        elif since is not None and not b.is_open:
            del self._outage_since[family]
            log.warning("API reachable again (%s requests) after %.0f s", family, time.time() - since)

    async def _watchdog(self) -> None:
        """Once a second: end the run past --max-outage or once its database file is gone (a
        quiet spell commits nothing that would notice), and publish the outage for `status`."""
        shown: list[str] = []
        while True:
            await anyio.sleep(1.0)
            self.queue.db.check_file()
            now = time.monotonic()
            outages = self.outages()
            if [o.family for o in outages] != shown or outages:
                shown = [o.family for o in outages]
                state = [o.__dict__ | {"next_try_at": time.time() + o.next_try_in} for o in outages]
                with contextlib.suppress(sqlite3.Error):  # a display, never a reason to stop
                    await self.queue.db.set_state("outage", state or None)
            if (self.s.max_outage is not None and self._lost >= LOST_SUBMITS
                    and now - self._lost_since > self.s.max_outage):  # fmt: skip
                raise OutageError(
                    f"submits have lost their answers for {now - self._lost_since:.0f} s (each "
                    "may have created a billed operation), longer than --max-outage; state is "
                    "saved, rerun to resume"
                )
            for family, b in self.breakers.items():
                if self.s.max_outage is not None and b.open_for(now) > self.s.max_outage:
                    raise OutageError(
                        f"the API has been unreachable for {b.open_for(now):.0f} s ({family} "
                        f"requests: {b.error}), longer than --max-outage; state is saved, "
                        "rerun to resume"
                    )

    async def gate(self, family: str) -> None:
        """Wait until a request of ``family`` may go: at once when closed, else as the probe."""
        b = self.breakers[family]
        while not b.allow(time.monotonic()):  # noqa: ASYNC110 - a deadline, not a handoff
            await anyio.sleep(max(0.05, b.wait(time.monotonic())))

    # -- submitting -----------------------------------------------------------------------

    async def _submitter(self, workers: TaskGroup) -> None:
        """Sends claimed batches at the pacer's slots while ``_claimer`` claims the next one:
        a claim is a durable commit (an fsync), and one made between batches held the pace
        back by its length every batch (300 submits/s where the limit was 360)."""
        sync = self.s.mode == "sync"
        concurrency = self.s.sync_concurrency if sync else (
            self.s.submit_concurrency or max(4, math.ceil(self.s.submit_rps * 0.5)))  # fmt: skip
        # no checkpoint when free; a round without a yield ends when the permits or the batch do
        limiter = anyio.Semaphore(concurrency, fast_acquire=True)
        breaker = self.breakers["submit"]
        send, receive = anyio.create_memory_object_stream[tuple[list[Claim], bool]](0)
        async with anyio.create_task_group() as claiming, receive:
            claiming.start_soon(self._claimer, send, concurrency if sync else 64)
            async for claims, was_open in receive:
                unsent = list(claims)
                self._in_hand = len(unsent)
                try:
                    while unsent and (not breaker.is_open or was_open):
                        await limiter.acquire()
                        try:
                            stamp = await self.submit_pacer.slot()
                        except BaseException:
                            limiter.release()
                            raise
                        workers.start_soon(self._send_one, unsent.pop(0), stamp, limiter)
                        self._in_hand = len(unsent)
                finally:
                    if unsent:  # stopped with claims that never left: not ambiguous
                        if self._gated_out in {c.attempt.rowid for c in unsent}:
                            self._gated_out = None
                        with anyio.CancelScope(shield=True):
                            await self.queue.unclaim(unsent)
                    self._in_hand = 0
                    self._batch_sent.set()
                    self._batch_sent = anyio.Event()

    async def _claimer(
        self, send: MemoryObjectSendStream[tuple[list[Claim], bool]], most: int
    ) -> None:
        """Claims what the pacer lets out in the next ~100 ms (one, as a probe) and no more
        than the hourly window has room for beside what the submitter holds: few jobs are
        ever "submitting" at once, so a kill leaves few ambiguous submits behind."""
        breaker = self.breakers["submit"]
        full = False  # the last claim got all it asked for: more is likely due, no need to ask
        async with send:
            while True:
                if self.writer.trouble is not None:
                    await self.writer.recovered.wait()
                if not full:
                    next_at = await self.queue.next_pending_at()
                    if next_at is None or next_at > time.time():
                        await self._wait_for_work(next_at)
                        continue
                lost = self._lost >= LOST_SUBMITS
                # one at a time, 1 s after the last lost, doubling with each one sent so, up to
                # paid_probe_every: a flaky network that loses five in a row now and then
                # pauses a second; an endless loss costs 6 an hour
                gap = min(self.s.paid_probe_every, 2.0**self._gated)
                out = self._gated_out is not None
                if lost and (out or self._lost_at + gap > time.monotonic()):
                    await anyio.sleep(0.05 if out else
                                      min(1.0, self._lost_at + gap - time.monotonic()))  # fmt: skip
                    continue
                was_open = breaker.is_open
                await self.gate("submit")
                pace = int(self.submit_pacer.rate * 0.1)
                batch = 1 if breaker.is_open or lost else max(1, min(most, pace))
                sent, room = self._batch_sent, await self.submit_pacer.room()
                if 0 < self._in_hand >= room:  # what is in hand takes what room there is
                    await sent.wait()
                    continue
                asked = min(batch, max(1, room - self._in_hand))
                claims = await self.queue.claim(1 if lost else asked, time.time())
                if lost and claims:  # until its answer (or its loss) is in, no other goes
                    self._gated, self._gated_out = self._gated + 1, claims[0].attempt.rowid
                full = len(claims) == asked
                if not claims:
                    breaker.probing = False
                    continue
                try:
                    await send.send((claims, was_open))
                except BaseException:  # stopped before they were handed over: never sent
                    with anyio.CancelScope(shield=True):
                        await self.queue.unclaim(claims)
                    raise

    async def _wait_for_work(self, next_at: float | None) -> None:
        wait = 1.0 if next_at is None else min(1.0, max(0.0, next_at - time.time()))
        self._work_changed = anyio.Event()
        with anyio.move_on_after(wait):
            await self._work_changed.wait()

    async def _send_one(self, claim: Claim, stamp: float, limiter: anyio.Semaphore) -> None:
        try:
            # shielded: a submit on the wire finishes (bounded by the client's timeout) so its
            # operation id is stored, rather than leaving an ambiguous "submitting" job behind
            with anyio.CancelScope(shield=True):
                self._inflight += self.s.mode == "sync"
                try:
                    await self._submit(claim, stamp)
                finally:
                    self._inflight -= self.s.mode == "sync"
                    if self._gated_out == claim.attempt.rowid:
                        self._gated_out = None
        finally:
            limiter.release()

    async def _submit(self, claim: Claim, stamp: float) -> None:
        a, sent = claim.attempt, time.monotonic()
        breaker = self.breakers["submit"]
        body = expand(claim.body, self.folder_id)
        try:
            if self.s.mode == "sync":
                completion = await self.client.complete(body, claim.idem_key)
            else:
                op_id = await self.client.submit(body, claim.idem_key)
        except ApiError as e:
            await self._submit_failed(claim, stamp, sent, e)
            self.noted("submit")
            return
        except CredentialsError:
            self.submit_pacer.refund(stamp)
            self.writer.emit(Requeued(a, 0.0))
            raise
        _, proven = breaker.success(sent, a.rowid)
        self._lost = self._gated = 0
        self.submit_pacer.accepted(stamp)
        self.noted("submit")
        for s in proven:
            self.writer.emit(Charged(s.payload[0], time.time(), s.payload[1], self.s.max_faults))
        self.stats.submitted += 1
        now = time.time()
        if self.s.mode == "sync":
            self.writer.emit(Answered(a, now, completion))
            return
        self.writer.emit(Submitted(a, op_id, now))
        log.debug("submitted %s (attempt %d) as operation %s", claim.id, a.fence, op_id)
        self.poller.submitted_now(Running(a.running(op_id), now, claim.resubmits, chat=claim.chat))

    async def _submit_failed(self, claim: Claim, stamp: float, sent: float, e: ApiError) -> None:
        a, now, emit = claim.attempt, time.time(), self.writer.emit
        log.debug("submit of %s failed (%s): %s", claim.id, e.kind, e.message)
        if not e.maybe_created:
            self.submit_pacer.refund(stamp)  # nothing was accepted: it does not use the quota
        else:
            self._lost, self._lost_at = self._lost + 1, time.monotonic()
            if self._lost == LOST_SUBMITS:
                self._lost_since = self._lost_at
                log.warning("%d submits in a row lost their answer (%s): each may have "
                            "created a billed operation; one at a time now, further apart "
                            "each time (up to %.0f s), until one succeeds", LOST_SUBMITS,
                            e.short, self.s.paid_probe_every)  # fmt: skip
        if e.kind != "transient":
            self.breakers["submit"].answered()  # the service is reachable: no outage
        if e.kind == "rate":
            self.stats.throttled += 1
            self.submit_pacer.refused(stamp, e.retry_after)
            emit(Requeued(a, now, error=e.failure()))
            return
        if e.kind == "invalid":
            emit(Failed(a, now, e.failure()))
            return
        if e.kind in ("forbidden", "not_found"):
            emit(Requeued(a, 0.0))
            what = "permission denied (403)" if e.kind == "forbidden" else "not found (404)"
            raise CredentialsError(
                f"submit refused: {what}: {e.message}. Check --llm-url ({self.client.llm_url}), "
                "the folder id and the service account's role (ai.languageModels.user), then "
                "rerun to resume"
            )
        faults = claim.faults + 1
        if e.kind == "transient":
            breaker = self.breakers["submit"]
            opened = breaker.is_open
            verdict = breaker.failure(time.monotonic(), sent, a.rowid, e.short)
            if verdict == "outage" and not opened and await self._service_up():
                for s in breaker.untrip():  # it tripped, yet the service answers: the jobs'
                    emit(Charged(s.payload[0], now, s.payload[1], self.s.max_faults))
                verdict = "job"
            elif verdict == "probe":  # the probe failed: the service's, or the probe job's?
                if await self._service_up():
                    breaker.answered()  # the service is up: the probe job's own failure
                    verdict = "job"
                else:
                    breaker.probe_failed(time.monotonic())
                    verdict = "outage"
            elif verdict == "repeat":
                earlier = breaker.suspects.pop(a.rowid)
                if await self._service_up(throttled=True):
                    emit(Charged(earlier.payload[0], now, earlier.payload[1], self.s.max_faults))
                    faults += 1
                    verdict = "job"
                else:
                    breaker.trip(time.monotonic(), e.short)
                    verdict = "outage"
            if verdict != "job":
                if verdict == "unsure":
                    breaker.suspect(a.rowid, sent, (a, e.failure()))
                wait = 0.0 if verdict == "outage" else delay(faults)
                emit(Requeued(a, now + wait, error=e.failure(), ambiguous=e.maybe_created))
                return
        # the job's own fault ("malformed", or proven transient): the store fails the job when
        # this spends its budget, counting charges that were proven after it was claimed
        emit(Requeued(a, now + delay(faults, retry_after=e.retry_after), fault=e.failure(),
                      ambiguous=e.maybe_created, max_faults=self.s.max_faults))  # fmt: skip

    async def _service_up(self, throttled: bool = False) -> bool:
        """Is the LLM host answering? Asked with the tokenizer, which is free. What its 429
        means is ``throttled``: when requests of several jobs failed (the breaker tripped, or
        its probe failed), it is no answer, since an overloaded service throttles the tokenizer
        too, and taking it for "up" charged every job its faults through an overload; when one
        job failed again and again with nothing else sent, the host is reachable and the job
        is charged, or a lone poisonous prompt would hold the run in an outage for good."""
        probe = '{"modelUri":"gpt://%s/yandexgpt-lite/latest","messages":[{"role":"user","text":"ping"}]}'
        try:
            await self.client.tokenize_completion(probe % self.folder_id)
        except ApiError as e:
            return e.kind != "transient" and (throttled or e.kind != "rate")
        return True
