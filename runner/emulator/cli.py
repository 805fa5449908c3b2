"""The ``emulator`` command: every ``Config`` switch as a flag, then serve until Ctrl-C / SIGTERM.

The command is a plain ``click.Command`` named ``emulator`` that the main CLI registers with
``cli.add_command(emulator)``; it also runs on its own (``python -m runner.emulator.cli``), which
is how tests start it as a subprocess. Compact values are parsed by the functions of
``config.py`` in click callbacks, so a malformed ``--outage`` or ``--fault`` is a usage error
naming the flag, before anything listens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import click

from runner.emulator.config import (
    CANCEL_MODES,
    HOUR_SHAPES,
    Config,
    Outage,
    parse_fault,
    parse_latency,
    parse_lognormal_capped,
    parse_outage,
)
from runner.emulator.serving import run

T = TypeVar("T")


def _parsed(parse: Callable[[str], T]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback applying ``parse`` to the value (or to each value of a repeated flag)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            if value is None:
                return None
            if isinstance(value, tuple):
                return tuple(parse(v) for v in value)
            return parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return callback


@click.command("emulator")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int, help="Port (0: any free one).")
@click.option(
    "--latency",
    default="0.05:0.2",
    show_default=True,
    callback=_parsed(parse_latency),
    help="MIN:MAX seconds a generation takes, uniform (a fixed draw per request body).",
)
@click.option(
    "--lognormal",
    callback=_parsed(parse_lognormal_capped),
    help="MEDIAN:SIGMA[:CAP]: log-normal latency instead of uniform, clipped at CAP.",
)
@click.option("--submit-rps", type=float, help="Submit quota per second (429 beyond).")
@click.option("--submit-per-hour", type=int, help="Submit quota per 'hour' (429 beyond).")
@click.option(
    "--hour-seconds",
    default=3600.0,
    show_default=True,
    type=float,
    help="Length of the quota 'hour' in seconds (shorter in compressed time).",
)
@click.option(
    "--hour-shape",
    type=click.Choice(HOUR_SHAPES),
    default="rolling",
    show_default=True,
    help="Shape of the hourly quota: rolling window, token bucket, or fixed windows.",
)
@click.option("--poll-rps", type=float, help="Operation poll quota per second (429 beyond).")
@click.option("--tokenize-rps", type=float, help="Tokenizer quota per second (429 beyond).")
@click.option("--retry-after", type=float, help="Send Retry-After (seconds) with 429s.")
@click.option(
    "--fault",
    "faults",
    multiple=True,
    callback=_parsed(parse_fault),
    help="ENDPOINT:FAULT=RATE, ENDPOINT one of submit, poll, complete, tokenize; e.g. submit:503=0.1 or poll:shape=0.1 (repeatable).",
)
@click.option(
    "--op-error-rate",
    default=0.0,
    type=float,
    show_default=True,
    help="Share of operations that finish with an error.",
)
@click.option(
    "--op-error-code",
    default=3,
    type=int,
    show_default=True,
    help="gRPC code of those errors (3 permanent; 4, 8, 13, 14 transient).",
)
@click.option(
    "--op-error-running-rate",
    default=0.0,
    type=float,
    show_default=True,
    help="Share of operations that report error 13 while done is still false.",
)
@click.option(
    "--never-finish-rate",
    default=0.0,
    type=float,
    show_default=True,
    help="Share of operations that never finish.",
)
@click.option(
    "--op-expire-rate",
    default=0.0,
    type=float,
    show_default=True,
    help="Share of operations that are gone (404) once finished.",
)
@click.option("--expire-after", type=float, help="Seconds after finishing that operations 404.")
@click.option(
    "--hang-seconds",
    default=30.0,
    type=float,
    show_default=True,
    help="How long the 'hang' fault holds a request.",
)
@click.option(
    "--max-concurrent-sync",
    default=10,
    type=int,
    show_default=True,
    help="Concurrent synchronous completions before 429.",
)
@click.option(
    "--reject-token",
    "reject_tokens",
    multiple=True,
    help="Answer this bearer token with 401 (repeatable).",
)
@click.option("--dedupe", is_flag=True, help="Honour Idempotency-Key (one operation per key).")
@click.option("--seed", type=int, help="Random seed for reproducible runs.")
@click.option(
    "--outage",
    "outages",
    multiple=True,
    callback=_parsed(parse_outage),
    help="START:LENGTH[:KIND] seconds after start; KIND 503 (default), reset or refuse "
    "(repeatable).",
)
@click.option("--poison", help="Prompts containing this text always get 500 INTERNAL.")
@click.option(
    "--known-model",
    "known_models",
    multiple=True,
    help="Serve only this model name, e.g. yandexgpt-lite (repeatable; default: any).",
)
@click.option("--folder", help="The only folder id accepted (others: 403; default: any).")
@click.option(
    "--cancel-mode",
    type=click.Choice(CANCEL_MODES),
    default="allow",
    show_default=True,
    help="Cancelling a running operation: cancels it, is refused (400), or is ignored.",
)
@click.option(
    "--state-file",
    type=click.Path(dir_okay=False),
    help="Keep operations in this JSON-lines file so a restart still answers polls.",
)
def emulator(
    host: str, port: int, latency: tuple[float, float],
    lognormal: tuple[float, float, float | None] | None,
    submit_rps: float | None, submit_per_hour: int | None, hour_seconds: float, hour_shape: str,
    poll_rps: float | None, tokenize_rps: float | None, retry_after: float | None,
    faults: tuple[tuple[str, float], ...], op_error_rate: float, op_error_code: int,
    op_error_running_rate: float, never_finish_rate: float, op_expire_rate: float,
    expire_after: float | None, hang_seconds: float, max_concurrent_sync: int,
    reject_tokens: tuple[str, ...], dedupe: bool, seed: int | None, outages: tuple[Outage, ...],
    poison: str | None, known_models: tuple[str, ...], folder: str | None, cancel_mode: str,
    state_file: str | None,
) -> None:  # fmt: skip
    """Serve the built-in emulator of the API (for trials, tests and benchmarks).

    \b
    Example:
      runner emulator --port 8080 --latency 0.5:3 &
      RUNNER_LLM_URL=http://127.0.0.1:8080 RUNNER_OPERATION_URL=http://127.0.0.1:8080 \\
        YC_API_KEY=x YC_FOLDER_ID=f runner run jobs.example.jsonl
    """
    config = Config(
        latency=latency, lognormal=lognormal[:2] if lognormal else None,
        latency_cap=lognormal[2] if lognormal else None,
        submit_rps=submit_rps, submit_per_hour=submit_per_hour, hour_seconds=hour_seconds,
        hour_shape=hour_shape, poll_rps=poll_rps, tokenize_rps=tokenize_rps,
        max_concurrent_sync=max_concurrent_sync, retry_after=retry_after, faults=dict(faults),
        op_error_rate=op_error_rate, op_error_code=op_error_code,
        op_error_running_rate=op_error_running_rate, never_finish_rate=never_finish_rate,
        expire_after=expire_after, op_expire_rate=op_expire_rate, hang_seconds=hang_seconds,
        dedupe=dedupe, reject_tokens=frozenset(reject_tokens), seed=seed, outages=outages,
        poison_marker=poison or None, known_models=frozenset(known_models) or None,
        folder=folder, cancel_mode=cancel_mode, state_file=state_file,
    )  # fmt: skip
    try:
        anyio.run(run, host, port, config)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


if __name__ == "__main__":
    emulator()
