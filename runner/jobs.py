"""Job states, the fencing token, the outcomes that move between scheduler and store, results.

A job's life is ``pending -> submitting -> running -> done | failed``, plus ``cancelled``.
``submitting`` is committed before a submit request leaves, so a crash can leave a job there but
never lose it; on the next start such a job is ambiguous (the server may have it) and is sent
again, counted. ``running`` jobs carry an operation id and are only polled, never resubmitted,
unless the server says the operation is gone or failed transiently.

Every claim starts a new *attempt* and bumps the job's ``fence``; an ``Attempt`` (row, fence and,
once known, the operation id) is the fencing token that every outcome carries, and the store
applies an outcome only while its token is current. A late, repeated or stale outcome therefore
changes nothing, whichever path produced it. ``Result`` is the public form of a finished job:
the same fields as a line of the output file, and ``to_dict()`` gives exactly that line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
class Attempt:
    """The fencing token: which attempt of which job an outcome belongs to."""

    rowid: int
    fence: int
    operation_id: str | None = None  # None while submitting (and in sync mode)

    def running(self, operation_id: str) -> Attempt:
        return Attempt(self.rowid, self.fence, operation_id)


@dataclass(frozen=True)
class Claim:
    """A job claimed for submission: already ``submitting`` in the database."""

    attempt: Attempt
    id: str
    body: str  # the stored request; a short model name is expanded when sending
    idem_key: str = ""
    faults: int = 0  # of this job's budget, since its last retry
    resubmits: int = 0
    chat: bool = False  # a conversation: an answer leads to its next turn


@dataclass
class Running:
    """An operation the poller watches (in memory; the row says ``running``)."""

    attempt: Attempt
    submitted_at: float  # wall clock, as stored
    resubmits: int = 0
    polls: int = 0  # this process's polls of it, recorded with its outcome
    born: float = 0.0  # its submit on the poller's (monotonic) clock: ages within a run
    slept: float = 0.0  # how long the machine had slept (suspended) since boot, at ``born``
    errors: int = 0  # consecutive failed polls
    faults: int = 0  # malformed answers: the operation's own faults
    last_miss: float = 0.0  # age at the last poll that found it still running
    scout: bool = False  # one of the run's first operations: polled finely until learned
    fresh: bool = False  # submitted by this process: its first poll is planned from its submit
    chat: bool = False  # a conversation: its answer leads to the next turn

    @property
    def operation_id(self) -> str:
        assert self.attempt.operation_id is not None
        return self.attempt.operation_id


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

    def as_result(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "text": self.text,
            "alternativeStatus": self.alternative_status,
            "usage": self.usage,
            "modelVersion": self.model_version,
        }
        if self.tool_calls is not None:
            result["toolCallList"] = self.tool_calls
        return result


# -- outcomes: what happened to one attempt ----------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    attempt: Attempt
    operation_id: str
    at: float


@dataclass(frozen=True)
class Answered:
    """A paid answer (a finished operation, or a sync completion)."""

    attempt: Attempt
    at: float
    completion: Completion
    polls: int = 0
    chat: bool = False  # a conversation's turn: the next one waits for this commit


@dataclass(frozen=True)
class Failed:
    attempt: Attempt
    at: float
    failure: ApiFailure
    polls: int = 0
    charged: bool = False  # the last of the job's own faults
    ambiguous: bool = False  # and its request may have created a (billed) operation
    unfinished: bool = False  # its operation was never seen to end: a retry polls it again


@dataclass(frozen=True)
class Requeued:
    """Back to pending: a fault, a 429, an outage, or an operation to submit again."""

    attempt: Attempt
    next_at: float
    polls: int = 0
    fault: ApiFailure | None = None  # charged to the job's fault budget
    error: ApiFailure | None = None  # shown as the last error, not charged
    ambiguous: bool = False  # the request may have reached the server (and be billed)
    resubmit: bool = False  # an operation existed and is gone or failed transiently
    max_faults: int = 0  # with a fault: fail the job instead once its budget is spent


@dataclass(frozen=True)
class Cancelled:
    attempt: Attempt
    at: float


@dataclass(frozen=True)
class Charged:
    """A fault found, after the fact, to be the job's own (others succeeded meanwhile).

    It counts against the budget whatever attempt the job is on now, and fails the job only if
    the job is still waiting to be resent from the attempt that failed.
    """

    attempt: Attempt
    at: float
    failure: ApiFailure
    max_faults: int


Outcome = Submitted | Answered | Failed | Requeued | Cancelled | Charged


# -- the public result --------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    input_text_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Usage:
        return cls(
            int(data.get("inputTextTokens", 0)),
            int(data.get("completionTokens", 0)),
            int(data.get("reasoningTokens", 0)),
            int(data.get("totalTokens", 0)),
        )


@dataclass(frozen=True)
class Result:
    """One finished job, as in the output file; ``to_dict()`` is exactly its JSONL line."""

    id: str
    status: str
    text: str | None = None
    usage: Usage | None = None
    error: ApiFailure | None = None
    alternative_status: str | None = None
    model_version: str | None = None
    operation_id: str | None = None
    attempts: int = 0
    turns: list[dict[str, Any]] | None = None
    messages: list[dict[str, Any]] | None = None
    line: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == State.DONE

    @classmethod
    def from_line(cls, line: dict[str, Any]) -> Result:
        error = line.get("error")
        usage = line.get("usage")
        return cls(
            id=line["id"],
            status=line["status"],
            text=line.get("text"),
            usage=Usage.from_dict(usage) if isinstance(usage, dict) else None,
            error=ApiFailure(int(error["code"]), str(error["message"])) if error else None,
            alternative_status=line.get("alternativeStatus"),
            model_version=line.get("modelVersion"),
            operation_id=line.get("operationId"),
            attempts=int(line.get("attempts", 0)),
            turns=line.get("turns"),
            messages=line.get("messages"),
            line=line,
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.line)
