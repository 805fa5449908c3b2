"""Outage windows: which one covers a moment, and the driver that closes the listening socket.

An ``OutageSchedule`` holds the configured windows plus those started on demand through
``POST /emulator/outage``; times are seconds since the emulator began serving (monotonic). The
``503`` and ``reset`` kinds need nothing but a check on each request, done by the server's
middleware. The ``refuse`` kind acts on the socket itself: ``RefuseDriver`` is one task that
sleeps until the next window boundary (or until a new window is added), then closes or reopens
the ``Listener`` it was given. Only ``serve()`` owns a socket it can hand over, so an emulator
mounted some other way (``aiohttp.test_utils.TestServer``) cannot refuse connections and says
so at startup instead of silently serving through the window.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Iterable
from typing import Protocol

from runner.emulator.config import Outage

# when windows of several kinds overlap, the harshest wins
_PRECEDENCE = ("refuse", "reset", "503")


class Listener(Protocol):
    @property
    def listening(self) -> bool: ...

    async def open(self) -> int: ...

    async def close(self) -> None: ...


class OutageSchedule:
    def __init__(self, outages: Iterable[Outage] = ()) -> None:
        self.windows: list[Outage] = list(outages)

    def add(self, outage: Outage) -> None:
        self.windows.append(outage)

    def active(self, t: float) -> str | None:
        """The kind of outage in effect at ``t``, or None."""
        kinds = {w.kind for w in self.windows if w.covers(t)}
        return next((k for k in _PRECEDENCE if k in kinds), None)

    def refusing(self, t: float) -> bool:
        return any(w.kind == "refuse" and w.covers(t) for w in self.windows)

    def next_refuse_boundary(self, t: float) -> float | None:
        """The first start or end of a ``refuse`` window after ``t``."""
        edges = [
            edge
            for w in self.windows
            if w.kind == "refuse"
            for edge in (w.start, w.end)
            if edge > t
        ]
        return min(edges, default=None)


class RefuseDriver:
    """Keeps the listener closed exactly during ``refuse`` windows."""

    RETRY = 0.05  # seconds between attempts to listen again if the port is briefly taken

    def __init__(
        self,
        schedule: OutageSchedule,
        listener: Listener,
        clock: Callable[[], float],
        stats: collections.Counter[str],
    ) -> None:
        self.schedule = schedule
        self.listener = listener
        self.clock = clock
        self.stats = stats
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def poke(self) -> None:
        """The schedule changed: look again now."""
        self.wake.set()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def _run(self) -> None:
        while True:
            self.wake.clear()
            t = self.clock()
            timeout: float | None = None
            if self.schedule.refusing(t):
                if self.listener.listening:
                    await self.listener.close()
                    self.stats["outage_refuse"] += 1
            elif not self.listener.listening:
                try:
                    await self.listener.open()
                except OSError:
                    self.stats["outage_refuse_reopen_retries"] += 1
                    timeout = self.RETRY
            edge = self.schedule.next_refuse_boundary(t)
            if edge is not None:
                wait = max(0.0, edge - self.clock())
                timeout = wait if timeout is None else min(timeout, wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)
