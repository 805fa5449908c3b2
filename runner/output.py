"""Output files: a view of the database, written exactly once per finished job.

The database is the truth. Finished jobs carry a ``finish_seq``; for each output file the
``outputs`` table records the last sequence number it holds, its byte length and a fingerprint
of its whole content (a CRC-32, extended with each append). An append is fsynced before that
record commits, so after any crash the recorded length marks a prefix of whole, committed lines:
on the next start anything past it (a torn or uncommitted tail) is cut, and said so in the log.
Before runner writes to a non-empty file at all, the file must be one it wrote: recorded for
this database, and its first ``size`` bytes still what runner wrote (the fingerprint). A file
edited by hand, cut short, replaced, never written by runner, or the jobs file itself is
refused untouched: runner never truncates or overwrites a file it did not write. During a run
the file is held (flock: a run of another database cannot write it too), and each append first
checks that the path still leads to the file the run opened and that it holds exactly what
runner wrote; anything else stops the run, the file untouched. All file I/O and fsync run in
a worker thread, off the event loop. One-off exports are ``runner.exports``'.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiosqlite
import anyio

from runner import chat
from runner.database import Database, side_file, storage_guard
from runner.errors import StorageError, UsageError

log = logging.getLogger("runner.output")

COLUMNS = "rowid, id, state, result, error, operation_id, attempts, finish_seq, transcript"


def result_line(row: Any) -> dict[str, Any]:
    """The exported form of a finished job: one JSON object per line, joined by id."""
    line: dict[str, Any] = {"id": row["id"], "status": row["state"]}
    if row["result"]:
        line.update(json.loads(row["result"]))
    if row["error"]:
        line["error"] = json.loads(row["error"])
    if row["transcript"] and row["state"] != "done":  # a failed or cancelled chat's paid turns
        line["turns"] = json.loads(row["transcript"])
        if line["turns"]:
            line["usage"] = chat.summed(line["turns"])
    line["operationId"] = row["operation_id"]
    line["attempts"] = row["attempts"]
    return line


def since_query(states: tuple[str, ...], request: bool = False) -> str:
    """Finished jobs after a finishing number, in that order. ``+state``: the state index would
    fetch every finished job and sort them all for each page (2 ms at 6,000 jobs, per flush);
    the finish_seq index reads just the page."""
    extra = ", COALESCE(origin, body) AS request" if request else ""
    return (f"SELECT {COLUMNS}{extra} FROM jobs WHERE finish_seq > ? AND "
            f"+state IN ({','.join('?' * len(states))}) ORDER BY finish_seq LIMIT ?")  # fmt: skip


async def lines_since(
    db: Database, seq: int, states: tuple[str, ...] = ("done", "failed", "cancelled"),
    request: bool = False, limit: int = 2000,
) -> AsyncIterator[tuple[int, dict[str, Any]]]:  # fmt: skip
    """(finish_seq, line) of every finished job after ``seq``, in finishing order."""
    while True:
        rows = await db.rows(since_query(states, request), seq, *states, limit)
        for row in rows:
            line = result_line(row)
            if request:
                line["request"] = json.loads(row["request"])
            yield row["finish_seq"], line
        if len(rows) < limit:
            return
        seq = rows[-1]["finish_seq"]


def fingerprint(path: str, size: int) -> str:
    """The CRC-32 of the first ``size`` bytes (the whole of what runner wrote), as text."""
    crc, left = 0, size
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                return "short"
            crc, left = zlib.crc32(chunk, crc), left - len(chunk)
    return f"crc32:{crc:08x}"


def check_free(path: str) -> None:
    """Refuse an output another run holds (a probe: the lock is released at once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(path) from None
    finally:
        os.close(fd)


def _busy(path: str) -> UsageError:
    return UsageError(
        f"-o {path}: another runner is writing it (a run of another database?); give each run "
        "an output file of its own"
    )


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def extend(fingerprint: str, data: bytes) -> str:
    crc = int(fingerprint.split(":")[1], 16) if fingerprint.startswith("crc32:") else 0
    return f"crc32:{zlib.crc32(data, crc):08x}"


def pwrite_all(fd: int, data: bytes, at: int) -> None:
    """pwrite may write less than asked (a filling disk): write the rest, or fail."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        if n <= 0:
            raise OSError(28, "No space left on device")
        view, at = view[n:], at + n


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_target(path: str, db_path: str, jobs_path: str | None = None) -> None:
    """Refuse output paths that would clobber the jobs file or the database, in one line."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise UsageError(f"-o {path}: is a directory")
    try:
        os.stat(path)  # as the system will open it: a link loop, a name too long ...
    except FileNotFoundError:
        pass
    except OSError as e:
        raise UsageError(f"-o {path}: {e.strerror}") from None
    if os.path.exists(path) and not os.path.isfile(path):
        raise UsageError(f"-o {path}: not a regular file (a device, pipe or socket?)")
    # the directory as written ("nodir/../x" needs nodir) and a link's target's directory
    for parent in (os.path.dirname(path) or ".", os.path.dirname(os.path.realpath(path))):
        if not os.path.isdir(parent):
            raise UsageError(f"-o {path}: directory {parent} does not exist")
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        raise UsageError(f"-o {path}: no permission to write it")
    if jobs_path and os.path.exists(path) and _same(path, jobs_path):
        raise UsageError(f"-o {path}: that is the jobs file; results go to a file of their own")
    for suffix in ("", "-wal", "-shm", ".lock", ".emulator", ".rescue"):
        own = side_file(db_path, suffix)
        if os.path.realpath(path) == os.path.realpath(own) or (
            os.path.exists(path) and os.path.exists(own) and _same(path, own)
        ):
            raise UsageError(f"-o {path}: that is runner's own database file")


def _storage(path: str, e: OSError) -> StorageError:
    return StorageError(
        f"cannot write {path}: {e.strerror or e}; every result is safe in the database; free "
        "space (or fix the file's permissions) and rerun the same command to complete the file"
    )


async def invalidate(con: aiosqlite.Connection) -> None:
    """Mark every run output for a rebuild (results changed after they were written). What
    runner wrote stays recorded, how far it got included, so the file is still checked to be
    runner's (lines added past the last commit too) before the rebuild."""
    await con.execute("UPDATE outputs SET rebuild = 1 WHERE kind = 'run'")


class OutputFile:
    """A run's output file (``-o``): opened once per run, extended after each batch commits."""

    def __init__(self, db: Database, path: str, jobs_path: str | None = None) -> None:
        self.db = db
        self.path = path
        self.key = os.path.realpath(path)
        self.jobs_path = jobs_path
        # (last_seq, size, tail) as committed: only this run writes the record while it holds
        # the run lock, so it is kept here instead of read back before every append
        self._record: tuple[int, int, str] | None = None
        self._moved_from: str | None = None  # the record's path, when the file was moved
        self._fd: int | None = None  # held open and flock'ed from open() to close()
        self._torn = False  # an append of this run failed part way: its tail may be cut

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


    async def verify(self) -> tuple[int, int, str]:
        """Whether runner may write this file: (last_seq, size, tail) to continue from, or
        ``UsageError`` with the file untouched. Changes nothing, so it can go first."""
        check_target(self.path, self.db.path, self.jobs_path)
        check_free(self.path)
        row = await self.db.row(
            "SELECT last_seq, size, tail, kind, rebuild FROM outputs WHERE path = ?", self.key
        )
        size = os.path.getsize(self.path) if os.path.exists(self.path) else -1
        if size <= 0:  # nothing there to lose: (re)built from the database
            return 0, 0, ""
        if row is None:
            row = await self._moved(size)
        if row is None:
            raise UsageError(
                f"-o {self.path}: the file exists and runner has no record of writing it for "
                f"{self.db.path}; give a new -o path (or move the file away), then rerun"
            )
        last_seq, recorded, tail = int(row[0]), int(row[1]), str(row[2])
        ours = size >= recorded and (
            not tail  # recorded by a version before fingerprints: its length is all there is
            or await anyio.to_thread.run_sync(fingerprint, self.path, recorded) == tail
        )
        if not ours:
            raise UsageError(
                f"-o {self.path}: the file changed since runner last wrote it (edited by hand, "
                "cut short or replaced?); move it away or give another -o path, then rerun: "
                "every result is in the database and a new file is written in full"
            )
        if row["kind"] == "export":
            raise UsageError(
                f"-o {self.path}: that is an export written by `runner results`; give "
                "`runner run` an output file of its own"
            )
        # checked before a rebuild too: it cuts the file to nothing (last_seq < 0: marked for
        # a rebuild by a version that did not keep it, so what follows cannot be checked)
        if size > recorded and (
            last_seq < 0 or not await self._ours_past(last_seq, recorded, size)
        ):
            raise UsageError(
                f"-o {self.path}: {size - recorded} bytes after the last line runner committed "
                "are not what runner writes (lines added by hand? or, after `runner retry`, a "
                "write a crash cut short before it); move them or the file away, then rerun: "
                "every result is in the database and a new file is written in full"
            )
        if row["rebuild"]:
            log.warning("%s: rebuilding it from the database", self.path)
            return 0, 0, ""
        return last_seq, recorded, tail

    async def _moved(self, size: int) -> Any:
        """The record of this file under the path it had before its directory was moved (or
        renamed): a run output of the same name whose path is gone and whose recorded bytes
        this file starts with (the fingerprint). The path is corrected when the file is opened."""
        name = os.path.basename(self.key)
        for row in await self.db.rows(  # the columns verify reads, in its order, then the path
            "SELECT last_seq, size, tail, kind, rebuild, path FROM outputs "
            "WHERE kind = 'run' AND tail != '' AND size > 0 AND size <= ?",
            size,
        ):
            old = str(row["path"])
            if os.path.basename(old) != name or os.path.exists(old):
                continue
            found = await anyio.to_thread.run_sync(fingerprint, self.path, int(row["size"]))
            if found == row["tail"]:
                self._moved_from = old
                return row
        return None

    async def _ours_past(self, last_seq: int, start: int, size: int) -> bool:
        """Whether the bytes past the committed length are a prefix of what runner writes next
        (a write a crash cut short, cut on open) rather than lines added by hand (refused)."""

        def read(at: int) -> bytes:
            with open(self.path, "rb") as f:
                f.seek(at)
                return f.read(min(1 << 20, size - at))

        at, pending = start, b""

        async def compare(final: bool) -> bool:  # consume what both sides have; False on a difference
            nonlocal at, pending
            while pending and (final or len(pending) >= 1 << 20 or at + len(pending) >= size):
                got = await anyio.to_thread.run_sync(read, at)
                n = min(len(got), len(pending))
                if n == 0 or got[:n] != pending[:n]:
                    return n == 0 and at >= size
                at, pending = at + n, pending[n:]
            return True

        async for _, line in lines_since(self.db, last_seq):
            pending += (json.dumps(line, ensure_ascii=False) + "\n").encode()
            if not await compare(False):
                return False
            if at >= size:
                return True
        return await compare(True) and at >= size

    async def open(self) -> None:
        """Make the file agree with the database, or refuse it untouched."""
        last_seq, recorded, tail = await self.verify()
        size = os.path.getsize(self.path) if os.path.exists(self.path) else -1
        if size > recorded and recorded:
            log.warning("%s: cut %d bytes of a write a crash interrupted (they are written "
                        "again from the database)", self.path, size - recorded)  # fmt: skip
        try:
            await anyio.to_thread.run_sync(self._truncate, recorded)
            if not tail:  # a new file, or one recorded before fingerprints
                tail = await anyio.to_thread.run_sync(fingerprint, self.path, recorded)
        except OSError as e:
            raise _storage(self.path, e) from None
        async with self.db.transaction() as con:
            if self._moved_from is not None:
                log.warning("%s: runner wrote it as %s (moved since)", self.path, self._moved_from)
                await con.execute("DELETE FROM outputs WHERE path = ?", (self._moved_from,))
            await con.execute(
                "INSERT INTO outputs (path, last_seq, size, tail, kind, rebuild) "
                "VALUES (?, ?, ?, ?, 'run', 0) ON CONFLICT (path) DO UPDATE SET "
                "last_seq = excluded.last_seq, size = excluded.size, tail = excluded.tail, "
                "kind = 'run', rebuild = 0",
                (self.key, last_seq, recorded, tail),
            )
        self._record = (last_seq, recorded, tail)

    def _truncate(self, size: int) -> None:
        """Open and lock the file for this run, then cut it to what runner committed."""
        if self._fd is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy(self.path) from None
            self._fd = fd
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)

    def _append(self, data: bytes, at: int) -> None:
        """Write ``data`` at ``at``, if the file is still the one this run opened and holds
        exactly what runner wrote: anything else wrote to it, replaced or cut it (say, a user,
        or a run that does not lock files) and it is left alone."""
        fd = self._fd
        if fd is None:
            raise StorageError(f"{self.path}: output not opened")
        mine, there = os.fstat(fd), _stat(self.path)
        changed = (
            "was deleted or replaced" if there is None or (there.st_dev, there.st_ino)
            != (mine.st_dev, mine.st_ino)
            else "is shorter than runner wrote" if mine.st_size < at
            else "has bytes runner did not write" if mine.st_size > at and not self._torn
            else ""
        )  # fmt: skip
        if changed:
            raise StorageError(
                f"stopped writing {self.path}: it {changed} since this run's last write (edited, "
                "or written by another program?); move it away, and the next run writes a new "
                "one in full from the database"
            )
        try:
            if mine.st_size > at:
                os.ftruncate(fd, at)  # the tail a failed append of this run left
            pwrite_all(fd, data, at)
            os.fsync(fd)
            self._torn = False
        except OSError:
            self._torn = True
            raise

    async def export(self) -> int:
        """Append every job finished since the file's last sequence number; lines written.

        Written in chunks (a rebuild of a million lines never sits in memory), fsynced, and
        recorded in one commit at the end: a crash before it leaves a tail the next start cuts.
        """
        if self._record is None:
            raise StorageError(f"{self.path}: output not opened")
        top, size, fingerprint = self._record
        written, buf = 0, []
        try:
            async for seq, line in lines_since(self.db, top):
                buf.append(json.dumps(line, ensure_ascii=False) + "\n")
                top = seq
                if len(buf) >= 2000:
                    size, fingerprint = await self._flush(buf, size, fingerprint)
                    written, buf = written + len(buf), []
            if buf:
                size, fingerprint = await self._flush(buf, size, fingerprint)
                written += len(buf)
        except OSError as e:
            raise _storage(self.path, e) from None
        if written:
            with storage_guard(self.db.path):
                async with self.db.transaction() as con:
                    await con.execute(
                        "UPDATE outputs SET last_seq = ?, size = ?, tail = ? WHERE path = ?",
                        (top, size, fingerprint, self.key),
                    )
            self._record = (top, size, fingerprint)
        return written

    async def _flush(self, buf: list[str], size: int, fingerprint: str) -> tuple[int, str]:
        data = "".join(buf).encode()
        await anyio.to_thread.run_sync(self._append, data, size)
        return size + len(data), extend(fingerprint, data)
