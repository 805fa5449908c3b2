"""Output files: a view of the database, written exactly once per finished job.

The database is the truth. Finished jobs carry a ``finish_seq``; for each output file the
``outputs`` table records the last sequence number it holds, its byte length and a fingerprint
of its last bytes. An append is fsynced before that record commits, so after any crash the
recorded length marks a prefix of whole, committed lines: on the next start anything past it (a
torn or uncommitted tail) is cut, and said so in the log. A file shorter than recorded is
rebuilt from the database; a file whose fingerprint no longer matches was edited by hand and is
refused, as is any non-empty file this database has no record of, or the jobs file itself:
runner never truncates or overwrites a file it did not write.

One-off exports (``runner results -o``) are written to a temporary file in the same directory
and moved into place with ``os.replace``, after everything else was checked. All file I/O and
fsync run in a worker thread, off the event loop.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import aiosqlite
import anyio

from runner.database import Database
from runner.errors import StorageError, UsageError

log = logging.getLogger("runner.output")

TAIL_BYTES = 4096
COLUMNS = "rowid, id, state, result, error, operation_id, attempts, finish_seq, transcript"
CSV_COLUMNS = (
    "id", "status", "text", "alternativeStatus", "inputTextTokens", "completionTokens",
    "reasoningTokens", "totalTokens", "modelVersion", "operationId", "attempts",
    "errorCode", "errorMessage",
)  # fmt: skip


def result_line(row: Any) -> dict[str, Any]:
    """The exported form of a finished job: one JSON object per line, joined by id."""
    line: dict[str, Any] = {"id": row["id"], "status": row["state"]}
    if row["result"]:
        line.update(json.loads(row["result"]))
    if row["error"]:
        line["error"] = json.loads(row["error"])
        if row["transcript"]:  # a failed chat keeps the turns it paid for
            line["turns"] = json.loads(row["transcript"])
    line["operationId"] = row["operation_id"]
    line["attempts"] = row["attempts"]
    return line


async def lines_since(
    db: Database, seq: int, states: tuple[str, ...] = ("done", "failed", "cancelled"),
    request: bool = False, limit: int = 2000,
) -> AsyncIterator[tuple[int, dict[str, Any]]]:  # fmt: skip
    """(finish_seq, line) of every finished job after ``seq``, in finishing order."""
    marks = ",".join("?" * len(states))
    extra = ", COALESCE(origin, body) AS request" if request else ""
    while True:
        rows = await db.rows(
            f"SELECT {COLUMNS}{extra} FROM jobs WHERE finish_seq > ? AND state IN ({marks}) "
            "ORDER BY finish_seq LIMIT ?",
            seq, *states, limit,
        )  # fmt: skip
        for row in rows:
            line = result_line(row)
            if request:
                line["request"] = json.loads(row["request"])
            yield row["finish_seq"], line
        if len(rows) < limit:
            return
        seq = rows[-1]["finish_seq"]


def _fingerprint(path: str, size: int) -> str:
    if size <= 0:
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, size - TAIL_BYTES))
        return hashlib.sha256(f.read(min(size, TAIL_BYTES))).hexdigest()


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_target(path: str, db_path: str, jobs_path: str | None = None) -> None:
    """Refuse output paths that would clobber the jobs file or the database, in one line."""
    if os.path.isdir(path):
        raise UsageError(f"-o {path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"-o {path}: directory {parent} does not exist")
    if jobs_path and os.path.exists(path) and _same(path, jobs_path):
        raise UsageError(f"-o {path}: that is the jobs file; results go to a file of their own")
    for own in (db_path, db_path + "-wal", db_path + "-shm", db_path + ".lock"):
        if os.path.exists(path) and os.path.exists(own) and _same(path, own):
            raise UsageError(f"-o {path}: that is runner's own database file")


def _storage(path: str, e: OSError) -> StorageError:
    return StorageError(
        f"cannot write {path}: {e.strerror or e}; every result is safe in the database; free "
        "space (or fix the file's permissions) and rerun the same command to complete the file"
    )


async def invalidate(con: aiosqlite.Connection) -> None:
    """Mark every run output for a rebuild (results changed after they were written)."""
    await con.execute("UPDATE outputs SET last_seq = 0, size = 0, tail = '' WHERE kind = 'run'")


class OutputFile:
    """A run's output file (``-o``): opened once per run, extended after each batch commits."""

    def __init__(self, db: Database, path: str, jobs_path: str | None = None) -> None:
        self.db = db
        self.path = path
        self.key = os.path.realpath(path)
        self.jobs_path = jobs_path

    async def verify(self) -> tuple[int, int, str]:
        """Whether runner may write this file: (last_seq, size, tail) to continue from, or
        ``UsageError`` with the file untouched. Changes nothing, so it can go first."""
        check_target(self.path, self.db.path, self.jobs_path)
        row = await self.db.row(
            "SELECT last_seq, size, tail, kind FROM outputs WHERE path = ?", self.key
        )
        size = os.path.getsize(self.path) if os.path.exists(self.path) else -1
        last_seq, recorded, tail = (row[0], row[1], row[2]) if row else (0, 0, "")
        if size > 0 and row is None:
            raise UsageError(
                f"-o {self.path}: the file exists and runner has no record of writing it for "
                f"{self.db.path}; give a new -o path (or move the file away), then rerun"
            )
        if (row is not None and row["kind"] != "run") or size < recorded:
            if size > 0:
                log.warning("%s: rebuilding it from the database (it is shorter than runner "
                            "wrote, or was an export)", self.path)  # fmt: skip
            return 0, 0, ""
        if recorded and await anyio.to_thread.run_sync(_fingerprint, self.path, recorded) != tail:
            raise UsageError(
                f"-o {self.path}: the file changed since runner last wrote it (edited by hand?); "
                "move it away or give another -o path, then rerun: every result is in the "
                "database and a new file is written in full"
            )
        return last_seq, recorded, tail

    async def open(self) -> None:
        """Make the file agree with the database, or refuse it untouched."""
        last_seq, recorded, tail = await self.verify()
        size = os.path.getsize(self.path) if os.path.exists(self.path) else -1
        if size > recorded and recorded:
            log.warning("%s: cut %d bytes after the last committed line (an interrupted "
                        "write, or lines added by hand)", self.path, size - recorded)  # fmt: skip
        try:
            await anyio.to_thread.run_sync(self._truncate, recorded)
        except OSError as e:
            raise _storage(self.path, e) from None
        async with self.db.transaction() as con:
            await con.execute(
                "INSERT INTO outputs (path, last_seq, size, tail, kind) VALUES (?, ?, ?, ?, 'run') "
                "ON CONFLICT (path) DO UPDATE SET last_seq = excluded.last_seq, "
                "size = excluded.size, tail = excluded.tail, kind = 'run'",
                (self.key, last_seq, recorded, tail),
            )

    def _truncate(self, size: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _append(self, data: bytes, at: int) -> str:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, at)  # a rebuild starts from nothing; a live file is already `at`
            os.pwrite(fd, data, at)
            os.fsync(fd)
        finally:
            os.close(fd)
        return _fingerprint(self.path, at + len(data))

    async def export(self) -> int:
        """Append every job finished since the file's last sequence number; lines written.

        Written in chunks (a rebuild of a million lines never sits in memory), fsynced, and
        recorded in one commit at the end: a crash before it leaves a tail the next start cuts.
        """
        row = await self.db.row("SELECT last_seq, size FROM outputs WHERE path = ?", self.key)
        if row is None:
            raise StorageError(f"{self.path}: output not opened")
        top, size = int(row[0]), int(row[1])
        written, tail, buf = 0, None, []
        try:
            async for seq, line in lines_since(self.db, top):
                buf.append(json.dumps(line, ensure_ascii=False) + "\n")
                top = seq
                if len(buf) >= 2000:
                    size, tail = await self._flush(buf, size)
                    written, buf = written + len(buf), []
            if buf:
                size, tail = await self._flush(buf, size)
                written += len(buf)
        except OSError as e:
            raise _storage(self.path, e) from None
        if tail is not None:
            async with self.db.transaction() as con:
                await con.execute(
                    "UPDATE outputs SET last_seq = ?, size = ?, tail = ? WHERE path = ?",
                    (top, size, tail, self.key),
                )
        return written

    async def _flush(self, buf: list[str], size: int) -> tuple[int, str]:
        data = "".join(buf).encode()
        tail = await anyio.to_thread.run_sync(self._append, data, size)
        return size + len(data), tail


# -- one-off exports ------------------------------------------------------------------------------


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
        if _fingerprint(path, os.path.getsize(path)) != row["tail"]:
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
        return _fingerprint(path, len(data))

    try:
        tail = await anyio.to_thread.run_sync(write)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}; nothing was replaced") from None
    async with db.transaction() as con:
        await con.execute(
            "INSERT INTO outputs (path, last_seq, size, tail, kind) VALUES (?, 0, ?, ?, 'export') "
            "ON CONFLICT (path) DO UPDATE SET size = excluded.size, tail = excluded.tail",
            (key, len(data), tail),
        )
