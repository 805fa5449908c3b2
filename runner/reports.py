"""Reading what the database holds: status, job listings and result exports.

These commands need only the store, never the network, so they live apart from ``commands``
and the CLI can answer them without importing the HTTP stack: ``runner status`` on a
million-job database answers in well under a second, most of it interpreter start-up. Every
figure comes from an index or a trigger-kept table, not from a scan of the jobs.
"""

from __future__ import annotations

import csv
import json
import os
import time
from typing import IO, Any

from runner import pricing
from runner.errors import UsageError
from runner.store import Store


async def status(db: str, prices: dict[str, float] | None = None) -> dict[str, Any]:
    must_exist(db)
    async with Store.open(db) as store:
        counts = await store.counts()
        totals = await store.totals()
        usage_by_model = await store.usage_by_model()
        oldest = await store.oldest_running()
        errors = await store.top_errors()
    usage = {
        k: totals[k]
        for k in ("inputTextTokens", "completionTokens", "reasoningTokens", "totalTokens")
    }
    return {
        "total": sum(counts.values()),
        **counts,
        "usage": usage,
        "cost": pricing.estimate(usage_by_model, prices or pricing.ASYNC_PRICE_PER_1K),
        "ambiguousSubmits": totals["ambiguousSubmits"],
        "resubmits": totals["resubmits"],
        "retries": totals["faults"],
        "submits": totals["submits"],
        "oldestRunningAgeSeconds": None if oldest is None else round(time.time() - oldest, 1),
        "topErrors": errors,
    }


async def jobs(db: str, state: str | None, limit: int) -> list[dict[str, Any]]:
    must_exist(db)
    async with Store.open(db) as store:
        return await store.list_jobs(state, limit)


def must_exist(db: str) -> None:
    if not os.path.exists(db):
        raise UsageError(f"{db}: no such database; run `runner run JOBS.jsonl --db {db}` first")


CSV_COLUMNS = (
    "id", "status", "text", "alternativeStatus", "inputTextTokens", "completionTokens",
    "reasoningTokens", "totalTokens", "modelVersion", "operationId", "attempts",
    "errorCode", "errorMessage",
)  # fmt: skip


def _csv_row(line: dict[str, Any]) -> list[Any]:
    usage = line.get("usage") or {}
    error = line.get("error") or {}
    flat = {**line, **usage, "errorCode": error.get("code"), "errorMessage": error.get("message")}
    return ["" if flat.get(c) is None else flat.get(c) for c in CSV_COLUMNS]


async def results(
    db: str, out: IO[str], fmt: str, state: str | None, include_request: bool = False
) -> int:
    must_exist(db)
    n = 0
    writer = csv.writer(out) if fmt == "csv" else None
    if writer:
        writer.writerow((*CSV_COLUMNS, "request") if include_request else CSV_COLUMNS)
    async with Store.open(db) as store:
        async for line in store.iter_results(state, include_request):
            if writer:
                row = _csv_row(line)
                if include_request:
                    row.append(json.dumps(line["request"], ensure_ascii=False))
                writer.writerow(row)
            else:
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            n += 1
    return n
