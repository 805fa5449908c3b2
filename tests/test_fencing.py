"""Fencing: an outcome for an attempt that is no longer current changes nothing (issue 9.1).

Each test drives the queue through real transitions on a real SQLite file, then replays an
outcome of an earlier attempt, as a duplicate poll, a late answer or a loader that pages rows the
submitter already handles would, and checks that the row, the ledger and the totals are exactly
as they were, and that the stale outcome was counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner.database import Database
from runner.ingest import ingest
from runner.inputs import read_jobs
from runner.jobs import (
    Answered,
    ApiFailure,
    Attempt,
    Cancelled,
    Charged,
    Completion,
    Failed,
    Outcome,
    Requeued,
    Submitted,
)  # fmt: skip
from runner.queue import Queue
from tests.conftest import db_rows, write_jobs

pytestmark = pytest.mark.anyio

CHAT = {"id": "c", "turns": ["one", "two", "three"]}
PLAIN = {"id": "p", "prompt": "plain"}


def answer(text: str, tokens: int = 10) -> Completion:
    usage = {"inputTextTokens": tokens, "completionTokens": tokens, "reasoningTokens": 0,
             "totalTokens": 2 * tokens}  # fmt: skip
    return Completion(text, "ALTERNATIVE_STATUS_FINAL", usage, "v1")


def snapshot(db: Path) -> tuple[Any, ...]:
    return (
        db_rows(db, "SELECT * FROM jobs ORDER BY rowid"),
        db_rows(db, "SELECT * FROM operations ORDER BY seq"),
        db_rows(db, "SELECT input_tokens, completion_tokens, total_tokens, attempts, faults, "
                    "resubmits, ambiguous, polls FROM totals"),
    )  # fmt: skip


async def stale(q: Queue, db: Path, outcome: Outcome) -> None:
    """Apply ``outcome`` and check that it changed no job, only the stale count (and, for a
    first-arrived answer, the ledger: paid answers are counted and kept, never dropped)."""
    before = snapshot(db)
    [(count,)] = db_rows(db, "SELECT stale FROM totals")
    applied = await q.apply([outcome])
    assert applied.stale == 1 and applied.finished == applied.advanced == applied.requeued == 0
    after = snapshot(db)
    assert after[0] == before[0]  # every job row, byte for byte
    if not isinstance(outcome, Answered):
        assert after == before
    assert db_rows(db, "SELECT stale FROM totals") == [(count + 1,)]


@pytest.fixture
async def queue(tmp_path: Path) -> Any:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [CHAT, PLAIN])
    async with Database.open(str(tmp_path / "runner.db")) as db:
        await ingest(db, str(jobs), read_jobs(str(jobs), "yandexgpt-lite"))
        yield Queue(db)


async def submit(q: Queue, job: str, op: str) -> Attempt:
    claims = {c.id: c for c in await q.claim(10, 1e12)}
    a = claims[job].attempt
    await q.apply([Submitted(a, op, 1.0)])
    for other in claims.values():  # put back what this test does not drive
        if other.id != job:
            await q.unclaim([other])
    return a.running(op)


async def test_a_repeated_answer_of_turn_one_never_becomes_turn_twos(
    queue: Queue, tmp_path: Path
) -> None:
    db = tmp_path / "runner.db"
    t1 = await submit(queue, "c", "op-1")
    applied = await queue.apply([Answered(t1, 2.0, answer("first answer"), polls=1)])
    assert applied.advanced == 1
    t2 = await submit(queue, "c", "op-2")
    # the duplicate poll of turn 1 arrives while turn 2 is running
    await stale(queue, db, Answered(t1, 3.0, answer("first answer"), polls=1))
    [(state, turn, op, body)] = db_rows(db, "SELECT state, turn, operation_id, body FROM jobs WHERE id='c'")
    assert (state, turn, op) == ("running", 1, "op-2")
    sent = [m["text"] for m in json.loads(body)["messages"]]
    assert sent == ["one", "first answer", "two"]
    # turn 1's tokens were counted once, when its answer first arrived
    assert db_rows(db, "SELECT total_tokens FROM totals") == [(20,)]
    await queue.apply([Answered(t2, 4.0, answer("second answer"))])
    t3 = await submit(queue, "c", "op-3")
    await queue.apply([Answered(t3, 5.0, answer("third answer"))])
    [(result,)] = db_rows(db, "SELECT result FROM jobs WHERE id='c'")
    turns = json.loads(result)["turns"]
    assert [t["text"] for t in turns] == ["first answer", "second answer", "third answer"]
    assert [t["operationId"] for t in turns] == ["op-1", "op-2", "op-3"]


@pytest.mark.parametrize("kind", ["submitted", "answered", "failed", "requeued", "cancelled"])
async def test_every_outcome_of_an_old_attempt_is_refused(
    queue: Queue, tmp_path: Path, kind: str
) -> None:
    db = tmp_path / "runner.db"
    old = await submit(queue, "p", "op-old")
    await queue.apply([Requeued(old, 0.0, resubmit=True)])  # the operation expired
    await submit(queue, "p", "op-new")  # the job's current attempt
    late: Outcome = {
        "submitted": Submitted(Attempt(old.rowid, old.fence), "op-old", 9.0),
        "answered": Answered(old, 9.0, answer("late")),
        "failed": Failed(old, 9.0, ApiFailure(3, "late failure")),
        "requeued": Requeued(old, 0.0, resubmit=True),
        "cancelled": Cancelled(old, 9.0),
    }[kind]
    await stale(queue, db, late)
    assert db_rows(db, "SELECT state, operation_id FROM jobs WHERE id='p'") == [("running", "op-new")]


async def test_a_late_answer_is_counted_and_kept_not_dropped(queue: Queue, tmp_path: Path) -> None:
    db = tmp_path / "runner.db"
    old = await submit(queue, "p", "op-old")
    await queue.apply([Requeued(old, 0.0, resubmit=True)])
    await submit(queue, "p", "op-new")
    applied = await queue.apply([Answered(old, 9.0, answer("paid for", tokens=7))])
    assert applied.stale == 1
    # the job is untouched, but the answer was paid for: its tokens count, its text is kept
    assert db_rows(db, "SELECT state FROM jobs WHERE id='p'") == [("running",)]
    assert db_rows(db, "SELECT total_tokens FROM totals") == [(14,)]
    [(orphan,)] = db_rows(db, "SELECT orphan FROM operations WHERE operation_id='op-old'")
    assert json.loads(orphan)["text"] == "paid for"


async def test_outcomes_after_a_retry_belong_to_the_old_attempt(
    queue: Queue, tmp_path: Path
) -> None:
    db = tmp_path / "runner.db"
    first = await submit(queue, "p", "op-1")
    await queue.apply([Failed(first, 2.0, ApiFailure(3, "refused"))])
    assert await queue.retry(("failed",), None) == 1
    await submit(queue, "p", "op-2")
    await stale(queue, db, Answered(first, 3.0, answer("late")))
    await stale(queue, db, Failed(first, 3.0, ApiFailure(13, "late")))


async def test_a_stale_unclaim_or_charge_changes_no_state(queue: Queue, tmp_path: Path) -> None:
    db = tmp_path / "runner.db"
    [c1, p1] = await queue.claim(10, 1e12)
    await queue.unclaim([c1, p1])
    [_, p2] = await queue.claim(10, 1e12)
    await queue.unclaim([c1])  # the first claim's fence is spent: nothing happens
    assert db_rows(db, "SELECT state FROM jobs WHERE id='c'") == [("submitting",)]
    await queue.apply([Requeued(p2.attempt, 0.0, error=ApiFailure(14, "suspect"))])
    [p3] = [c for c in await queue.claim(10, 1e12) if c.id == "p"]
    # a fault proven later counts against the budget but cannot fail a newer attempt
    await queue.apply([Charged(p2.attempt, 5.0, ApiFailure(14, "his own"), max_faults=1)])
    assert db_rows(db, "SELECT state, faults FROM jobs WHERE id='p'") == [("submitting", 1)]
    assert p3.attempt.fence > p2.attempt.fence


async def test_a_transaction_cancelled_while_it_begins_leaves_none_open(tmp_path: Path) -> None:
    # CI, SIGTERM under load: the claimer was cancelled while its BEGIN ran in aiosqlite's
    # thread; the BEGIN happened, nothing rolled it back, and every later transaction failed
    # with "cannot start a transaction within a transaction" (the unclaim of jobs never sent
    # too, leaving them to be counted as ambiguous submits)
    import sqlite3
    import threading

    path = str(tmp_path / "t.db")
    async with Database.open(path) as db:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # holds the write lock: our BEGIN waits in the thread
        threading.Timer(0.5, other.execute, ("COMMIT",)).start()
        with anyio.move_on_after(0.1):  # the signal arrives while the BEGIN waits
            async with db.transaction() as con:
                await con.execute("UPDATE totals SET stale = stale + 1")
        async with db.transaction() as con:  # the next one must be able to begin
            await con.execute("UPDATE totals SET stale = stale + 10")
        assert await db.value("SELECT stale FROM totals") == 10
        other.close()
