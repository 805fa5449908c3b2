"""Batches from synchronous code: ``runner.run`` and the loop-safe ``blocking``.

``run`` adds the jobs, runs them and returns their results in input order; called again with
the same arguments it resumes (nothing paid twice, nothing lost, even after a killed kernel).
``blocking`` runs a coroutine to completion from synchronous code: with ``anyio.run`` when no
event loop is running in this thread, and otherwise (Jupyter) in a worker thread with its own
loop through an anyio blocking portal, so an interrupt there cancels the run gracefully. Either
way an interrupt becomes ``Interrupted``, after the requests on the wire were finished and saved.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio

from runner.batch import Batch, Jobs, as_list, has_id
from runner.errors import Interrupted
from runner.inputs import Spec
from runner.jobs import Result

T = TypeVar("T")


def run(
    jobs: Jobs, db: str | os.PathLike[str] = "runner.db", *,
    output: str | os.PathLike[str] | None = None, **options: Any,
) -> list[Result]:  # fmt: skip
    """Add ``jobs``, run them and return their results in input order. Blocking.

    Calling it again with the same arguments resumes: finished jobs are not sent again.
    ``options`` are ``Batch``'s keyword arguments (``emulator=True``, ``model=...``, ...).
    """

    async def main() -> list[Result]:
        async with Batch(db, **options) as batch:
            items = jobs if isinstance(jobs, str | os.PathLike) else as_list(jobs)
            if isinstance(items, str | os.PathLike):
                batch.jobs_path = os.fspath(items)
            await batch.require_credentials(items)
            if output is not None:
                await batch.check_output(output)
            await batch.add(items)
            await batch.run(output=output)
            if isinstance(items, str | os.PathLike):  # the file's jobs, in the file's order
                ids = [s.id for s in batch._specs(items)[0] if isinstance(s, Spec)]
            else:
                ids = _ids(items)
            return await batch.results(ids=ids)

    return blocking(main)


def _ids(items: list[str | dict[str, Any]]) -> list[str]:
    return [str(x["id"]) if has_id(x) else f"item-{i}" for i, x in enumerate(items)]  # type: ignore[index]


INTERRUPTED = ("interrupted: state is saved (a request that was on the wire counts as ambiguous); "
               "run the same command again to resume")


def blocking(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``fn`` to completion from synchronous code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        try:
            return anyio.run(fn)
        except KeyboardInterrupt:
            raise Interrupted(INTERRUPTED) from None
    # a loop is running in this thread (Jupyter): run ours in a worker thread
    with anyio.from_thread.start_blocking_portal() as portal:
        future = portal.start_task_soon(fn)
        try:
            result: T = future.result()
            return result
        except KeyboardInterrupt:
            future.cancel()
            raise Interrupted(INTERRUPTED) from None

