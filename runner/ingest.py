"""Adding jobs: a whole file (or list) is checked and stored in one transaction, or not at all.

Specs are staged in a temporary table in batches (parsed in a worker thread while SQLite inserts
the previous batch, so the two cores work at once), then checked in SQL: ids repeated within the
input, and ids already stored with different content. Content is compared without the model's
folder (``inputs.model_free``), so rerunning a file from a shell with another ``YC_FOLDER_ID``
is the same batch. Any problem rolls everything back and is reported with file, line and field,
the first 50 of each kind with a count of the rest; otherwise the new jobs are inserted and the
known ones skipped. A dry run does all of this and rolls back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import anyio

from runner.database import Database
from runner.errors import InputError, Problem
from runner.inputs import Spec, model_free

MAX_REPORTED = 50
BATCH = 5000


@dataclass(frozen=True)
class Added:
    added: int
    known: int


class _RollBack(Exception):
    def __init__(self, added: Added) -> None:
        self.added = added


async def ingest(
    db: Database, path: str, specs: Iterable[Spec | Problem], dry_run: bool = False,
    *, listed: bool = False,
) -> Added:  # fmt: skip
    """Add the jobs atomically; raises ``InputError`` listing the problems, storing nothing.
    ``listed``: the specs' numbers are positions in a Python list (``jobs[i]``), not lines."""
    try:
        return await _ingest(db, path, specs, dry_run, listed=listed)
    except _RollBack as done:
        return done.added


def difference(
    old: str, new: str, old_turns: str | None, new_turns: str | None, listed: bool = False
) -> str:
    """What differs between a stored job and a line with its id, in a few words."""
    was, now = json.loads(old), json.loads(new)
    fields = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    if old_turns != new_turns:
        fields.append("turns")
    if fields == ["modelUri"]:
        option = "model= sets the model of items" if listed else "--model sets the model of lines"
        return (f"another model ({was.get('modelUri')} stored, {now.get('modelUri')} now; "
                f"{option} that name none)")  # fmt: skip
    return "different " + (", ".join(fields) if fields else "content")


async def _ingest(
    db: Database, path: str, specs: Iterable[Spec | Problem], dry_run: bool, *, listed: bool
) -> Added:
    def first_at(line: int) -> str:
        return f"first at {path}[{line}]" if listed else f"first on line {line}"

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
            if len(rows) >= BATCH:
                break
        return rows

    await db.con.create_function("model_free", 1, model_free, deterministic=True)
    async with db.transaction() as con:
        await con.execute(
            "CREATE TEMP TABLE IF NOT EXISTS staging (line INTEGER, id TEXT, body TEXT, turns TEXT)"
        )
        await con.execute("DELETE FROM staging")
        batch = await anyio.to_thread.run_sync(take)
        while batch:
            async with anyio.create_task_group() as tg:
                tg.start_soon(con.executemany, "INSERT INTO staging VALUES (?, ?, ?, ?)", batch)
                following = await anyio.to_thread.run_sync(take)
            staged += len(batch)
            batch = following
        await con.execute("CREATE INDEX IF NOT EXISTS temp.staging_id ON staging (id, line)")
        duplicate = (
            "FROM staging s WHERE EXISTS (SELECT 1 FROM staging o WHERE o.id = s.id "
            "AND o.line < s.line)"
        )
        changed = (
            "FROM staging s JOIN jobs j ON j.id = s.id WHERE j.turns IS NOT s.turns OR "
            "(COALESCE(j.origin, j.body) != s.body "
            "AND model_free(COALESCE(j.origin, j.body)) != model_free(s.body))"
        )
        before = len(problems)
        for line, job_id, first in await db.rows(
            "SELECT s.line, s.id, (SELECT MIN(line) FROM staging f WHERE f.id = s.id) "
            f"{duplicate} ORDER BY s.line LIMIT ?",
            MAX_REPORTED,
        ):
            problems.append(
                Problem(path, line, "id", f"duplicate id {job_id!r} ({first_at(first)})")
            )
        for line, job_id, old_line, was, now, turns_was, turns_now in await db.rows(
            f"SELECT s.line, s.id, j.line, COALESCE(j.origin, j.body), s.body, j.turns, s.turns "
            f"{changed} ORDER BY s.line LIMIT ?", MAX_REPORTED,
        ):  # fmt: skip
            where = f"{path}[{old_line}]" if listed else f"line {old_line}"
            problems.append(
                Problem(
                    path, line, "id",
                    f"job {job_id!r} is already in the database (added from {where}) with "
                    f"{difference(was, now, turns_was, turns_now, listed)}; give it a new id or use another database",
                )
            )  # fmt: skip
        if problems:
            dups = await db.value(f"SELECT COUNT(*) {duplicate}")
            changes = await db.value(f"SELECT COUNT(*) {changed}")
            shown = len(problems) - before
            extra += max(0, int(dups) + int(changes) - shown)
            problems.sort(key=lambda p: p.line)
            if listed:  # a Python list's item is named by its position, not a line
                problems = [Problem(f"{path}[{p.line}]", 0, p.field, p.message) for p in problems]
            extra += max(0, len(problems) - MAX_REPORTED)
            raise InputError(problems[:MAX_REPORTED], extra, listed=listed)
        cur = await con.execute(
            "INSERT INTO jobs (id, line, body, turns, origin, model) "
            "SELECT id, line, body, turns, CASE WHEN turns IS NULL THEN NULL ELSE body END, "
            "json_extract(body, '$.modelUri') "
            "FROM staging s "
            "WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = s.id) ORDER BY s.rowid"
        )
        added = Added(cur.rowcount, staged - cur.rowcount)
        await con.execute("DELETE FROM staging")
        if dry_run:
            raise _RollBack(added)
    return added
