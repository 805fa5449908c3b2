"""Ctrl-C and SIGTERM for the CLI, from the process's first moment to its last.

A signal must never be lost, and must never cost money. From the entry point until a command
starts its work, a signal ends the process with exit code 130, nothing having been done
(``exit_at_once``, in ``runner.entry``, before the heavy imports); during a command's work it
is a KeyboardInterrupt its cleanup sees (``as_usual``); ``run`` remembers a signal until its
event loop listens (``remembered``). ``listening`` runs the command: a signal
before the run's workers start (adding jobs, a dry run, the run's own start) cancels what is
under way (each step is atomic) and raises ``Interrupted`` with nothing sent; once they have
started it sets ``Batch.interrupt``, and the run finishes the requests on the wire (their
answers may be paid for) and saves its state. The first signal closes the listener, so a
second one acts as it would without runner: the user can always stop the process.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import anyio

from runner.errors import Interrupted

if TYPE_CHECKING:
    from runner.batch import Batch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


_installed = False  # by the entry point only: a command run in-process changes no handler


def exit_at_once() -> None:
    """Outside a command's work (imports, options, printing): a signal ends the process with
    exit code 130; nothing is under way to finish."""
    global _installed
    _installed = True
    for number in SIGNALS:
        signal.signal(number, lambda *_: sys.exit(130))


@contextlib.contextmanager
def as_usual() -> Iterator[None]:
    """A command's work (``options.call``): Ctrl-C and SIGTERM are a KeyboardInterrupt, which the
    work's own cleanup sees and ``blocking`` turns into exit 130; ``run`` listens on its own."""
    if not _installed:
        yield
        return
    for number in SIGNALS:
        signal.signal(number, signal.default_int_handler)
    try:
        yield
    finally:
        exit_at_once()


@contextlib.contextmanager
def remembered() -> Iterator[list[int]]:
    """Signals received until the event loop listens, remembered instead of acted on."""
    early: list[int] = []
    kept = {n: signal.signal(n, lambda n, _: early.append(n)) for n in SIGNALS}
    try:
        yield early
    finally:
        for number, handler in kept.items():
            signal.signal(number, handler)


async def listening(batch: Batch, early: list[int], work: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """``work()``, stopped as the module docstring says; its own errors raised as themselves."""
    batch.interrupt = anyio.Event()
    result: Any = None
    error: Exception | None = None
    setup = anyio.CancelScope()

    def stop() -> None:
        batch.interrupt.set()  # type: ignore[union-attr]
        if not batch.driving:
            setup.cancel()

    async def watch(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.open_signal_receiver(*SIGNALS) as received:
            task_status.started()
            if early:  # between the handlers that remember and this receiver
                stop()
                return
            async for _ in received:
                stop()
                return  # closed: a second signal ends the process

    async with anyio.create_task_group() as tg:
        await tg.start(watch)
        try:
            with setup:
                result = await work()
        except Exception as e:  # not wrapped in the task group's exception group
            error = e
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    if setup.cancelled_caught:
        raise Interrupted("interrupted before anything was sent; run the same command to start again")
    return result
