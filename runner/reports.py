"""Reading what the database holds: counts, the status report, job listings, one job in full.

Every figure has one definition, kept in the database and used everywhere (``runner status``,
the run's summary, the Python API): ``submits`` are submit requests sent (each claim that left,
ambiguous ones included); ``ambiguousSubmits`` those whose answer was lost, so they may have been
billed without runner learning the operation; ``resubmits`` jobs sent again because their
operation expired, stuck or failed transiently; ``faults`` failures charged to a job's own
budget; ``polls`` polls recorded with an outcome; ``staleOutcomes`` answers that arrived for an
attempt no longer current and changed nothing. Tokens are counted per operation as answers
arrive, so a failed chat still shows the turns it paid for.

Nothing here touches the network, so these need no HTTP stack, and every figure comes from an
index or a trigger-kept table, not from a scan of the jobs: ``status`` answers in well under a
second on a million jobs.
"""

from __future__ import annotations

import json
import time
from typing import Any

from runner import pricing
from runner.database import Database, RunLock
from runner.jobs import State

COUNTERS = {
    "submits": "attempts", "ambiguousSubmits": "ambiguous", "resubmits": "resubmits",
    "faults": "faults", "polls": "polls", "staleOutcomes": "stale",
}  # fmt: skip
TOKENS = {"inputTextTokens": "input_tokens", "completionTokens": "completion_tokens",
          "reasoningTokens": "reasoning_tokens", "totalTokens": "total_tokens"}  # fmt: skip


async def counts(db: Database) -> dict[str, int]:
    found = {s.value: 0 for s in State}
    for state, n in await db.rows("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
        found[state] = n
    return found


async def totals(db: Database) -> dict[str, int]:
    """The persistent counters and token totals, under their reported names."""
    names = {**COUNTERS, **TOKENS}
    row = await db.row(f"SELECT {', '.join(names.values())} FROM totals")
    return {k: int(row[i]) if row else 0 for i, k in enumerate(names)}


async def cost(db: Database, prices: dict[str, float]) -> dict[str, Any]:
    """What the tokens recorded cost: synchronous ones at the synchronous price, whatever the
    mode of the run asking (a database can hold both)."""
    rows = await db.rows("SELECT model, total_tokens, sync_tokens FROM usage_by_model")
    return pricing.estimate({str(m): int(t) for m, t, _ in rows}, prices,
                            sync_tokens={str(m): int(x) for m, _, x in rows})  # fmt: skip


async def status(db: Database, prices: dict[str, float] | None = None) -> dict[str, Any]:
    found = await counts(db)
    kept = await totals(db)
    oldest = await db.value("SELECT MIN(next_at) FROM jobs WHERE state = 'running'")
    errors = await db.rows(
        "SELECT json_extract(error, '$.code'), json_extract(error, '$.message'), COUNT(*) "
        "FROM jobs WHERE state = 'failed' GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 5"
    )
    live = RunLock.held(db.path)
    outage = await db.get_state("outage") if live else None
    return {
        "database": db.path,
        "live": live,
        "total": sum(found.values()),
        **found,
        "usage": {k: kept[k] for k in TOKENS},
        "cost": await cost(db, prices or pricing.ASYNC_PRICE_PER_1K),
        **{k: kept[k] for k in COUNTERS},
        "oldestRunningAgeSeconds": None if oldest is None else round(time.time() - oldest, 1),
        "topErrors": [{"code": c, "message": m, "count": n} for c, m, n in errors],
        "outage": outage or None,
    }


async def jobs(db: Database, state: str | None, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Up to ``limit`` jobs (in input order) and how many matched in all."""
    where, args = ("WHERE state = ?", [state]) if state else ("", [])
    total = int(await db.value(f"SELECT COUNT(*) FROM jobs {where}", *args) or 0)
    rows = await db.rows(
        "SELECT id, state, attempts, operation_id, error, turn, turns, ambiguous FROM jobs "
        f"{where} ORDER BY rowid LIMIT ?",
        *args, limit,
    )  # fmt: skip
    listed = []
    for r in rows:
        job = {"id": r[0], "state": r[1], "attempts": r[2], "operationId": r[3],
               "lastError": json.loads(r[4]) if r[4] else None, "ambiguousSubmits": r[7]}  # fmt: skip
        if r[6]:
            job["turn"] = f"{r[5] + 1}/{len(json.loads(r[6]))}"
        listed.append(job)
    return listed, total


async def show(db: Database, job_id: str) -> dict[str, Any] | None:
    """One job in full: its request, its answer (or error), usage, and every attempt."""
    from runner.output import COLUMNS, result_line

    row = await db.row(
        f"SELECT {COLUMNS}, COALESCE(origin, body) AS request, body, turns, turn, faults, "
        "ambiguous, resubmits, polls FROM jobs WHERE id = ?",
        job_id,
    )
    if row is None:
        return None
    ledger = await db.rows(
        "SELECT fence, turn, operation_id, sent_at, ambiguous, answered_at, total_tokens, "
        "orphan IS NOT NULL FROM operations WHERE job = ? ORDER BY seq",
        row["rowid"],
    )
    history = await db.rows(
        "SELECT at, state, attempts, operation_id, error FROM job_history WHERE job = ? "
        "ORDER BY at",
        row["rowid"],
    )
    shown: dict[str, Any] = {
        "id": job_id,
        "state": row["state"],
        "request": json.loads(row["request"]),
        "counters": {k: row[k] for k in ("attempts", "faults", "ambiguous", "resubmits", "polls")},
    }
    if row["turns"]:
        shown["turn"] = f"{row['turn'] + 1}/{len(json.loads(row['turns']))}"
        if row["state"] not in ("done",):
            shown["currentRequest"] = json.loads(row["body"])
    if row["finish_seq"] is not None:
        shown["result"] = result_line(row)
    shown["operations"] = [
        {"attempt": r[0], "turn": r[1] + 1, "operationId": r[2], "sentAt": r[3],
         "ambiguous": bool(r[4]), "answeredAt": r[5], "totalTokens": r[6],
         "answerKeptAside": bool(r[7])}
        for r in ledger
    ]  # fmt: skip
    shown["retries"] = [
        {"at": r[0], "state": r[1], "attempts": r[2], "operationId": r[3],
         "error": json.loads(r[4]) if r[4] else None}
        for r in history
    ]  # fmt: skip
    return shown
