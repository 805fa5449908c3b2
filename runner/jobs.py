"""Job states and the small records that move between the store and the scheduler.

A job's life is ``pending -> submitting -> running -> done | failed``, plus ``cancelled``.
``submitting`` is committed before the submit request leaves, so a crash can leave a job there
but never lose it; on the next start such jobs are ambiguous (the server may have them) and are
sent again with the same idempotency key. ``running`` jobs carry an operation id and are only
ever polled, never resubmitted, unless the server says the operation is gone.

Records here are plain dataclasses: the store builds them from rows, the scheduler consumes
them, and neither needs to know about the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class State(StrEnum):
    PENDING = "pending"
    SUBMITTING = "submitting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (State.DONE, State.FAILED, State.CANCELLED)


@dataclass(frozen=True)
class Claim:
    """A job claimed for submission: its state is already ``submitting`` in the database."""

    rowid: int
    id: str
    body: str
    idem_key: str
    attempts: int
    faults: int = 0


@dataclass
class Running:
    """An operation the poller watches; ``polls`` counts this process's polls of it."""

    rowid: int
    operation_id: str
    submitted_at: float
    polls: int = 0
    errors: int = 0  # consecutive failed polls
    last_miss: float = 0.0  # age at the last poll that found it still running


@dataclass(frozen=True)
class ApiFailure:
    code: int
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class Completion:
    """A finished generation, normalised: token counts are ints, not the API's strings."""

    text: str
    alternative_status: str
    usage: dict[str, int]
    model_version: str
    tool_calls: Any = None
