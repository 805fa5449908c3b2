"""Live progress of a run: where the batch stands, how fast, what it costs, when it ends.

A ``Snapshot`` is built from what the scheduler keeps in memory plus two O(1) reads (the totals
and per-model usage rows), so taking one every second costs nothing measurable. The Python API
hands snapshots to a callback (none by default); the CLI draws them with rich on a terminal or
prints a plain line every ``interval`` seconds elsewhere.

The ETA is the quota's bound, not a guess from the recent rate: the submit pacer's horizon for
the jobs not yet submitted, plus the completion latency the poller has learned; once everything
is submitted, the poller's horizon (when the last operations are expected back). While the API
is unreachable the ETA means nothing, and the line says so instead: "API unreachable since
03:12 (HTTP 503), next try in 40 s".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runner import reports

if TYPE_CHECKING:
    from runner.scheduler import Scheduler
    from runner.settings import Outage


RATE_SPAN = 1.0  # seconds a rate is measured over, at least


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def outage_text(family: str, since: float, error: str, next_try_in: float) -> str:
    when = time.strftime("%H:%M", time.localtime(since))
    return (f"API unreachable since {when} ({error}; {family} requests), next try in "
            f"{duration(next_try_in)}")  # fmt: skip


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
    eta: float | None  # seconds; None: unknown (running past the prior, nothing learned)
    outages: list[Outage] = field(default_factory=list)
    storage: str | None = None  # the database cannot be written just now

    @property
    def state(self) -> str:
        if self.storage:
            return f"cannot write the database ({self.storage}); retrying"
        if self.outages:
            o = self.outages[0]
            return outage_text(o.family, o.since, o.error, o.next_try_in)
        return "ETA unknown (no answer yet)" if self.eta is None else f"ETA {duration(self.eta)}"

    def line(self) -> str:
        cost = f"~{self.cost['total']:.2f} {self.cost['currency']} (estimate)"
        return (
            f"done {self.done}, failed {self.failed}, running {self.running}, pending "
            f"{self.pending} | submits {self.submit_rate:.1f}/{self.submit_limit:g} per s, polls "
            f"{self.poll_rate:.1f}/{self.poll_limit:g} per s | tokens {self.tokens}, cost {cost} "
            f"| {self.state}"
        )


async def snapshot(sch: Scheduler, base: dict[str, int], prices: dict[str, float]) -> Snapshot:
    db = sch.queue.db
    tokens = int(await db.value("SELECT total_tokens FROM totals") or 0)
    now = time.monotonic()
    marks: list[tuple[float, int, int]] = getattr(sch, "_progress_marks", None) or [
        (sch.t0, 0, 0)  # rates over the run until a mark
    ]
    # rates since the newest mark at least a second old: a snapshot just after another (the
    # last one of a run) would divide a few requests by a few milliseconds
    while len(marks) > 1 and now - marks[1][0] >= RATE_SPAN:
        marks.pop(0)
    then, submits, polls = marks[0]
    span = max(RATE_SPAN, now - then)  # a run's first second: what it sent, per second
    marks.append((now, sch.stats.submitted, sch.stats.polls))
    sch._progress_marks = marks  # type: ignore[attr-defined]
    running = sch.tracked
    failed = base["failed"] + sch.stats.failed
    done = base["done"] + sch.stats.finished - sch.stats.failed
    total = sum(base.values())
    pending = max(0, total - done - failed - base["cancelled"] - running)
    if pending:  # the submit quota's bound for what is left, plus a latency
        eta: float | None = sch.submit_pacer.horizon(pending) + sch.policy.first
    else:  # counting down to when the last operations are expected back
        eta = sch.poller.eta() if running else 0.0
    s = sch.s
    return Snapshot(
        done, failed, running, pending, (sch.stats.submitted - submits) / span,
        (sch.stats.polls - polls) / span, s.submit_rps, s.poll_rps, tokens,
        await reports.cost(db, prices), eta,
        sch.outages(), sch.writer.trouble,
    )  # fmt: skip


def render(snap: Snapshot) -> Any:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    total = snap.done + snap.failed + snap.running + snap.pending
    share = (snap.done + snap.failed) / total if total else 1.0
    filled = int(share * 30)
    table.add_row("[bold]runner[/]", "█" * filled + "░" * (30 - filled), f"{share:6.1%}")
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
    table.add_row("usage", f"{snap.tokens} tokens   ~{cost['total']:.2f} {cost['currency']} "
                  "(estimate)", "")  # fmt: skip
    table.add_row("", f"[yellow]{snap.state}[/]" if snap.outages or snap.storage else snap.state, "")
    return table
