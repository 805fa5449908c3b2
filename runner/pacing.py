"""How fast to go: request slots under a per-second rate and an hourly window.

A ``Pacer`` hands out slots one at a time under a lock, so waiters leave one slot apart and a
pause never ends in a thundering herd. Two limits hold at once: a per-second rate, cut on a
429 (by 10% after a calm spell, else halved) and recovering linearly with the time that passes
without one (never by a single lucky success), with everyone paused after a cut (as long as
``Retry-After`` says, else twice as long for each refusal in a row, up to a minute); and, for
submits, an hourly window of at most ``per_hour`` slots in any ``hour`` seconds (a rolling
window: the safest of the shapes a server may use, since the contract does not say).

The window is rebuilt from the ledger when a run starts (``seed``), so a restart inside the hour
does not send into a full quota, and only requests the server may have accepted stay in it: a
slot whose request was answered 429 or 5xx, or never connected, is handed back (``refund``).

The contract does not say whether the hour is rolling, fixed or a continuously refilled bucket,
and a rolling model wastes what the other shapes allow. So when the window says "wait", the
pacer probes: one submit at growing intervals (from ``hour/360``, doubling on each 429 up to
``hour/10``); each accepted probe shortens the interval (by 20% until the first refusal, by
0.1% after it, never below one per-second slot), and a refusal that follows an accepted probe lengthens it by 25%, so that
once settled at the server's refill rate about one probe in 200 is refused. Against a rolling window this costs a few 429s an hour; against a token bucket the
probes settle at its refill rate; after a fixed window resets they find the new room.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable

import anyio


class Pacer:
    def __init__(
        self,
        rate: float,
        per_hour: int | None = None,
        hour: float = 3600.0,
        *,
        ramp: float = 10.0,
        floor: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = rate
        self.per_hour = per_hour
        # exactly the server's hour: an accepted request's stamp is moved to when its answer
        # came (``accepted``), which is after the server counted it, so the window never frees
        # a slot before the server's does (a margin of 1% cost 1% of every quota-bound run)
        self.hour = hour
        self.ramp = ramp  # seconds without a 429 to climb from nothing back to the limit
        self.floor = min(floor, rate)
        self.clock = clock
        self._base = rate  # the rate right after the last 429
        self._since = -math.inf  # when that was (when its pause ended)
        self._in_row = 0  # cuts with no request answered since
        self._next = 0.0
        self._paused_until = 0.0
        self._stamps: list[float] = []  # sorted slot times still inside the window
        self._lock = anyio.Lock(fast_acquire=True)  # no checkpoint when free: one per request
        self.throttled = 0
        # a probe a second at the most (in a compressed-time test, too), 1/360 of the hour
        self._probe_first = max(1.0, hour / 360)
        self._probe_max = max(self._probe_first, hour / 10)
        self._probe_interval = self._probe_first  # between submits past the window's model
        self._probe_next = -math.inf
        self._probes: set[float] = set()  # stamps of slots granted past the model
        self._refused_once = False
        self._probe_ok = False  # the last probe answered was accepted

    @property
    def rate(self) -> float:
        return self.rate_at(self.clock())

    def rate_at(self, now: float) -> float:
        # the climb starts when the pause after the last cut ends: a pace that climbed back
        # during it drew the next 429 at once, and a server refusing everything was sent a
        # request every 0.2 s for as long as it lasted
        climbed = self._base + self.limit * max(0.0, now - self._since) / self.ramp
        # 1% under the limit: jitter never puts one request too many in a second
        return max(self.floor, min(self.limit * 0.99, climbed))

    def seed(self, stamps: Iterable[float]) -> None:
        """Slots taken before this process started (monotonic times), e.g. from the ledger."""
        self._stamps = sorted([*self._stamps, *stamps])

    def _prune(self, at: float) -> None:
        cut = bisect.bisect_right(self._stamps, at - self.hour)
        if cut:
            del self._stamps[:cut]

    def _earliest(self, now: float) -> tuple[float, bool]:
        """When the next slot can be had, and whether it is a probe past the window's model."""
        at = max(now, self._next, self._paused_until)
        if self.per_hour is not None:
            self._prune(at)
            if len(self._stamps) >= self.per_hour:
                rolled = self._stamps[len(self._stamps) - self.per_hour] + self.hour
                if self._probe_next == -math.inf:
                    self._probe_next = now + self._probe_interval
                probe = max(at, self._probe_next)
                if probe < rolled:
                    return probe, True
                at = max(at, rolled)
        return at, False

    def left(self, ahead: float = 0.0) -> int:
        """Slots the hourly window has free ``ahead`` seconds from now (a large number
        without a window)."""
        if self.per_hour is None:
            return 1 << 30
        now = self.clock()
        self._prune(now)
        gone = bisect.bisect_right(self._stamps, now + ahead - self.hour)
        return max(0, self.per_hour - len(self._stamps) + gone)

    async def room(self) -> int:
        """Wait until a slot could be had, without taking it; returns how many the hourly
        window has free within the next 100 ms, or past it the probes of that time (so a
        caller can claim no more work than it can send soon). With the window full, slots
        come back one or two at a time as old ones roll out: counting the next 100 ms lets a
        caller claim them together rather than in a transaction each."""
        await self._until_free()
        return max(self.left(0.1), int(0.1 / self._probe_interval) if self._probe_ok else 0)

    async def _until_free(self) -> tuple[float, bool]:
        # a deadline that a 429 may push later, re-read after each sleep (not a handoff); the
        # clock is read once per turn, or a late read could ask to sleep a negative time
        while True:
            now = self.clock()
            at = self._earliest(now)
            if at[0] <= now:
                return at
            await anyio.sleep(at[0] - now)

    def horizon(self, n: int) -> float:
        """Seconds until ``n`` more slots could have been handed out, at the current pace.

        An estimate, without waiting: the per-second pace, and for the hourly window the free
        room now, then a full window's worth each time the oldest slots roll out.
        """
        if n <= 0:
            return 0.0
        now = self.clock()
        t = max(0.0, self._paused_until - now) + n / self.rate_at(now)
        if self.per_hour is not None:
            self._prune(now)
            room = self.per_hour - len(self._stamps)
            if n > room:
                oldest = self._stamps[0] if self._stamps else now
                windows = math.ceil((n - room) / self.per_hour)
                t = max(t, oldest + self.hour - now + (windows - 1) * self.hour)
        return t

    async def slot(self) -> float:
        """Wait for a slot and take it; returns its stamp (to ``refund`` it)."""
        async with self._lock:
            stamp, probe = await self._until_free()
            # on schedule when a grant is only a little late (a timer overshoots a millisecond
            # or so, which would cost 10% at 100/s), from the grant after a longer stall: that
            # is not made up with a burst, which a server counting per second would refuse.
            # "A little": under 10 ms: n slots on a schedule at 99% of the limit span
            # n / (0.99 * limit) s, so a second never holds more than the limit while each is
            # less than 1/99 s late (a quarter slot let 11 into a second at 10/s). Within that,
            # a quarter slot or 3 ms: at 360/s a busy event loop grants ~0.5 ms late, and
            # restarting the schedule on each (past a quarter slot, 0.7 ms) kept ~320/s; 3 ms
            # leaves ~7 ms of the 1% for the requests' own jitter on the way to the server
            gap = 1.0 / self.rate_at(stamp)
            late = stamp - self._next <= min(max(gap / 4, 0.003), 0.01)
            self._next = (self._next if late else stamp) + gap
            if self.per_hour is not None:
                bisect.insort(self._stamps, stamp)
            if probe:
                self._probes.add(stamp)
                self._probe_next = stamp + self._probe_interval
            return stamp

    def answered(self) -> None:
        """A request succeeded: refusals are no longer in a row. (Other answers, a 5xx or a
        400, leave the count alone: at worst a refusal after them waits the doubled pause,
        capped at a minute.)"""
        self._in_row = 0

    def accepted(self, stamp: float) -> None:
        """The request of this slot was accepted: it counts in the hourly window from now,
        when the answer came (the server counted it between the slot and now); a probe's
        success shortens the interval."""
        self.answered()
        if self._take(stamp):
            bisect.insort(self._stamps, max(stamp, self.clock()))
        if stamp in self._probes:
            self._probes.discard(stamp)
            # fast until the first refusal; then slowly, so that refusals stay rare (about one
            # in 200 probes once the interval has settled at what the server refills)
            # never below one per-second slot: the per-second pace caps probes anyway, and an
            # interval shrunk past it by a long run of accepted probes took hundreds of
            # refusals to grow back once the server's spare room ran out
            self._probe_interval = max(1.0 / self.limit, self._probe_interval * (
                0.999 if self._refused_once else 0.8))  # fmt: skip
            self._probe_next = min(self._probe_next, stamp + self._probe_interval)
            self._probe_ok = True

    def refused(self, stamp: float, retry_after: float | None) -> None:
        """A 429 for this slot's request: a probe's lengthens the interval, another's slows the
        per-second pace; either way the slot is handed back."""
        self.refund(stamp)
        if stamp in self._probes:
            self._probes.discard(stamp)
            self._refused_once = True
            # a refusal after an accepted probe is the settled rate's edge: step back a little;
            # refusals in a row mean the window is shut: back off fast
            grow = 1.25 if self._probe_ok else 2.0
            self._probe_ok = False
            self._probe_interval = min(self._probe_max, self._probe_interval * grow)
            self._probe_next = self.clock() + self._probe_interval
            self.throttled += 1
            return
        self.throttle(retry_after, stamp)

    def refund(self, stamp: float) -> None:
        """The request never counted (429, 5xx, not connected): free its hourly slot."""
        self._take(stamp)

    def _take(self, stamp: float) -> bool:
        """Remove this slot's stamp from the window; whether it was there."""
        i = bisect.bisect_left(self._stamps, stamp)
        if i < len(self._stamps) and self._stamps[i] == stamp:
            del self._stamps[i]
            return True
        return False

    def throttle(self, retry_after: float | None, sent: float | None = None) -> None:
        """A 429: slow the pace and, if the server said how long, pause everyone that long.

        The first 429 after a calm spell (``ramp`` seconds without one) cuts the pace by 10%:
        at 99% of the limit a lone refusal is a request's jitter on the way, not a wrong limit,
        and halving on it cost ~1.2 s of every 5,000 submits at 360/s. Another within the spell
        halves it: a limit set too high is found in a few refusals. A 429 for a request
        ``sent`` before the last cut was sent at the old pace and tells nothing new. Everyone
        pauses (``Retry-After``, else a slot at the new pace and at least 50 ms): a server
        counting per second still holds the second before the cut, and without the pause
        refused the next few requests too, each halving the pace (356/s to 60/s in 15 ms).
        """
        self.throttled += 1
        now = self.clock()
        if sent is not None and sent < self._since:  # sent at the old pace: no cut
            if retry_after is not None:
                self._pause_until(now + retry_after)
            return
        cut = 0.9 if now - self._since > self.ramp else 0.5
        self._base = max(self.floor, self.rate_at(now) * cut)
        # refusals with nothing answered between them (a quota used up elsewhere): each pause
        # twice the last, up to a minute, or the pace's climb during the round trip drew a
        # refusal every 0.6 s for as long as it lasted
        backoff = min(60.0, max(1.0 / self._base, 0.05) * 2.0 ** min(self._in_row, 12))
        self._in_row += 1
        self._pause_until(now + (backoff if retry_after is None else retry_after))
        self._since = self._paused_until

    def _pause_until(self, until: float) -> None:
        self._paused_until = max(self._paused_until, min(until, self.clock() + 3600.0))
