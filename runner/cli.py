"""The command line: options in, one ``anyio.run`` call, errors turned into exit codes.

Each command parses its flags into the plain values ``commands`` takes and runs it; a
``RunnerError`` from below becomes a ``click.ClickException`` carrying its exit code (2 bad
usage or input, 1 some jobs failed, 3 the API refused the credentials, 130 interrupted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

import anyio
import click

from runner import commands
from runner import emulator as emu
from runner.errors import RunnerError
from runner.scheduler import Settings

DB_OPTION = click.option(
    "--db", default="runner.db", envvar="RUNNER_DB", show_default=True, help="SQLite state file."
)


class Failure(click.ClickException):
    def __init__(self, error: RunnerError) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code  # type: ignore[misc]  # click reads it per instance


def _call(func: Any, *args: Any) -> Any:
    try:
        return anyio.run(func, *args)
    except RunnerError as e:
        raise Failure(e) from None
    except BaseExceptionGroup as group:
        # a task group wraps the worker's error; surface the first one we know how to report
        first = group.subgroup(lambda e: isinstance(e, RunnerError))
        if first is None:
            raise
        error = first.exceptions[0]
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        raise Failure(error) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Run JSONL prompts through Yandex AI Studio's completionAsync API, resumably."""
    level = (
        logging.ERROR
        if quiet
        else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose + 1, 2)]
    )
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )


@cli.command()
@click.argument("jobs", required=False, type=click.Path(dir_okay=True))
@DB_OPTION
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Append results here (JSONL)."
)
@click.option(
    "--model", default="yandexgpt-lite", show_default=True, help="Model name or gpt:// URI."
)
@click.option("--folder-id", help="Folder id (default: env YC_FOLDER_ID).")
@click.option("--emulator", is_flag=True, help="Run against the built-in emulator.")
@click.option("--llm-url", envvar="RUNNER_LLM_URL", help="Base URL for completion endpoints.")
@click.option("--operation-url", envvar="RUNNER_OPERATION_URL", help="Base URL for operations.")
@click.option("--submit-rps", default=10.0, show_default=True, type=click.FloatRange(min=0.01))
@click.option("--submit-per-hour", default=5000, show_default=True, type=click.IntRange(min=1))
@click.option("--poll-rps", default=50.0, show_default=True, type=click.FloatRange(min=0.01))
@click.option("--quota-window", default=3600.0, hidden=True, type=click.FloatRange(min=0.1),
              help="Seconds in the hourly quota's window (for compressed-time benchmarks).")  # fmt: skip
@click.option("--mode", type=click.Choice(["async", "sync"]), default="async", show_default=True)
@click.option("--max-faults", default=5, show_default=True, type=click.IntRange(min=1),
              help="Transient errors before a job is failed.")  # fmt: skip
@click.option("--op-deadline", default=24.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Hours an operation may run before it is failed.")  # fmt: skip
@click.option(
    "--resubmit-stuck", is_flag=True, help="Resubmit operations past the deadline instead."
)
@click.option("--iam-token-command", envvar="RUNNER_IAM_TOKEN_COMMAND",
              help='Command printing a fresh IAM token, e.g. "yc iam create-token".')  # fmt: skip
@click.option("--request-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0.1))
@click.option("--context-budget", default=32768, show_default=True, type=click.IntRange(min=1),
              help="Tokens a chat turn may need; a longer conversation fails, not the API.")  # fmt: skip
def run(
    jobs: str | None,
    db: str,
    output: str | None,
    model: str,
    folder_id: str | None,
    emulator: bool,
    llm_url: str | None,
    operation_url: str | None,
    submit_rps: float,
    submit_per_hour: int,
    poll_rps: float,
    quota_window: float,
    mode: str,
    max_faults: int,
    op_deadline: float,
    resubmit_stuck: bool,
    iam_token_command: str | None,
    request_timeout: float,
    context_budget: int,
) -> None:
    """Add JOBS (if given) to the database, then submit and poll until every job is finished.

    \b
    Example:
      runner run jobs.example.jsonl --emulator -o out.jsonl
      runner run -o out.jsonl          # resume what runner.db holds
    """
    settings = Settings(
        submit_rps=submit_rps, submit_per_hour=submit_per_hour, poll_rps=poll_rps, mode=mode,
        quota_window=quota_window, context_budget=context_budget,
        max_faults=max_faults, op_deadline=op_deadline * 3600, resubmit_stuck=resubmit_stuck,
        output=output,
    )  # fmt: skip
    opts = commands.RunOptions(
        jobs=jobs, db=db, output=output, model=model, folder_id=folder_id, emulator=emulator,
        llm_url=llm_url, operation_url=operation_url, iam_token_command=iam_token_command,
        request_timeout=request_timeout, settings=settings,
    )  # fmt: skip
    report: commands.RunReport = _call(commands.run, opts)
    c = report.counts
    click.echo(
        f"{c['done']} done, {c['failed']} failed, {c['cancelled']} cancelled, "
        f"{c['pending'] + c['running'] + c['submitting']} unfinished "
        f"({report.added} new jobs; {report.stats.submitted} submits, {report.stats.polls} polls, "
        f"{report.stats.recovered} ambiguous submits resent)",
        err=True,
    )
    if report.stats.interrupted:
        click.echo("interrupted: state is saved; run the same command to resume", err=True)
    sys.exit(report.exit_code)


@cli.command()
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(db: str, as_json: bool) -> None:
    """Counts per state, token usage and submit statistics.

    \b
    Example:
      runner status --json
    """
    import json

    data = _call(commands.status, db)
    if as_json:
        click.echo(json.dumps(data))
        return
    states = ("pending", "submitting", "running", "done", "failed", "cancelled")
    click.echo(f"total {data['total']}: " + ", ".join(f"{s} {data[s]}" for s in states))
    u = data["usage"]
    click.echo(
        f"tokens: input {u['inputTextTokens']}, completion {u['completionTokens']}, "
        f"reasoning {u['reasoningTokens']}, total {u['totalTokens']}"
    )
    click.echo(
        f"submits {data['submits']}, ambiguous {data['ambiguousSubmits']}, "
        f"resubmitted after expiry {data['resubmits']}, transient faults {data['faults']}"
    )


@cli.command()
@DB_OPTION
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="File (default: stdout).")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option("--status", "state", type=click.Choice(["done", "failed", "cancelled"]))
def results(db: str, output: str | None, fmt: str, state: str | None) -> None:
    """Export finished jobs from the database.

    \b
    Example:
      runner results -o results.csv --format csv --status done
    """
    if output is None:
        _call(commands.results, db, sys.stdout, fmt, state)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        n = _call(commands.results, db, f, fmt, state)
    click.echo(f"{n} results written to {output}", err=True)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--latency", default="0.05:0.2", show_default=True, help="MIN:MAX seconds, uniform.")
@click.option("--lognormal", help="MEDIAN:SIGMA: log-normal latency instead of uniform.")
@click.option("--submit-rps", type=float, help="Enforce this submit quota (429 beyond).")
@click.option("--submit-per-hour", type=int, help="Enforce this hourly submit quota.")
@click.option("--hour-seconds", default=3600.0, hidden=True, help="Length of the quota 'hour'.")
@click.option("--poll-rps", type=float, help="Enforce this poll quota.")
@click.option("--retry-after", type=float, help="Send Retry-After (seconds) with 429s.")
@click.option("--fault", "faults", multiple=True, help="ENDPOINT:FAULT=RATE, e.g. submit:503=0.1.")
@click.option("--op-error-rate", default=0.0, type=float, help="Share of operations that fail.")
@click.option("--expire-after", type=float, help="Seconds after finishing that operations 404.")
@click.option(
    "--reject-token", "reject_tokens", multiple=True, help="Answer this bearer token with 401."
)
@click.option("--dedupe", is_flag=True, help="Honour Idempotency-Key (one operation per key).")
@click.option("--seed", type=int, help="Random seed for reproducible runs.")
def emulator(
    host: str,
    port: int,
    latency: str,
    lognormal: str | None,
    submit_rps: float | None,
    submit_per_hour: int | None,
    hour_seconds: float,
    poll_rps: float | None,
    retry_after: float | None,
    faults: tuple[str, ...],
    op_error_rate: float,
    expire_after: float | None,
    reject_tokens: tuple[str, ...],
    dedupe: bool,
    seed: int | None,
) -> None:
    """Serve the built-in emulator of the API (for trials, tests and benchmarks).

    \b
    Example:
      runner emulator --port 8080 --latency 0.5:3 &
      RUNNER_LLM_URL=http://127.0.0.1:8080 RUNNER_OPERATION_URL=http://127.0.0.1:8080 \\
        YC_API_KEY=x YC_FOLDER_ID=f runner run jobs.example.jsonl
    """
    try:
        config = emu.Config(
            latency=emu.parse_latency(latency),
            lognormal=emu.parse_lognormal(lognormal) if lognormal else None,
            submit_rps=submit_rps, submit_per_hour=submit_per_hour, poll_rps=poll_rps,
            hour_seconds=hour_seconds, retry_after=retry_after, faults=dict(emu.parse_fault(f) for f in faults),
            op_error_rate=op_error_rate, expire_after=expire_after, seed=seed,
            reject_tokens=frozenset(reject_tokens), dedupe=dedupe,
        )  # fmt: skip
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    with contextlib.suppress(KeyboardInterrupt):
        _call(commands.emulator, host, port, config)


def main() -> None:
    cli(prog_name="runner")
