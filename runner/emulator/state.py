"""Operations, and the append-only JSON-lines file that keeps them across restarts.

An ``Op`` holds what the emulator decided at submit time (the request body, when it was created
and when it will be ready, and its fate: an error, never finishing, expiring) plus what happened
later (a cancel; when a poll first saw it done, for the benchmark measurements). Times are
wall-clock ``time.time()`` seconds, so an operation's age is right even after the emulator was
restarted.

``StateFile`` appends one line per created operation and one per cancel, written with a single
unbuffered ``os.write`` before the client gets its answer, to a file created with mode 0600
(request bodies are prompts). Loading replays the lines in order; a torn last line (the process
was killed mid-write) or any other unreadable line is skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Op:
    id: str
    body: dict[str, Any]
    created: float
    ready_at: float
    error: dict[str, Any] | None = None
    error_while_running: bool = False
    never: bool = False
    cancelled: bool = False
    expired: bool = False
    idem: str | None = None  # the Idempotency-Key it was submitted with
    seen_done_at: float | None = None  # when a poll first answered it done (not persisted)

    @property
    def latency(self) -> float:
        return self.ready_at - self.created

    def finished(self, now: float) -> bool:
        """Whether a poll at ``now`` says ``done: true``."""
        if self.cancelled:
            return True
        if self.error_while_running or self.never:
            return False
        return now >= self.ready_at

    def record(self) -> dict[str, Any]:
        return {
            "type": "op", "id": self.id, "body": self.body, "created": self.created,
            "ready_at": self.ready_at, "error": self.error,
            "error_while_running": self.error_while_running, "never": self.never,
            "cancelled": self.cancelled, "expired": self.expired, "idem": self.idem,
        }  # fmt: skip

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Op:
        return cls(
            id=str(data["id"]), body=dict(data["body"]), created=float(data["created"]),
            ready_at=float(data["ready_at"]), error=data.get("error"),
            error_while_running=bool(data.get("error_while_running")),
            never=bool(data.get("never")), cancelled=bool(data.get("cancelled")),
            expired=bool(data.get("expired")), idem=data.get("idem"),
        )  # fmt: skip


class StateFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self.skipped = 0  # unreadable lines met by load()

    def load(self) -> dict[str, Op]:
        """Every operation the file records, cancels applied; {} when there is no file yet."""
        ops: dict[str, Op] = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return ops
        for line in lines:
            try:
                data = json.loads(line)
                if data["type"] == "op":
                    op = Op.from_record(data)
                    ops[op.id] = op
                elif data["type"] == "cancel" and data["id"] in ops:
                    ops[data["id"]].cancelled = True
                else:
                    raise ValueError("unknown record")
            except (ValueError, KeyError, TypeError):
                self.skipped += 1
        return ops

    def append_op(self, op: Op) -> None:
        self._write(op.record())

    def append_cancel(self, op_id: str, at: float) -> None:
        self._write({"type": "cancel", "id": op_id, "at": at})

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        data = line.encode()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            size = os.fstat(self._fd).st_size
            if size and os.pread(self._fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # end a torn last line so this record stays readable
        while data:  # a regular file takes it all at once; loop in case it does not
            data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
