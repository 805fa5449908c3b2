"""Live progress of a run: where the batch stands, how fast, what it costs, when it ends.

A ``Snapshot`` is built from what the scheduler already keeps in memory plus two O(1) reads
(the totals and per-model usage rows), so taking one every second costs nothing measurable.
On a terminal it is drawn with rich on stderr and redrawn in place; elsewhere (CI, pipes,
``-v``) it is a plain line every ``interval`` seconds; ``-q`` turns it off.

The ETA is the quota's bound, not a guess from the recent rate: the submit pacer's horizon
for the jobs not yet submitted (per second and per rolling hour), plus the completion latency
the poller has learned (its first-poll quantile) for the last of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import click

from runner import pricing

if TYPE_CHECKING:
    from runner.scheduler import Scheduler


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclass
class Snapshot:
    done: int
    failed: int
    running: int
    pending: int
    submit_rate: float
    poll_rate: float
    submit_limit: float
    poll_limit: float
    tokens: int
    cost: dict[str, Any]
    eta: float

    def line(self) -> str:
        cost = f"~{self.cost['total']:.2f} {self.cost['currency']} (estimate)"
        return (
            f"done {self.done}, failed {self.failed}, running {self.running}, pending {self.pending} | "
            f"submits {self.submit_rate:.1f}/{self.submit_limit:g} per s, polls "
            f"{self.poll_rate:.1f}/{self.poll_limit:g} per s | tokens {self.tokens}, cost {cost} | "
            f"ETA {duration(self.eta)}"
        )


class Progress:
    def __init__(
        self, scheduler: Scheduler, prices: dict[str, float], mode: str, interval: float
    ) -> None:
        self.scheduler = scheduler
        self.prices = prices
        self.mode = mode  # "tty" | "plain" | "off"
        self.interval = interval
        self._last = (time.monotonic(), 0, 0)

    async def snapshot(self) -> Snapshot:
        sch = self.scheduler
        s = sch.s
        store = sch.store
        totals = await store.totals()
        usage = await store.usage_by_model()
        now = time.monotonic()
        then, submits, polls = self._last
        span = max(1e-6, now - then)
        rates = ((sch.stats.submitted - submits) / span, (sch.stats.polls - polls) / span)
        self._last = (now, sch.stats.submitted, sch.stats.polls)
        running = sch.tracked
        done = sch.base["done"] + sch.stats.finished - sch.stats.failed
        failed = sch.base["failed"] + sch.stats.failed
        pending = max(0, sch.total - done - failed - sch.base["cancelled"] - running)
        to_submit = sch.submit_pacer.horizon(pending)
        latency = sch.policy.first if (pending or running) else 0.0
        return Snapshot(
            done, failed, running, pending, rates[0], rates[1], s.submit_rps, s.poll_rps,
            totals["totalTokens"], pricing.estimate(usage, self.prices, s.mode),
            to_submit + latency,
        )  # fmt: skip

    async def run(self) -> None:
        if self.mode == "off":
            return
        if self.mode == "plain":
            while True:
                await anyio.sleep(self.interval)
                snap = await self.snapshot()
                click.echo(f"{time.strftime('%H:%M:%S')} progress: {snap.line()}", err=True)
        from rich.console import Console
        from rich.live import Live

        console = Console(stderr=True)
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            try:
                while True:
                    live.update(render(await self.snapshot()))
                    await anyio.sleep(self.interval)
            finally:
                with anyio.CancelScope(shield=True):
                    live.update(render(await self.snapshot()))


def render(snap: Snapshot) -> Any:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    total = snap.done + snap.failed + snap.running + snap.pending
    share = (snap.done + snap.failed) / total if total else 1.0
    bar_width = 30
    filled = int(share * bar_width)
    table.add_row("[bold]runner[/]", "█" * filled + "░" * (bar_width - filled), f"{share:6.1%}")
    table.add_row(
        "jobs",
        f"[green]done {snap.done}[/]  [red]failed {snap.failed}[/]  "
        f"[cyan]running {snap.running}[/]  pending {snap.pending}",
        "",
    )
    table.add_row(
        "rates",
        f"submits {snap.submit_rate:.1f}/{snap.submit_limit:g} per s   "
        f"polls {snap.poll_rate:.1f}/{snap.poll_limit:g} per s",
        "",
    )
    cost = snap.cost
    table.add_row(
        "usage",
        f"{snap.tokens} tokens   ~{cost['total']:.2f} {cost['currency']} (estimate)",
        f"ETA {duration(snap.eta)}",
    )
    return table
