"""Numbered, recorded schema migrations, applied in order, each with its record.

The ``migrations/NNNN_name.sql`` files live at the repository's top level (one place to read the
schema's history) and are copied into the wheel as ``runner/migrations``. Each file opens with a
comment saying why it exists. ``migrate`` applies every file not yet recorded in
``runner_migrations``, each in one transaction together with its record, so a crash mid-migration
leaves the database at the previous version, never between two.

Migrations are additive: they add tables, columns and triggers and may rebuild a trigger, but
never drop data a user could want back.
"""

from __future__ import annotations

import importlib.resources
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import StoreError

if TYPE_CHECKING:
    from runner.database import Database


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


def newest() -> int:
    return max((n for n, _, _ in migration_files()), default=0)


def statements(script: str) -> Iterator[str]:
    """Split a script into statements: executescript() would COMMIT first, and a migration
    must share its transaction with its record."""
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


async def migrate(db: Database) -> None:
    async with db.transaction() as con:
        await con.execute(
            "CREATE TABLE IF NOT EXISTS runner_migrations ("
            "number INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        cur = await con.execute("SELECT number FROM runner_migrations")
        applied = {int(r[0]) for r in await cur.fetchall()}
    for number, name, sql in migration_files():
        if number in applied:
            continue
        async with db.transaction() as con:
            for statement in statements(sql):
                await con.execute(statement)
            await con.execute(
                "INSERT INTO runner_migrations (number, name, applied_at) VALUES (?, ?, ?)",
                (number, name, time.time()),
            )
