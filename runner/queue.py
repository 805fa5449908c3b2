"""The job queue: claims and fenced outcomes. The only code that changes a job's state.

A claim is one ``UPDATE ... RETURNING`` committed before any request leaves: it moves due jobs
to ``submitting``, counts the try (``attempts``) and bumps the fencing token (``fence``). Every
outcome names its attempt (row, fence and operation id), and ``apply`` writes a batch of them in
one transaction: it reads the rows once, checks each outcome against the row as it stands (and
as earlier outcomes in the same batch left it), and writes the survivors with a few
``executemany`` statements whose WHERE clauses repeat the token. An outcome for an attempt that
is no longer current changes nothing and is counted in ``totals.stale``.

Paid answers are counted in the ``operations`` ledger whatever becomes of the job: tokens are
added once per operation when its answer first arrives (a repeated poll adds nothing), and an
answer that cannot be applied to its job is kept there as an orphan. Chat progression is
``runner.chat``'s; this module only reads the chat into it and writes what it decides.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from runner import chat, output
from runner.database import Database
from runner.inputs import canonical
from runner.jobs import (
    Answered,
    ApiFailure,
    Attempt,
    Cancelled,
    Charged,
    Claim,
    Failed,
    Outcome,
    Requeued,
    Running,
    Submitted,
)

_JSON = json.JSONEncoder(ensure_ascii=False)

# the last finishing number: without the WHERE, SQLite cannot use the partial index on
# finish_seq and scans every job, once per batch of outcomes (2 ms at 6,000 jobs, growing)
TOP_SEQ = "SELECT COALESCE(MAX(finish_seq), 0) FROM jobs WHERE finish_seq IS NOT NULL"

# a running operation as the poller holds it
_RUNNING = "rowid, fence, operation_id, submitted_at, resubmits - resubmits_base, turns IS NOT NULL"


def _running(r: Any) -> Running:
    return Running(Attempt(r[0], r[1], r[2]), float(r[3] or 0), r[4], chat=bool(r[5]))


_SQL = {
    "submitted": "UPDATE jobs SET state = 'running', operation_id = ?, submitted_at = ?, "
    "next_at = ? WHERE rowid = ? AND fence = ? AND state = 'submitting'",
    "ledger": "INSERT OR IGNORE INTO operations (job, fence, turn, operation_id, sent_at, "
    "ambiguous) VALUES (?, ?, ?, ?, ?, ?)",
    "answer": "UPDATE operations SET answered_at = ?, input_tokens = ?, completion_tokens = ?, "
    "reasoning_tokens = ?, total_tokens = ?, orphan = ? "
    "WHERE operation_id = ? AND answered_at IS NULL",
    "sync_answer": "INSERT OR IGNORE INTO operations (job, fence, turn, sent_at, answered_at, "
    "input_tokens, "
    "completion_tokens, reasoning_tokens, total_tokens, orphan) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
    "?, ?)",
    "done": "UPDATE jobs SET state = 'done', finished_at = ?, finish_seq = ?, polls = polls + ?, "
    "result = ?, transcript = ?, error = NULL WHERE rowid = ? AND fence = ? AND state = ? "
    "AND operation_id IS ?",
    "failed": "UPDATE jobs SET state = 'failed', finished_at = ?, finish_seq = ?, "
    "polls = polls + ?, faults = faults + ?, ambiguous = ambiguous + ?, op_unfinished = ?, "
    "error = ?, "
    "transcript = COALESCE(?, transcript), "
    "turn = COALESCE(?, turn), body = COALESCE(?, body) "
    "WHERE rowid = ? AND fence = ? AND state = ? AND operation_id IS ?",
    "next_turn": "UPDATE jobs SET state = 'pending', next_at = 0, polls = polls + ?, turn = ?, "
    "body = ?, transcript = ?, operation_id = NULL, idem_key = NULL, error = NULL "
    "WHERE rowid = ? AND fence = ? AND state = ? AND operation_id IS ?",
    "requeued": "UPDATE jobs SET state = 'pending', next_at = ?, polls = polls + ?, "
    "faults = faults + ?, ambiguous = ambiguous + ?, resubmits = resubmits + ?, "
    "error = COALESCE(?, error), operation_id = NULL, "
    "idem_key = CASE WHEN ? THEN NULL ELSE idem_key END "
    "WHERE rowid = ? AND fence = ? AND state = ? AND operation_id IS ?",
    "chat_cancelled": "UPDATE jobs SET state = 'cancelled', finished_at = ?, finish_seq = ?, "
    "polls = polls + ?, turn = ?, body = ?, transcript = ? "
    "WHERE rowid = ? AND fence = ? AND state = ? AND operation_id IS ?",
    "requeued_cancelled": "UPDATE jobs SET state = 'cancelled', finished_at = ?, finish_seq = ?, "
    "polls = polls + ?, ambiguous = ambiguous + ? "
    "WHERE rowid = ? AND fence = ? AND state = ? AND operation_id IS ?",
    "cancelled": "UPDATE jobs SET state = 'cancelled', finished_at = ?, finish_seq = ? "
    "WHERE rowid = ? AND fence = ? AND state = 'running' AND operation_id = ?",
    "charged": "UPDATE jobs SET faults = faults + 1, error = ? WHERE rowid = ?",
    "charged_out": "UPDATE jobs SET state = 'failed', finished_at = ?, finish_seq = ?, error = ? "
    "WHERE rowid = ? AND fence = ? AND state = 'pending'",
}
# the order statements run in: a job's Submitted precedes its other outcomes in a batch
_ORDER = ("submitted", "ledger", "answer", "sync_answer", "done", "failed", "next_turn",
          "chat_cancelled", "requeued", "requeued_cancelled", "cancelled", "charged",
          "charged_out")  # fmt: skip


@dataclass
class _Row:
    fence: int
    state: str
    operation_id: str | None
    turn: int
    submitted_at: float | None
    faults: int
    chat: chat.Chat | None
    cancel: bool = False  # `runner cancel` asked: a collected answer finishes it, nothing more


@dataclass
class Applied:
    finished: int = 0  # jobs that reached done, failed or cancelled
    advanced: int = 0  # chats whose next turn became pending
    requeued: int = 0
    stale: int = 0
    failed: int = 0


@dataclass
class _Batch:
    rows: dict[int, _Row]
    seq: int
    at: float
    budget: int
    applied: Applied = field(default_factory=Applied)
    writes: dict[str, list[tuple[Any, ...]]] = field(default_factory=lambda: defaultdict(list))

    def current(self, a: Attempt) -> _Row | None:
        """The row, if ``a`` is its current attempt in the state an outcome of it expects."""
        row = self.rows.get(a.rowid)
        if row is None or row.fence != a.fence or row.operation_id != a.operation_id:
            return None
        if row.state != ("submitting" if a.operation_id is None else "running"):
            return None
        return row

    def guard(self, a: Attempt, row: _Row) -> tuple[Any, ...]:
        return (a.rowid, a.fence, row.state, a.operation_id)

    def finish(self, row: _Row, state: str) -> int:
        row.state = state
        self.seq += 1
        self.applied.finished += 1
        return self.seq


async def _clock_stepped_back(con: Any, now: float) -> None:
    """Times stored ahead of the clock (it was stepped back since: NTP, a hardware clock kept in
    local time, a restored VM) are taken as now: a running job's submit time orders the
    operations a run loads (one ahead of the run's start was never loaded, and never polled),
    and a pending job due further ahead than any back-off (an hour's Retry-After at most)
    would wait out the step."""
    await con.execute(
        "UPDATE jobs SET submitted_at = MIN(submitted_at, ?), next_at = ? "
        "WHERE state = 'running' AND next_at > ?",
        (now, now, now),
    )
    await con.execute(
        "UPDATE jobs SET next_at = ? WHERE state = 'pending' AND next_at > ?", (now, now + 3700.0)
    )


async def _unsent_again(con: Any) -> int:
    """Jobs a dead process left mid-submit go back to pending, each counted as ambiguous and
    recorded in the ledger: the server may have created (and billed) their operation."""
    await con.execute(
        "INSERT INTO operations (job, fence, turn, sent_at, ambiguous) "
        "SELECT rowid, fence, turn, COALESCE(submitted_at, ?), 1 FROM jobs "
        "WHERE state = 'submitting'",
        (time.time(),),
    )
    cur = await con.execute(
        "UPDATE jobs SET state = 'pending', ambiguous = ambiguous + 1, next_at = 0 "
        "WHERE state = 'submitting'"
    )
    return int(cur.rowcount)


class Queue:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- claiming -------------------------------------------------------------------------

    async def recover(self) -> int:
        """Jobs a dead process left mid-submit: their fate is unknown, so send them again,
        counted as ambiguous and recorded in the ledger (they may be billed and count against
        the hourly quota)."""
        async with self.db.transaction() as con:
            await _clock_stepped_back(con, time.time())
            return await _unsent_again(con)

    async def claim(self, limit: int, now: float) -> list[Claim]:
        async with self.db.transaction() as con:
            rows = await con.execute_fetchall(
                "UPDATE jobs SET state = 'submitting', attempts = attempts + 1, fence = fence + 1, "
                "idem_key = COALESCE(idem_key, uuid4()), submitted_at = ?, operation_id = NULL "
                "WHERE rowid IN (SELECT rowid FROM jobs WHERE state = 'pending' AND next_at <= ? "
                "ORDER BY next_at LIMIT ?) "
                "RETURNING rowid, fence, id, body, idem_key, faults - faults_base, "
                "resubmits - resubmits_base, turns IS NOT NULL",
                (now, now, limit),
            )
        claims = [Claim(Attempt(r[0], r[1]), r[2], r[3], r[4], r[5], r[6], bool(r[7])) for r in rows]
        return sorted(claims, key=lambda c: c.attempt.rowid)

    async def unclaim(self, claims: list[Claim]) -> None:
        """Claims that never left go back to pending, uncounted; their fence stays spent."""
        async with self.db.transaction() as con:
            await con.executemany(
                "UPDATE jobs SET state = 'pending', attempts = attempts - 1 "
                "WHERE rowid = ? AND fence = ? AND state = 'submitting'",
                [(c.attempt.rowid, c.attempt.fence) for c in claims],
            )

    async def next_pending_at(self) -> float | None:
        value = await self.db.value("SELECT MIN(next_at) FROM jobs WHERE state = 'pending'")
        return None if value is None else float(value)

    async def running_page(
        self, after: tuple[float, int], limit: int, before: float
    ) -> list[Running]:
        """Operations submitted before ``before`` (a running job's next_at is its submit time)."""
        rows = await self.db.rows(
            f"SELECT {_RUNNING} FROM jobs WHERE state = 'running' AND next_at < ? "
            "AND (next_at, rowid) > (?, ?) ORDER BY next_at, rowid LIMIT ?",
            before, *after, limit,
        )  # fmt: skip
        return [_running(r) for r in rows]

    async def recent_submits(self, since: float) -> list[float]:
        """Wall-clock times of submits that may count against the hourly quota since ``since``."""
        rows = await self.db.rows(
            "SELECT sent_at FROM operations WHERE sent_at > ? ORDER BY sent_at", since
        )
        return [float(r[0]) for r in rows]

    # -- operator actions (run under the run lock) ------------------------------------------

    async def retry(self, states: tuple[str, ...], error_code: int | None) -> int:
        """Move finished jobs back to pending with a fresh budget, keeping their outcome in
        job_history. A chat keeps its answered turns and resumes at its unanswered one.

        Output files are derived from the database; since retried jobs will finish again, every
        recorded output is marked for a rebuild so none ends up with two lines for a job.
        """
        marks = ",".join("?" * len(states))
        cond = f"state IN ({marks}) AND (? IS NULL OR json_extract(error, '$.code') = ?)"
        args = (*states, error_code, error_code)
        async with self.db.transaction() as con:
            await con.execute(
                "INSERT INTO job_history (job, at, state, attempts, operation_id, error, result) "
                f"SELECT rowid, ?, state, attempts, operation_id, error, result FROM jobs WHERE {cond}",
                (time.time(), *args),
            )
            fresh = ("finish_seq = NULL, finished_at = NULL, faults_base = faults, "
                     "resubmits_base = resubmits, result = NULL, error = NULL, "
                     "cancel_requested = 0, op_unfinished = 0")  # fmt: skip
            # an operation never seen to end is polled again, not paid for again; a running
            # job's next_at is its submit time (what the loader orders by, status ages)
            resumed = await con.execute(
                f"UPDATE jobs SET state = 'running', next_at = COALESCE(submitted_at, 0), {fresh} "
                f"WHERE {cond} AND op_unfinished AND operation_id IS NOT NULL",
                args,
            )
            cur = await con.execute(
                f"UPDATE jobs SET state = 'pending', next_at = 0, {fresh}, idem_key = NULL, "
                f"operation_id = NULL WHERE {cond}",
                args,
            )
            moved = cur.rowcount + resumed.rowcount
            if moved:
                await output.invalidate(con)
        return moved

    async def cancel_pending(self, running: bool = False) -> int:
        """Cancel every job not yet sent, including those a killed run left mid-submit: those
        are counted as ambiguous (the server may have them), and the next run sends none.
        ``running``: in the same transaction, mark the running jobs as cancelled by the user:
        their answers, if they come, are recorded and finish them; nothing more is sent for
        them (a chat's next turn, or a resubmit)."""
        async with self.db.transaction() as con:
            if running:
                await con.execute("UPDATE jobs SET cancel_requested = 1 WHERE state = 'running'")
            await _unsent_again(con)
            cur = await con.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, "
                f"finish_seq = p.n + ({TOP_SEQ}) "
                "FROM (SELECT rowid AS r, ROW_NUMBER() OVER (ORDER BY rowid) AS n FROM jobs "
                "WHERE state = 'pending') AS p WHERE jobs.rowid = p.r",
                (time.time(),),
            )
            return cur.rowcount

    async def running(self) -> list[Running]:
        rows = await self.db.rows(
            f"SELECT {_RUNNING} FROM jobs WHERE state = 'running' ORDER BY next_at"
        )
        return [_running(r) for r in rows]

    # -- outcomes -------------------------------------------------------------------------

    async def apply(self, outcomes: list[Outcome], budget: int = 32768) -> Applied:
        """Write a batch of outcomes in one transaction, each only if its attempt is current."""
        if not outcomes:
            return Applied()
        async with self.db.transaction() as con:
            rows, top = await self._rows(outcomes)
            batch = _Batch(rows, top, time.time(), budget)
            for outcome in outcomes:
                if not self._one(batch, outcome):
                    batch.applied.stale += 1
            for name in _ORDER:
                if batch.writes.get(name):
                    await con.executemany(_SQL[name], batch.writes[name])
            if batch.applied.stale:
                await con.execute(
                    "UPDATE totals SET stale = stale + ? WHERE id = 1", (batch.applied.stale,)
                )
        return batch.applied

    async def _rows(self, outcomes: list[Outcome]) -> tuple[dict[int, _Row], int]:
        """The rows the outcomes name, and the last finishing number (read with them: one
        query; with no row found nothing can finish, so the number is not needed)."""
        ids = sorted({o.attempt.rowid for o in outcomes})
        rows: dict[int, _Row] = {}
        top = 0
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            for r in await self.db.rows(
                "SELECT rowid, fence, state, operation_id, turn, submitted_at, "
                "faults - faults_base, turns, CASE WHEN turns IS NULL THEN NULL ELSE body END, "
                f"transcript, ({TOP_SEQ}), cancel_requested FROM jobs "
                f"WHERE rowid IN ({','.join('?' * len(part))})",
                *part,
            ):
                top = int(r[10])
                conversation = None
                if r[7] is not None:
                    conversation = chat.Chat(
                        json.loads(r[7]), r[4], json.loads(r[8]), json.loads(r[9] or "[]")
                    )
                rows[r[0]] = _Row(r[1], r[2], r[3], r[4], r[5], r[6], conversation, bool(r[11]))
        return rows, top

    def _one(self, b: _Batch, o: Outcome) -> bool:
        """Stage one outcome's writes; False if it is stale (its attempt is not current)."""
        a = o.attempt
        if isinstance(o, Answered):
            self._ledger_answer(b, o)
        if isinstance(o, Charged):
            return self._charge(b, o)
        row = b.current(a)
        if row is None:
            return False
        guard = b.guard(a, row)  # taken before the row view moves on
        w = b.writes
        if isinstance(o, Submitted):
            w["submitted"].append((o.operation_id, o.at, o.at, a.rowid, a.fence))
            w["ledger"].append((a.rowid, a.fence, row.turn, o.operation_id, o.at, 0))
            row.state, row.operation_id = "running", o.operation_id
        elif isinstance(o, Answered):
            self._answer(b, row, o, guard)
        elif isinstance(o, Failed):
            if o.ambiguous:
                w["ledger"].append((a.rowid, a.fence, row.turn, None, row.submitted_at or b.at, 1))
            failure = chat.label(row.chat, o.failure) if row.chat else o.failure
            self._fail(b, row, failure, o.polls, guard, o.charged, o.ambiguous, o.unfinished)
        elif isinstance(o, Requeued):
            if o.ambiguous:
                w["ledger"].append((a.rowid, a.fence, row.turn, None, row.submitted_at or b.at, 1))
            if o.fault is not None and o.max_faults and row.faults + 1 >= o.max_faults:
                # the budget is counted here, under the write lock, where charges proven late
                # (``Charged``) are already in: the job's own faults are spent
                row.faults += 1
                failure = chat.label(row.chat, o.fault) if row.chat else o.fault
                self._fail(b, row, failure, o.polls, guard, True, o.ambiguous)
                return True
            if row.cancel:  # sent again, it would be paid for again: it stops here
                w["requeued_cancelled"].append(
                    (b.at, b.finish(row, "cancelled"), o.polls, int(o.ambiguous), *guard)
                )
                return True
            row.faults += o.fault is not None
            error = o.fault or o.error
            w["requeued"].append((
                o.next_at, o.polls, int(o.fault is not None), int(o.ambiguous), int(o.resubmit),
                _JSON.encode(error.as_dict()) if error else None, int(o.resubmit), *guard,
            ))  # fmt: skip
            row.state, row.operation_id = "pending", None
            b.applied.requeued += 1
        elif isinstance(o, Cancelled):
            w["cancelled"].append((o.at, b.finish(row, "cancelled"), a.rowid, a.fence, a.operation_id))
        return True

    def _ledger_answer(self, b: _Batch, o: Answered) -> None:
        """Count the answer's tokens once per operation, whether or not the job takes it."""
        a, u = o.attempt, o.completion.usage
        tokens = (u.get("inputTextTokens", 0), u.get("completionTokens", 0),
                  u.get("reasoningTokens", 0), u.get("totalTokens", 0))  # fmt: skip
        orphan = None if b.current(a) else _JSON.encode(o.completion.as_result())
        if a.operation_id is not None:
            b.writes["answer"].append((o.at, *tokens, orphan, a.operation_id))
        else:
            row = b.rows.get(a.rowid)
            turn = row.turn if row else 0
            sent = row.submitted_at if row and row.submitted_at else o.at
            b.writes["sync_answer"].append((a.rowid, a.fence, turn, sent, o.at, *tokens, orphan))

    def _answer(self, b: _Batch, row: _Row, o: Answered, guard: tuple[Any, ...]) -> None:
        c = o.completion
        if row.chat is None:
            seq = b.finish(row, "done")
            b.writes["done"].append(
                (o.at, seq, o.polls, _JSON.encode(c.as_result()), None, *guard)
            )
            return
        step = chat.answer(row.chat, c, o.attempt.operation_id, b.budget)
        transcript = _JSON.encode(step.transcript)
        if isinstance(step, chat.Done):
            seq = b.finish(row, "done")
            b.writes["done"].append(
                (o.at, seq, o.polls, _JSON.encode(step.result), transcript, *guard)
            )
        elif row.cancel:  # the answered turn is its last (a turn over budget: cancelled too)
            b.writes["chat_cancelled"].append((
                o.at, b.finish(row, "cancelled"), o.polls, step.turn, canonical(step.body),
                transcript, *guard,
            ))  # fmt: skip
        elif isinstance(step, chat.Next):
            b.writes["next_turn"].append(
                (o.polls, step.turn, canonical(step.body), transcript, *guard)
            )
            row.state, row.operation_id = "pending", None
            b.applied.advanced += 1
        else:
            row.chat = chat.Chat(row.chat.turns, step.turn, step.body, step.transcript)
            self._fail(b, row, step.failure, o.polls, guard)

    def _fail(
        self, b: _Batch, row: _Row, failure: ApiFailure, polls: int, guard: tuple[Any, ...],
        charged: bool = False, ambiguous: bool = False, unfinished: bool = False,
    ) -> None:  # fmt: skip
        c = row.chat
        b.writes["failed"].append((
            b.at, b.finish(row, "failed"), polls, int(charged), int(ambiguous), int(unfinished),
            _JSON.encode(failure.as_dict()),
            _JSON.encode(c.transcript) if c else None, c.turn if c else 0,
            canonical(c.body) if c else None, *guard,
        ))  # fmt: skip
        b.applied.failed += 1

    def _charge(self, b: _Batch, o: Charged) -> bool:
        a = o.attempt
        row = b.rows.get(a.rowid)
        if row is None or row.fence < a.fence:
            return False
        b.writes["charged"].append((_JSON.encode(o.failure.as_dict()), a.rowid))
        row.faults += 1
        if row.faults >= o.max_faults and row.fence == a.fence and row.state == "pending":
            failure = chat.label(row.chat, o.failure) if row.chat else o.failure
            seq = b.finish(row, "failed")
            b.writes["charged_out"].append(
                (o.at, seq, _JSON.encode(failure.as_dict()), a.rowid, a.fence)
            )
            b.applied.failed += 1
        return True
