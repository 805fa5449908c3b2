"""The SQLite file: refusing files runner must not touch, opening, transactions, the run lock.

``Database.open`` first inspects the file read-only, so a corrupt file, a foreign database or
one from a newer runner is refused without a byte changed, then switches to WAL with
``synchronous=FULL`` and applies the migrations. FULL costs one fsync per commit; at the quota's
pace (tens of commits a second at most) that is cheap, and it means a committed operation id
survives a power cut, not only a kill -9.

All writes go through one connection guarded by one lock, in explicit ``BEGIN IMMEDIATE``
transactions; the modules that own a table (``queue``, ``ingest``, ``output``) say how its rows
change, this one only how a transaction is held. ``RunLock`` is an ``flock`` on a side file,
so the kernel releases it when a process dies and a killed run never blocks the next.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiosqlite
import anyio

from runner import migrations
from runner.errors import StorageError, StoreError, UsageError

SQLITE_MAGIC = b"SQLite format 3\x00"


def check_path(path: str) -> None:
    """A database path the user can be told about in one line, before anything is created."""
    if os.path.isdir(path):
        raise StoreError(f"{path}: is a directory, not a database")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--db {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--db {path}: directory {parent} is not writable")


def side_file(db_path: str, suffix: str) -> str:
    """A file runner keeps beside a database (``.lock``, ``.rescue``, ``.emulator``), named
    after the database file itself, not the name it was reached by: a database reached through
    a symlink has one lock, one rescue file and one emulator state, as SQLite's own -wal has."""
    return os.path.realpath(db_path) + suffix


class FileGone(FileNotFoundError):
    """The database's path no longer leads to the file runner opened."""


def _writable_folder(place: str) -> str | None:
    """``place`` as an absolute folder runner may write in, or None (a removed working
    directory cannot even be named)."""
    try:
        folder = os.path.realpath(place)
    except OSError:
        return None
    return folder if os.path.isdir(folder) and os.access(folder, os.W_OK) else None


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def must_exist(path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such database; run `runner run JOBS.jsonl --db {path}` first")


def inspect_file(path: str) -> None:
    """Refuse a file we must not touch, without modifying it."""
    check_path(path)
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return  # an empty file is a new database
    if head != SQLITE_MAGIC:
        raise StoreError(f"{path}: not an SQLite database; give another --db path")
    known = migrations.newest()
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
                top = con.execute("SELECT MAX(number) FROM runner_migrations").fetchone()[0]
                if top is not None and top > known:
                    raise StoreError(
                        f"{path}: written by a newer runner (schema {top}, this one knows "
                        f"{known}); upgrade runner to use it"
                    )
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        if not any(s in str(e) for s in ("not a database", "malformed", "encrypted")):
            raise StorageError(f"cannot read {path}: {e}; free space (or fix what blocks the "
                               "file) and rerun the same command") from e  # fmt: skip
        raise StoreError(f"{path}: unreadable SQLite database ({e}); give another --db path") from e


def storage_error(e: BaseException) -> bool:
    """Errors of the disk or of SQLite's file, as opposed to bugs in a statement."""
    if isinstance(e, OSError):
        return True
    if isinstance(e, sqlite3.OperationalError):
        text = str(e)
        return any(
            s in text
            for s in ("locked", "busy", "disk", "full", "I/O", "readonly", "unable to open")
        )
    return isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.IntegrityError)


@contextlib.contextmanager
def storage_guard(path: str) -> Iterator[None]:
    """Storage errors (a full disk, a locked or unwritable file) as one ``StorageError``."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        if not storage_error(e):
            raise
        what = getattr(e, "strerror", None) or str(e)
        raise StorageError(f"cannot write {path}: {what}. {advice(e)}") from e


def advice(e: BaseException | None) -> str:
    """What to do after storage error ``e``."""
    if isinstance(e, FileGone):
        return "Nothing more was sent or changed"
    return ("Every committed state is intact: free space (or fix what blocks the file) and rerun "
            "the same command to resume")  # fmt: skip


class Database:
    def __init__(self, con: aiosqlite.Connection, path: str) -> None:
        self.con = con
        self.path = path
        self._lock = anyio.Lock(fast_acquire=True)  # BEGIN IMMEDIATE always yields
        self._where = os.path.realpath(path)  # the file itself, whatever cwd or links do later
        self._file = _identity(self._where)
        self.gone: str | None = None  # why the path no longer leads to the file opened
        self._sides: dict[str, tuple[int, int] | None] = {}  # its -wal and -shm, as opened

    def check_file(self) -> None:
        """The path must still lead to the file that was opened: a database deleted (or its
        directory) or replaced mid-run would take every later commit to a file no one will
        read, and the next run would start afresh and pay for every job again. Raised once:
        whoever meets it stops the run, and the commits that follow (the outcomes of requests
        already sent) still reach the open file, which the run then copies out
        (``save_copy``) before it closes it."""
        if self.gone is None and self._file is not None and _identity(self._where) != self._file:
            self.gone = f"{self.path} was deleted or replaced while runner was using it"
            self._clear_sides()  # at once: a file put at the path must not read them as its own
            raise FileGone(errno.ENOENT, self.gone)

    def _clear_sides(self) -> None:
        """Remove the -wal and -shm this connection left at the path, if they are still those
        (the connection keeps them open; a database moved to the path would read them)."""
        for suffix, was in self._sides.items():
            if was is not None and _identity(self._where + suffix) == was:
                with contextlib.suppress(OSError):
                    os.remove(self._where + suffix)

    def check_gone(self) -> str | None:
        """Whether the path still leads to the file opened (as ``check_file``, never raising):
        for a run that ended before any transaction met it (a Ctrl-C)."""
        with contextlib.suppress(FileGone):
            self.check_file()
        return self.gone

    async def save_copy(self, also: tuple[str, ...] = ()) -> str:
        """Copy the database as this connection sees it to ``<name>.recovered`` beside where it
        was, or in the first of the working directory, the folders ``also`` and the temporary
        directory that takes it; the copy's path. The -wal and -shm this connection left at the
        path are removed, so a database put there in its place is read as it is."""
        errors = []
        for place in (os.path.dirname(self._where), ".", *also, tempfile.gettempdir()):
            folder = _writable_folder(place)
            if folder is None:
                continue
            try:
                target = await self._copy_to(os.path.join(folder, os.path.basename(self._where)))
            except (OSError, sqlite3.Error) as e:
                errors.append(f"{folder}: {e}")
                continue
            self._clear_sides()
            return target
        raise OSError(errno.EIO, "; ".join(errors) or "no folder to write to")

    async def _copy_to(self, name: str) -> str:
        stem = name + ".recovered"
        target = next(p for p in (stem, *(f"{stem}{n}" for n in range(2, 1000))) if not os.path.exists(p))
        tmp = f"{target}.{os.getpid()}.tmp"
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            dst = sqlite3.connect(tmp, check_same_thread=False)  # used from aiosqlite's thread
            try:
                await self.con.backup(dst)
            finally:
                dst.close()
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return target

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: str) -> AsyncIterator[Database]:
        inspect_file(path)
        if not os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        with anyio.CancelScope(shield=True):  # cancelled while it connects, its thread would live on
            con = await aiosqlite.connect(path, isolation_level=None)
        try:
            con.row_factory = aiosqlite.Row
            await con.execute("PRAGMA busy_timeout = 10000")
            await con.execute("PRAGMA journal_mode = WAL")
            await con.execute("PRAGMA synchronous = FULL")
            await con.create_function("uuid4", 0, lambda: str(uuid.uuid4()), deterministic=False)
            db = cls(con, path)
            try:
                await migrations.migrate(db)
                db._sides = {x: _identity(db._where + x) for x in ("-wal", "-shm")}
            except sqlite3.DatabaseError as e:
                if storage_error(e):
                    raise StorageError(f"cannot write {path}: {e}; free space and rerun") from e
                raise
            yield db
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled close would leave its thread
                await con.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            self.check_file()
            # shielded: cancelled while it waits in aiosqlite's thread, the BEGIN still happens
            # there, and a transaction nothing rolls back fails every later one ("cannot start
            # a transaction within a transaction"); a cancellation now lands inside, and rolls
            # back (waits at most the busy timeout)
            with anyio.CancelScope(shield=True):
                await self.con.execute("BEGIN IMMEDIATE")
            try:
                yield self.con
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self.con.execute("ROLLBACK")
                raise
            else:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.con.execute("COMMIT")
                    except BaseException:
                        with contextlib.suppress(sqlite3.Error):
                            await self.con.execute("ROLLBACK")
                        raise

    # one trip to aiosqlite's thread per query (execute then fetch would be two): the writer
    # reads a few times per commit, and each trip costs about as much CPU as a small query
    async def rows(self, sql: str, *args: Any) -> list[aiosqlite.Row]:
        return list(await self.con.execute_fetchall(sql, args))

    async def row(self, sql: str, *args: Any) -> aiosqlite.Row | None:
        found = await self.rows(sql, *args)
        return found[0] if found else None

    async def value(self, sql: str, *args: Any) -> Any:
        found = await self.row(sql, *args)
        return None if found is None else found[0]

    # -- small shared facts (run_state) ------------------------------------------------------

    async def set_state(self, key: str, value: Any | None) -> None:
        async with self.transaction() as con:
            if value is None:
                await con.execute("DELETE FROM run_state WHERE key = ?", (key,))
            else:
                await con.execute(
                    "INSERT INTO run_state (key, value, at) VALUES (?, ?, ?) ON CONFLICT (key) "
                    "DO UPDATE SET value = excluded.value, at = excluded.at",
                    (key, json.dumps(value), time.time()),
                )

    async def get_state(self, key: str) -> Any | None:
        raw = await self.value("SELECT value FROM run_state WHERE key = ?", key)
        return None if raw is None else json.loads(raw)


class RunLock:
    """An exclusive lock on a database for one live writer, released by the kernel on death."""

    def __init__(self, db_path: str) -> None:
        self.db = db_path
        self.path = side_file(db_path, ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self_db = self.db
        check_path(self_db)
        self.path = side_file(self_db, ".lock")  # the link may have been made since
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise UsageError(f"--db {self_db}: cannot create {self.path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"another runner (pid {holder}) is using {self_db}; wait for it to finish or "
                "stop it, then run again"
            ) from None
        with storage_guard(self.path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def held(db_path: str) -> bool:
        """Whether a live process holds the lock (without taking it for longer than a probe)."""
        path = side_file(db_path, ".lock")
        if not os.path.exists(path):
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False
