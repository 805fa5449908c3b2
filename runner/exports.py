"""One-off exports of results (``runner results -o``): JSONL or CSV, written whole.

An export is rendered in memory from the database, written to a temporary file in the target's
directory, fsynced and moved into place with ``os.replace``, after every check: a reader never
sees half an export, and a crash leaves the old file or the new one. Like a run's output, it
refuses a file runner did not write (recorded with its length and fingerprint, as kind
``export``), a run's output file, and the database's own files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from typing import Any

import anyio

from runner.database import Database, storage_guard
from runner.errors import StorageError, UsageError
from runner.output import check_free, check_target, extend, fingerprint

CSV_COLUMNS = (
    "id", "status", "text", "alternativeStatus", "inputTextTokens", "completionTokens",
    "reasoningTokens", "totalTokens", "modelVersion", "operationId", "attempts",
    "errorCode", "errorMessage",
)  # fmt: skip


def csv_row(line: dict[str, Any]) -> list[Any]:
    usage = line.get("usage") or {}
    error = line.get("error") or {}
    flat = {**line, **usage, "errorCode": error.get("code"), "errorMessage": error.get("message")}
    return ["" if flat.get(c) is None else flat.get(c) for c in CSV_COLUMNS]


def render(lines: list[dict[str, Any]], fmt: str, request: bool) -> str:
    out = io.StringIO(newline="")
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow((*CSV_COLUMNS, "request") if request else CSV_COLUMNS)
        for line in lines:
            row = csv_row(line)
            if request:
                row.append(json.dumps(line["request"], ensure_ascii=False))
            writer.writerow(row)
    else:
        for line in lines:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return out.getvalue()


async def export_file(db: Database, path: str, text: str) -> None:
    """Write an export through a temporary file and ``os.replace``; refuse foreign files."""
    check_target(path, db.path)
    check_free(path)  # a live run's output, even while still empty
    key = os.path.realpath(path)
    row = await db.row("SELECT size, tail, kind FROM outputs WHERE path = ?", key)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        if row is None:
            raise UsageError(
                f"-o {path}: the file exists and runner did not write it; give a new path or "
                "move the file away"
            )
        if row["kind"] == "run":
            raise UsageError(f"-o {path}: that is a run's output file (-o of `runner run`)")
        size = os.path.getsize(path)
        if size != row["size"] or fingerprint(path, size) != row["tail"]:
            raise UsageError(f"-o {path}: the file changed since runner wrote it; not replacing it")
    data = text.encode()

    def write() -> str:
        fd, tmp = tempfile.mkstemp(prefix=".runner-", dir=os.path.dirname(os.path.abspath(path)))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return extend("", data)

    try:
        tail = await anyio.to_thread.run_sync(write)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}; nothing was replaced") from None
    with storage_guard(db.path):
        await _record_export(db, key, len(data), tail)


async def _record_export(db: Database, key: str, size: int, tail: str) -> None:
    async with db.transaction() as con:
        await con.execute(
            "INSERT INTO outputs (path, last_seq, size, tail, kind) VALUES (?, 0, ?, ?, 'export') "
            "ON CONFLICT (path) DO UPDATE SET size = excluded.size, tail = excluded.tail",
            (key, size, tail),
        )
