"""The SQLite store: the single source of truth for every job, and the only code that writes it.

A database is opened through ``Store.open``, which first inspects the file read-only (so a
corrupt file, a foreign database or one from a newer version of runner is refused without a
byte changed), then switches to WAL with ``synchronous=FULL`` and applies the numbered
migrations, each in one transaction together with its record in ``runner_migrations``. FULL
costs one fsync per commit; at the quota's pace (tens of commits a second at most) that is
cheap, and it means a committed operation id survives a power cut, not just a kill -9.

All writes go through one connection guarded by one lock, in explicit transactions: claims
(one ``UPDATE ... RETURNING``, committed before any request leaves), batches of outcomes from
the scheduler's writer, and ingest, which stages a whole file in a temporary table, checks it
(duplicate ids, changed content) and inserts it in the same transaction, or rolls it all back.
The output file is derived from the database: finished jobs carry a ``finish_seq`` and the
``outputs`` table records how far, and to which byte length, each output file has been written.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.resources
import json
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from runner.errors import InputError, Problem, StoreError
from runner.inputs import Spec, canonical
from runner.jobs import ApiFailure, Claim, Completion, Running, State

SQLITE_MAGIC = b"SQLite format 3\x00"
MAX_REPORTED = 50
INGEST_BATCH = 5000


def migration_files() -> list[tuple[int, str, str]]:
    """(number, name, sql) for every migration, from the package or, in a source tree, the repo."""
    packaged = importlib.resources.files("runner").joinpath("migrations")
    root: Any = packaged if packaged.is_dir() else Path(__file__).parent.parent / "migrations"
    found = []
    for entry in root.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def _statements(script: str) -> Iterator[str]:
    # executescript() would COMMIT first; split so a migration and its record share a transaction
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf
            buf = ""
    if buf.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()
    ):
        raise StoreError(f"unterminated statement in migration: {buf.strip()[:60]}")


def inspect_file(path: str) -> None:
    """Refuse a file we must not touch, without modifying it."""
    if not os.path.exists(path):
        return
    if os.path.isdir(path):
        raise StoreError(f"{path}: is a directory, not a database")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return  # an empty file is a new database
    if head != SQLITE_MAGIC:
        raise StoreError(f"{path}: not an SQLite database; give another --db path")
    known = max((n for n, _, _ in migration_files()), default=0)
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if tables and "runner_migrations" not in tables:
                raise StoreError(
                    f"{path}: an SQLite database that runner did not create "
                    f"(tables: {', '.join(sorted(tables)[:5])}); give another --db path"
                )
            if tables:
                newest = con.execute("SELECT MAX(number) FROM runner_migrations").fetchone()[0]
                if newest is not None and newest > known:
                    raise StoreError(
                        f"{path}: written by a newer runner (schema {newest}, this one knows "
                        f"{known}); upgrade runner to use it"
                    )
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: unreadable SQLite database ({e}); give another --db path") from e


@dataclass(frozen=True)
class Submitted:
    rowid: int
    operation_id: str
    at: float


@dataclass(frozen=True)
class Finished:
    rowid: int
    at: float
    polls: int
    completion: Completion | None = None
    failure: ApiFailure | None = None


@dataclass(frozen=True)
class Requeue:
    """Back to pending: after a retryable fault, a 429, or an operation the server lost."""

    rowid: int
    next_at: float
    fault: ApiFailure | None = None  # counted toward the job's fault limit
    ambiguous: bool = False  # the request may have reached the server
    resubmit: bool = False  # an operation existed and is gone: new idempotency key
    polls: int = 0


Update = Submitted | Finished | Requeue


class _RollBack(Exception):
    def __init__(self, added: int, known: int) -> None:
        self.counts = (added, known)


class RunLock:
    """An exclusive lock on a database for one live ``run``, released by the kernel on death.

    flock(2) on a side file: a killed process cannot leave a stale lock behind.
    """

    def __init__(self, db_path: str) -> None:
        self.path = db_path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"another runner (pid {holder}) is running on {self.path[:-5]}; wait for it to "
                "finish or stop it, then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def result_line(row: sqlite3.Row | aiosqlite.Row) -> dict[str, Any]:
    """The exported form of a finished job: one JSON object per line, joined by id."""
    line: dict[str, Any] = {"id": row["id"], "status": row["state"]}
    if row["result"]:
        line.update(json.loads(row["result"]))
    if row["error"]:
        line["error"] = json.loads(row["error"])
    line["operationId"] = row["operation_id"]
    line["attempts"] = row["attempts"]
    return line


_RESULT_COLUMNS = "rowid, id, state, result, error, operation_id, attempts, finish_seq"


class Store:
    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self.db = db
        self.path = path
        self._lock = anyio.Lock()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: str) -> AsyncIterator[Store]:
        inspect_file(path)
        if not os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            db.row_factory = aiosqlite.Row
            await db.execute("PRAGMA busy_timeout = 10000")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            await db.create_function("uuid4", 0, lambda: str(uuid.uuid4()), deterministic=False)
            store = cls(db, path)
            await store._migrate()
            yield store
        finally:
            await db.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self.db.execute("ROLLBACK")
                raise
            else:
                with anyio.CancelScope(shield=True):
                    await self.db.execute("COMMIT")

    async def _migrate(self) -> None:
        async with self.transaction() as db:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS runner_migrations ("
                "number INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
        for number, name, sql in migration_files():
            async with self.transaction() as db:
                cur = await db.execute(
                    "SELECT 1 FROM runner_migrations WHERE number = ?", (number,)
                )
                if await cur.fetchone():
                    continue
                for statement in _statements(sql):
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO runner_migrations (number, name, applied_at) VALUES (?, ?, ?)",
                    (number, name, time.time()),
                )

    # -- ingest ---------------------------------------------------------------------------

    async def ingest(
        self, path: str, specs: Iterable[Spec | Problem], dry_run: bool = False
    ) -> tuple[int, int]:
        """Add a file's jobs atomically; returns (added, already known). Raises ``InputError``.

        With ``dry_run`` everything is checked and counted, then rolled back.
        """
        try:
            return await self._ingest(path, specs, dry_run)
        except _RollBack as done:
            return done.counts

    async def _ingest(
        self, path: str, specs: Iterable[Spec | Problem], dry_run: bool
    ) -> tuple[int, int]:
        problems: list[Problem] = []
        extra = 0
        staged = 0
        items = iter(specs)

        def take() -> list[tuple[int, str, str, str | None]]:
            nonlocal extra
            rows: list[tuple[int, str, str, str | None]] = []
            for item in items:
                if isinstance(item, Problem):
                    if len(problems) < MAX_REPORTED:
                        problems.append(item)
                    else:
                        extra += 1
                    continue
                rows.append((item.line, item.id, item.body, item.turns))
                if len(rows) >= INGEST_BATCH:
                    break
            return rows

        async with self.transaction() as db:
            await db.execute(
                "CREATE TEMP TABLE IF NOT EXISTS staging (line INTEGER, id TEXT, body TEXT, turns TEXT)"
            )
            await db.execute("DELETE FROM staging")
            # parse the next batch in a worker thread while SQLite (which releases the GIL
            # while stepping) inserts the previous one: the two cores work at once
            batch = await anyio.to_thread.run_sync(take)
            while batch:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(db.executemany, "INSERT INTO staging VALUES (?, ?, ?, ?)", batch)
                    following = await anyio.to_thread.run_sync(take)
                staged += len(batch)
                batch = following
            await db.execute("CREATE INDEX IF NOT EXISTS temp.staging_id ON staging (id, line)")
            cur = await db.execute(
                "SELECT s.line, s.id, (SELECT MIN(line) FROM staging f WHERE f.id = s.id) "
                "FROM staging s WHERE EXISTS (SELECT 1 FROM staging o WHERE o.id = s.id "
                "AND o.line < s.line) ORDER BY s.line LIMIT ?",
                (MAX_REPORTED,),
            )
            for line, job_id, first in await cur.fetchall():
                problems.append(
                    Problem(path, line, "id", f"duplicate id {job_id!r} (first on line {first})")
                )
            cur = await db.execute(
                "SELECT s.line, s.id, j.line FROM staging s JOIN jobs j ON j.id = s.id "
                "WHERE COALESCE(j.origin, j.body) != s.body OR j.turns IS NOT s.turns "
                "ORDER BY s.line LIMIT ?",
                (MAX_REPORTED,),
            )
            for line, job_id, old_line in await cur.fetchall():
                problems.append(
                    Problem(
                        path,
                        line,
                        "id",
                        f"job {job_id!r} is already in the database (from line {old_line}) with "
                        "different content; give it a new id or use another --db",
                    )
                )
            if problems:
                problems.sort(key=lambda p: p.line)
                raise InputError(
                    problems[:MAX_REPORTED], extra + max(0, len(problems) - MAX_REPORTED)
                )
            cur = await db.execute(
                "INSERT INTO jobs (id, line, body, turns, origin, model) "
                "SELECT id, line, body, turns, CASE WHEN turns IS NULL THEN NULL ELSE body END, "
                "json_extract(body, '$.modelUri') "
                "FROM staging s "
                "WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = s.id) ORDER BY s.rowid"
            )
            added = cur.rowcount
            await db.execute("DELETE FROM staging")
            if dry_run:
                raise _RollBack(added, staged - added)
        return added, staged - added

    # -- scheduling -----------------------------------------------------------------------

    async def recover(self) -> int:
        """Jobs a dead process left mid-submit: their fate is unknown, so send them again."""
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE jobs SET state = 'pending', ambiguous = ambiguous + 1, next_at = 0 "
                "WHERE state = 'submitting'"
            )
            return cur.rowcount

    async def claim(self, limit: int, now: float) -> list[Claim]:
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE jobs SET state = 'submitting', attempts = attempts + 1, "
                "idem_key = COALESCE(idem_key, uuid4()) "
                "WHERE rowid IN (SELECT rowid FROM jobs WHERE state = 'pending' AND next_at <= ? "
                "ORDER BY next_at LIMIT ?) "
                "RETURNING rowid, id, body, idem_key, attempts, faults",
                (now, limit),
            )
            rows = await cur.fetchall()
        return sorted((Claim(*r) for r in rows), key=lambda c: c.rowid)

    async def unclaim(self, rowids: list[int]) -> None:
        """Claims that were never sent go back to pending as if never claimed."""
        async with self.transaction() as db:
            await db.executemany(
                "UPDATE jobs SET state = 'pending', attempts = attempts - 1 "
                "WHERE rowid = ? AND state = 'submitting'",
                [(r,) for r in rowids],
            )

    async def next_pending_at(self) -> float | None:
        cur = await self.db.execute("SELECT MIN(next_at) FROM jobs WHERE state = 'pending'")
        row = await cur.fetchone()
        return None if row is None else row[0]

    async def running_page(self, after: tuple[float, int], limit: int) -> list[Running]:
        cur = await self.db.execute(
            "SELECT rowid, operation_id, submitted_at, next_at FROM jobs "
            "WHERE state = 'running' AND (next_at, rowid) > (?, ?) ORDER BY next_at, rowid LIMIT ?",
            (*after, limit),
        )
        return [Running(r[0], r[1], r[2]) for r in await cur.fetchall()]

    async def apply(self, updates: list[Update], context_budget: int = 32768) -> tuple[int, int]:
        """Write a batch of outcomes in one transaction.

        Returns (jobs finished, chat turns advanced): a chat's answered turn that is not its
        last puts the job back to pending with the next turn's request as its body.
        """
        finished = advanced = 0
        async with self.transaction() as db:
            seq_row = await (
                await db.execute("SELECT COALESCE(MAX(finish_seq), 0) FROM jobs")
            ).fetchone()
            seq = seq_row[0] if seq_row else 0
            # one statement for the commonest outcome; a job's Submitted always precedes its
            # other outcomes, so applying these first keeps every job's order
            await db.executemany(
                "UPDATE jobs SET state = 'running', operation_id = ?, submitted_at = ?, "
                "next_at = ? WHERE rowid = ? AND state = 'submitting'",
                [
                    (u.operation_id, u.at, u.at, u.rowid)
                    for u in updates
                    if isinstance(u, Submitted)
                ],
            )
            for u in updates:
                if isinstance(u, Submitted):
                    continue
                if isinstance(u, Finished):
                    cur = await db.execute(
                        "UPDATE jobs SET state = ?, finished_at = ?, finish_seq = ?, "
                        "polls = polls + ?, result = ?, error = ?, input_tokens = ?, "
                        "completion_tokens = ?, reasoning_tokens = ?, total_tokens = ? "
                        "WHERE rowid = ? AND state IN ('submitting', 'running') AND turns IS NULL",
                        _finished_values(u, seq + 1),
                    )
                    if cur.rowcount:  # a job finishes once, whatever is replayed
                        seq += 1
                        finished += 1
                        continue
                    outcome = await self._chat_turn(db, u, seq + 1, context_budget)
                    if outcome == "finished":
                        seq += 1
                        finished += 1
                    elif outcome == "advanced":
                        advanced += 1
                else:
                    await db.execute(  # guarded like the others: never revive a finished job
                        "UPDATE jobs SET state = 'pending', next_at = ?, polls = polls + ?, "
                        "faults = faults + ?, ambiguous = ambiguous + ?, resubmits = resubmits + ?, "
                        "error = COALESCE(?, error), "
                        "idem_key = CASE WHEN ? THEN NULL ELSE idem_key END, "
                        "operation_id = CASE WHEN ? THEN NULL ELSE operation_id END "
                        "WHERE rowid = ? AND state IN ('submitting', 'running')",
                        (
                            u.next_at,
                            u.polls,
                            1 if u.fault else 0,
                            int(u.ambiguous),
                            int(u.resubmit),
                            json.dumps(u.fault.as_dict()) if u.fault else None,
                            u.resubmit,
                            u.resubmit,
                            u.rowid,
                        ),
                    )
        return finished, advanced

    async def _chat_turn(
        self, db: aiosqlite.Connection, u: Finished, seq: int, budget: int
    ) -> str | None:
        cur = await db.execute(
            "SELECT turns, turn, transcript, body, operation_id FROM jobs "
            "WHERE rowid = ? AND state IN ('submitting', 'running') AND turns IS NOT NULL",
            (u.rowid,),
        )
        row = await cur.fetchone()
        if row is None:
            return None  # already finished: a replayed outcome
        turns: list[str] = json.loads(row[0])
        turn: int = row[1]
        transcript: list[dict[str, Any]] = json.loads(row[2] or "[]")
        body: dict[str, Any] = json.loads(row[3])
        if u.completion is None:
            failure = u.failure or ApiFailure(2, "unknown failure")
            failed = ApiFailure(failure.code, f"turn {turn + 1} of {len(turns)}: {failure.message}")
            await db.execute(
                "UPDATE jobs SET state = 'failed', finished_at = ?, finish_seq = ?, "
                "polls = polls + ?, error = ? WHERE rowid = ?",
                (u.at, seq, u.polls, json.dumps(failed.as_dict()), u.rowid),
            )
            return "finished"
        c = u.completion
        transcript.append({"text": c.text, "usage": c.usage, "operationId": row[4]})
        messages = [*body["messages"], {"role": "assistant", "text": c.text}]
        if turn + 1 < len(turns):
            question = turns[turn + 1]
            max_tokens = int(body.get("completionOptions", {}).get("maxTokens", 0))
            # the server counted this history exactly; add the next question (~3 chars a
            # token, generous for Russian and English) and the room kept for the answer
            needed = c.usage.get("totalTokens", 0) + len(question) // 3 + 1 + max_tokens
            if needed <= budget:
                body["messages"] = [*messages, {"role": "user", "text": question}]
                await db.execute(
                    "UPDATE jobs SET state = 'pending', next_at = 0, turn = turn + 1, "
                    "body = ?, transcript = ?, polls = polls + ?, idem_key = NULL, "
                    "operation_id = NULL WHERE rowid = ?",
                    (canonical(body), json.dumps(transcript, ensure_ascii=False), u.polls, u.rowid),
                )
                return "advanced"
            failed = ApiFailure(
                3,
                f"turn {turn + 2} of {len(turns)} would need about {needed} tokens, over the "
                f"context budget of {budget} (--context-budget); shorten the conversation",
            )
            await db.execute(
                "UPDATE jobs SET state = 'failed', finished_at = ?, finish_seq = ?, "
                "polls = polls + ?, error = ?, transcript = ? WHERE rowid = ?",
                (u.at, seq, u.polls, json.dumps(failed.as_dict()),
                 json.dumps(transcript, ensure_ascii=False), u.rowid),
            )  # fmt: skip
            return "finished"
        usage = {k: sum(t["usage"].get(k, 0) for t in transcript) for k in c.usage}
        result = {
            "text": c.text,
            "alternativeStatus": c.alternative_status,
            "usage": usage,
            "modelVersion": c.model_version,
            "turns": transcript,
            "messages": messages,
        }
        await db.execute(
            "UPDATE jobs SET state = 'done', finished_at = ?, finish_seq = ?, polls = polls + ?, "
            "result = ?, transcript = ?, input_tokens = ?, completion_tokens = ?, "
            "reasoning_tokens = ?, total_tokens = ? WHERE rowid = ?",
            (u.at, seq, u.polls, json.dumps(result, ensure_ascii=False),
             json.dumps(transcript, ensure_ascii=False), usage.get("inputTextTokens", 0),
             usage.get("completionTokens", 0), usage.get("reasoningTokens", 0),
             usage.get("totalTokens", 0), u.rowid),
        )  # fmt: skip
        return "finished"

    # -- reporting --------------------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        cur = await self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        counts = {s.value: 0 for s in State}
        for state, n in await cur.fetchall():
            counts[state] = n
        return counts

    async def totals(self) -> dict[str, int]:
        cur = await self.db.execute(
            "SELECT input_tokens, completion_tokens, reasoning_tokens, total_tokens, "
            "ambiguous, resubmits, faults, attempts FROM totals"
        )
        row = await cur.fetchone()
        keys = (
            "inputTextTokens", "completionTokens", "reasoningTokens", "totalTokens",
            "ambiguousSubmits", "resubmits", "faults", "submits",
        )  # fmt: skip
        return dict(zip(keys, (int(v) for v in (row or [0] * 8)), strict=True))

    async def iter_results(
        self, status: str | None = None, include_request: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        states = (status,) if status else ("done", "failed", "cancelled")
        marks = ",".join("?" * len(states))
        last = 0
        while True:
            cur = await self.db.execute(
                f"SELECT {_RESULT_COLUMNS}, COALESCE(origin, body) AS request FROM jobs "
                f"WHERE finish_seq > ? AND state IN ({marks}) ORDER BY finish_seq LIMIT 1000",
                (last, *states),
            )
            rows = list(await cur.fetchall())
            if not rows:
                return
            for row in rows:
                line = result_line(row)
                if include_request:
                    line["request"] = json.loads(row["request"])
                yield line
            last = rows[-1]["finish_seq"]

    async def usage_by_model(self) -> dict[str, int]:
        cur = await self.db.execute("SELECT model, total_tokens FROM usage_by_model")
        return {str(m): int(t) for m, t in await cur.fetchall()}

    async def oldest_running(self) -> float | None:
        """Submit time of the oldest running operation (a running job's next_at is that)."""
        cur = await self.db.execute("SELECT MIN(next_at) FROM jobs WHERE state = 'running'")
        row = await cur.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def top_errors(self, limit: int = 5) -> list[dict[str, Any]]:
        cur = await self.db.execute(
            "SELECT json_extract(error, '$.code'), json_extract(error, '$.message'), COUNT(*) "
            "FROM jobs WHERE state = 'failed' GROUP BY 1, 2 ORDER BY 3 DESC LIMIT ?",
            (limit,),
        )
        return [{"code": c, "message": m, "count": n} for c, m, n in await cur.fetchall()]

    async def list_jobs(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        where, args = ("WHERE state = ?", [state]) if state else ("", [])
        cur = await self.db.execute(
            "SELECT id, state, attempts, operation_id, error, turn, turns, ambiguous FROM jobs "
            f"{where} ORDER BY rowid LIMIT ?",
            (*args, limit),
        )
        jobs = []
        for row in await cur.fetchall():
            job = {"id": row[0], "state": row[1], "attempts": row[2], "operationId": row[3],
                   "lastError": json.loads(row[4]) if row[4] else None, "ambiguousSubmits": row[7]}  # fmt: skip
            if row[6]:
                job["turn"] = f"{row[5] + 1}/{len(json.loads(row[6]))}"
            jobs.append(job)
        return jobs

    # -- operator actions -------------------------------------------------------------------

    async def retry(self, states: tuple[str, ...], error_code: int | None) -> int:
        """Move finished jobs back to pending, keeping their outcome in job_history.

        Output files are derived from the database; since retried jobs will finish again,
        every recorded output is marked for a rebuild so none ends up with two lines for them.
        """
        marks = ",".join("?" * len(states))
        cond = f"state IN ({marks}) AND (? IS NULL OR json_extract(error, '$.code') = ?)"
        args = (*states, error_code, error_code)
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO job_history (job, at, state, attempts, operation_id, error, result) "
                f"SELECT rowid, ?, state, attempts, operation_id, error, result FROM jobs WHERE {cond}",
                (time.time(), *args),
            )
            cur = await db.execute(
                "UPDATE jobs SET state = 'pending', next_at = 0, finish_seq = NULL, "
                "finished_at = NULL, faults = 0, idem_key = NULL, operation_id = NULL, "
                f"result = NULL, error = NULL WHERE {cond}",
                args,
            )
            moved = cur.rowcount
            if moved:
                await db.execute("UPDATE outputs SET last_seq = 0, size = 0")
        return moved

    async def cancel_pending(self) -> int:
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, "
                "finish_seq = p.n + (SELECT COALESCE(MAX(finish_seq), 0) FROM jobs) "
                "FROM (SELECT rowid AS r, ROW_NUMBER() OVER (ORDER BY rowid) AS n FROM jobs "
                "WHERE state = 'pending') AS p WHERE jobs.rowid = p.r",
                (time.time(),),
            )
            return cur.rowcount

    async def running_operations(self) -> list[tuple[int, str]]:
        cur = await self.db.execute(
            "SELECT rowid, operation_id FROM jobs WHERE state = 'running' ORDER BY next_at"
        )
        return [(int(r), str(o)) for r, o in await cur.fetchall()]

    async def mark_cancelled(self, rowids: list[int]) -> None:
        async with self.transaction() as db:
            seq = (
                await (await db.execute("SELECT COALESCE(MAX(finish_seq), 0) FROM jobs")).fetchone()
                or [0]
            )[0]
            for i, rowid in enumerate(rowids, 1):
                await db.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?, finish_seq = ? "
                    "WHERE rowid = ? AND state = 'running'",
                    (time.time(), seq + i, rowid),
                )

    # -- the output file ----------------------------------------------------------------------

    async def open_output(self, path: str) -> int:
        """Make the file agree with the database; returns the last finish_seq it holds.

        A torn or uncommitted tail (a kill between the append and the commit) is cut off; a file
        that is shorter than recorded, or that we never wrote, is rebuilt from the database.
        """
        key = os.path.realpath(path)
        cur = await self.db.execute("SELECT last_seq, size FROM outputs WHERE path = ?", (key,))
        row = await cur.fetchone()
        size = os.path.getsize(path) if os.path.exists(path) else -1
        last_seq, recorded = (row[0], row[1]) if row else (0, 0)
        if row is None or size < recorded:
            last_seq, recorded = 0, 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, recorded)
            os.fsync(fd)
        finally:
            os.close(fd)
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO outputs (path, last_seq, size) VALUES (?, ?, ?) "
                "ON CONFLICT (path) DO UPDATE SET last_seq = excluded.last_seq, size = excluded.size",
                (key, last_seq, recorded),
            )
        return last_seq

    async def export(self, path: str) -> int:
        """Append every job finished since the file's last sequence number; returns lines written.

        The append is fsynced before the new (last_seq, size) commits, so after any crash the
        recorded size marks a prefix that holds only whole, committed lines.
        """
        key = os.path.realpath(path)
        written = 0
        async with self.transaction() as db:
            cur = await db.execute("SELECT last_seq, size FROM outputs WHERE path = ?", (key,))
            row = await cur.fetchone()
            if row is None:
                raise StoreError(f"{path}: output not opened")
            last_seq, size = row[0], row[1]
            while True:
                cur = await db.execute(
                    f"SELECT {_RESULT_COLUMNS} FROM jobs WHERE finish_seq > ? "
                    "ORDER BY finish_seq LIMIT 2000",
                    (last_seq,),
                )
                rows = list(await cur.fetchall())
                if not rows:
                    break
                data = "".join(
                    json.dumps(result_line(r), ensure_ascii=False) + "\n" for r in rows
                ).encode()
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    os.pwrite(fd, data, size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                size += len(data)
                last_seq = rows[-1]["finish_seq"]
                written += len(rows)
            if written:
                await db.execute(
                    "UPDATE outputs SET last_seq = ?, size = ? WHERE path = ?",
                    (last_seq, size, key),
                )
        return written


def _finished_values(u: Finished, seq: int) -> tuple[Any, ...]:
    if u.completion is not None:
        c = u.completion
        result: dict[str, Any] = {
            "text": c.text,
            "alternativeStatus": c.alternative_status,
            "usage": c.usage,
            "modelVersion": c.model_version,
        }
        if c.tool_calls is not None:
            result["toolCallList"] = c.tool_calls
        usage = c.usage
        return (
            State.DONE.value, u.at, seq, u.polls, json.dumps(result, ensure_ascii=False), None,
            usage.get("inputTextTokens", 0), usage.get("completionTokens", 0),
            usage.get("reasoningTokens", 0), usage.get("totalTokens", 0), u.rowid,
        )  # fmt: skip
    failure = u.failure or ApiFailure(2, "unknown failure")
    return (
        State.FAILED.value, u.at, seq, u.polls, None, json.dumps(failure.as_dict()),
        0, 0, 0, 0, u.rowid,
    )  # fmt: skip
