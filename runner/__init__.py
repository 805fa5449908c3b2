"""runner: durable bulk generation against Yandex AI Studio's completionAsync API.

Jobs (a JSONL file, or a Python list of prompts and dicts) live in SQLite; each is submitted,
its operation polled, and its result written out exactly once, surviving kill -9, reboots and
outages. The public interface is what this module exports: ``Batch`` (an async context
manager), ``run`` (a blocking helper that also works inside Jupyter), ``Result``, ``Quotas``,
``Credentials`` and the error classes. Everything else is internal and may change in any
release; the public names follow semantic versioning.

Names are loaded on first use, so ``import runner`` and the read-only CLI commands stay cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "Batch": "runner.batch",
    "Run": "runner.execution",
    "RunReport": "runner.execution",
    "Quotas": "runner.batch",
    "run": "runner.blocking",
    "Result": "runner.jobs",
    "Usage": "runner.jobs",
    "ApiFailure": "runner.jobs",
    "Credentials": "runner.credentials",
    "RunnerError": "runner.errors",
    "UsageError": "runner.errors",
    "InputError": "runner.errors",
    "Problem": "runner.errors",
    "CredentialsError": "runner.errors",
    "OutageError": "runner.errors",
    "StorageError": "runner.errors",
    "Interrupted": "runner.errors",
}
__all__ = [
    "ApiFailure", "Batch", "Credentials", "CredentialsError", "InputError", "Interrupted",
    "OutageError", "Problem", "Quotas", "Result", "Run", "RunReport", "RunnerError",
    "StorageError", "Usage", "UsageError", "run",
]  # fmt: skip

if TYPE_CHECKING:
    from runner.batch import Batch, Quotas
    from runner.blocking import run
    from runner.credentials import Credentials
    from runner.errors import (
        CredentialsError,
        InputError,
        Interrupted,
        OutageError,
        Problem,
        RunnerError,
        StorageError,
        UsageError,
    )  # fmt: skip
    from runner.execution import Run, RunReport
    from runner.jobs import ApiFailure, Result, Usage


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
