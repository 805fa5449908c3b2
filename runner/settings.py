"""What a run is told and what it tells back: ``Settings`` (quotas, budgets, windows and the poll
policy, every one with the default the CLI documents) and ``Stats`` and ``Outage`` (what this
process saw, for the progress line and the run's summary).

They sit apart from ``scheduler`` so that the Python API, the progress line and the tests can
name a setting without importing the run loop. The persistent counters are the database's
(``reports``); nothing here is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.polling import PollPolicy

RETENTION = 3 * 24 * 3600.0  # the server keeps results 3 days


@dataclass
class Settings:
    submit_rps: float = 10.0
    submit_per_hour: int | None = 5000
    quota_window: float = 3600.0  # seconds in the hourly quota's window (compressed in benchmarks)
    poll_rps: float = 50.0
    poll_share: float = 0.9  # of the poll quota the poller may plan to use
    mode: str = "async"  # or "sync": POST /completion, no polling
    sync_concurrency: int = 10
    max_faults: int = 5
    max_resubmits: int = 2
    submit_concurrency: int = 0  # 0: enough for the pace (rate x 500 ms), at least 4
    poll_concurrency: int = 64
    op_deadline: float = 24 * 3600.0
    resubmit_stuck: bool = False
    retention: float = RETENTION
    max_outage: float | None = None
    probe_first: float = 1.0
    probe_max: float = 120.0
    paid_probe_every: float = 600.0  # see scheduler.LOST_SUBMITS
    context_budget: int = 32768  # tokens a chat's next turn may need (history + answer)
    storage_patience: float = 60.0  # seconds of failing commits before the run stops
    batch_window: float = 0.02  # an operation id (or sync answer) is committed this soon
    hold_window: float = 0.25  # other outcomes, and output appends, are gathered this long
    policy: PollPolicy = field(default_factory=PollPolicy)


@dataclass
class Stats:
    """What this process saw; the persistent counters are in the database (``status``)."""

    submitted: int = 0
    polls: int = 0
    finished: int = 0
    failed: int = 0
    throttled: int = 0
    stale: int = 0
    interrupted: bool = False


@dataclass
class Outage:
    family: str
    since: float  # wall clock
    error: str
    next_try_in: float
