"""The command line's shared vocabulary: option types, the options several commands take, and
how a command's options become a ``runner.Batch`` and its errors an exit code.

``Duration`` reads "30m" or "24h", ``Number`` refuses nan and inf (both pass click's range
checks); ``CONNECT`` are the endpoint and credential options of every command that talks to the
API; ``reader`` gives the read-only commands --db, -v and -q. ``call`` runs a command's work on
an event loop and turns a ``RunnerError`` into click's exception with the error's exit code, so
``cli`` holds only the commands themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import click

from runner import pricing
from runner.errors import RunnerError

ENV = "env: "


def fail(e: RunnerError) -> click.ClickException:
    error = click.ClickException(str(e))
    error.exit_code = e.exit_code  # type: ignore[misc]  # click reads it per instance
    return error


def call(fn: Callable[[], Coroutine[Any, Any, Any]], listens: bool = False) -> Any:
    """Run a command's work; ``listens``: it handles signals itself (``run``)."""
    from runner.blocking import blocking
    from runner.interrupts import as_usual

    try:
        with contextlib.nullcontext() if listens else as_usual():  # a signal now interrupts
            return blocking(fn)  # the work, which cleans up (exit 130)
    except RunnerError as e:
        raise fail(e) from None


class Duration(click.ParamType):  # type: ignore[type-arg]
    name = "DURATION"

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        text = str(value).strip().lower()
        try:
            seconds = float(value) if isinstance(value, int | float) else (
                float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text))
        except ValueError:
            self.fail(f"{value!r}: give seconds, or a number with s, m, h or d (e.g. 30m)")
        if not math.isfinite(seconds) or seconds < 0 or (self.positive and seconds == 0):
            self.fail(f"{value!r}: give a finite duration {'above' if self.positive else 'from'} 0")
        return seconds


class Number(click.FloatRange):
    """A finite number from ``min`` (nan passes every comparison, and inf overflows)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def verbosity(fn: Any) -> Any:
    fn = click.option("-v", "--verbose", count=True, help="More log lines: -v info, -vv debug, -vvv all libraries.")(fn)  # fmt: skip
    return click.option("-q", "--quiet", is_flag=True, help="Errors only, no progress.")(fn)


def setup_logging(ctx: click.Context, verbose: int = 0, quiet: bool = False) -> tuple[int, bool]:
    v, q = ctx.obj or (0, False)
    v, q = max(v, verbose), q or quiet
    ctx.obj = (v, q)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    logging.getLogger().setLevel(logging.DEBUG if v >= 3 else logging.WARNING)
    own = logging.ERROR if q else (logging.WARNING, logging.INFO, logging.DEBUG)[min(v, 2)]
    logging.getLogger("runner").setLevel(own)
    return v, q


DB = click.option("--db", default="runner.db", show_default=True, envvar="RUNNER_DB",
                  help=f"SQLite state file ({ENV}RUNNER_DB).")  # fmt: skip
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
PRICE = click.option("--price", multiple=True, metavar="MODEL=PER_1K",
                     help="Override a model's price per 1,000 tokens (async), e.g. yandexgpt=0.6.")  # fmt: skip
CONNECT = [
    click.option("--emulator", is_flag=True, help="Run against the built-in emulator (no credentials needed)."),
    click.option("--folder-id", help=f"Folder id ({ENV}YC_FOLDER_ID)."),
    click.option("--llm-url", envvar="RUNNER_LLM_URL", help=f"Base URL of completion and tokenizer endpoints ({ENV}RUNNER_LLM_URL)."),
    click.option("--operation-url", envvar="RUNNER_OPERATION_URL", help=f"Base URL of the operation service ({ENV}RUNNER_OPERATION_URL)."),
    click.option("--iam-token-command", envvar="RUNNER_IAM_TOKEN_COMMAND", help=f'Command printing a fresh IAM token, e.g. "yc iam create-token" ({ENV}RUNNER_IAM_TOKEN_COMMAND).'),
    click.option("--request-timeout", default=60.0, show_default=True, type=Number(min=0.1), help="Seconds per HTTP request."),
    click.option("--model", default="yandexgpt-lite", show_default=True, help="Model for jobs that name none: a name, or a gpt:// URI."),
]  # fmt: skip


def options(opts: list[Any]) -> Callable[[Any], Any]:
    def apply(fn: Any) -> Any:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return apply


def batch_of(ctx: click.Context, db: str, **kw: Any) -> Any:
    """A ``Batch`` from the common options (the rest go through ``kw``)."""
    from runner.batch import Batch

    def pop(name: str, default: Any = None) -> Any:
        return kw.pop(name, default)

    try:
        prices = pricing.parse_prices(pop("price", ()))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    try:
        return Batch(db, model=pop("model", "yandexgpt-lite"), folder_id=pop("folder_id"),
                     emulator=pop("emulator", False), llm_url=pop("llm_url"),
                     operation_url=pop("operation_url"), iam_token_command=pop("iam_token_command"),
                     request_timeout=pop("request_timeout", 60.0), prices=prices, **kw)  # fmt: skip
    except RunnerError as e:  # a value the options let through and Batch refuses
        raise fail(e) from None


def dump(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False))


def reader(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Common plumbing of the commands that only read: --db, -v/-q."""
    wrapped: Callable[..., Any] = DB(verbosity(click.pass_context(fn)))
    return wrapped


async def within(batch: Any, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    async with batch:
        return await fn(*args)
