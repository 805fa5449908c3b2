"""The command line: options in, one ``anyio.run`` call, errors turned into exit codes.

Each command parses its flags into the plain values ``commands`` takes and runs it; a
``RunnerError`` from below becomes a ``click.ClickException`` carrying its exit code (2 bad
usage or input, 1 some jobs failed, 3 the API refused the credentials, 130 interrupted).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

import anyio
import click

from runner import pricing, reports
from runner.errors import RunnerError
from runner.jobs import State

DB_OPTION = click.option(
    "--db", default="runner.db", envvar="RUNNER_DB", show_default=True, help="SQLite state file."
)


PRICE_OPTION = click.option(
    "--price", multiple=True, metavar="MODEL=PER_1K",
    help="Override a model's price per 1,000 tokens (async), e.g. yandexgpt=0.6.",
)  # fmt: skip


def _prices(overrides: tuple[str, ...]) -> dict[str, float]:
    try:
        return pricing.parse_prices(overrides)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


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
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Run JSONL prompts through Yandex AI Studio's completionAsync API, resumably."""
    ctx.obj = (verbose, quiet)
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
@click.option("--dry-run", is_flag=True, help="Validate, count and price the file; send nothing.")
@PRICE_OPTION
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print JSON.")
@click.option("--progress-interval", default=None, type=click.FloatRange(min=0.1),
              help="Seconds between progress updates (default: 1 on a terminal, 10 otherwise).")  # fmt: skip
@click.pass_context
def run(
    ctx: click.Context,
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
    dry_run: bool,
    price: tuple[str, ...],
    as_json: bool,
    progress_interval: float | None,
) -> None:
    """Add JOBS (if given) to the database, then submit and poll until every job is finished.

    \b
    Example:
      runner run jobs.example.jsonl --emulator -o out.jsonl
      runner run -o out.jsonl          # resume what runner.db holds
    """
    from runner import commands  # the HTTP stack is imported only by commands that use it
    from runner.scheduler import Settings

    settings = Settings(
        submit_rps=submit_rps, submit_per_hour=submit_per_hour, poll_rps=poll_rps, mode=mode,
        quota_window=quota_window, context_budget=context_budget,
        max_faults=max_faults, op_deadline=op_deadline * 3600, resubmit_stuck=resubmit_stuck,
        output=output,
    )  # fmt: skip
    verbose, quiet = ctx.obj
    tty = sys.stderr.isatty() and not verbose
    opts = commands.RunOptions(
        jobs=jobs, db=db, output=output, model=model, folder_id=folder_id, emulator=emulator,
        llm_url=llm_url, operation_url=operation_url, iam_token_command=iam_token_command,
        request_timeout=request_timeout, settings=settings, prices=_prices(price),
        progress="off" if quiet else ("tty" if tty else "plain"),
        progress_interval=progress_interval or (1.0 if tty else 10.0),
    )  # fmt: skip
    if dry_run:
        plan = _call(commands.dry_run, opts)
        if as_json:
            click.echo(json.dumps(plan, ensure_ascii=False))
            return
        models = ", ".join(f"{m} x{n}" for m, n in plan["models"].items())
        cost = plan["cost"]
        click.echo(
            f"{plan['jobs']} jobs ({plan['new']} new, {plan['known']} already in {db}); models: {models}"
        )
        click.echo(
            f"about {plan['estimatedInputTokens']} input tokens, ~{cost['total']:.2f} "
            f"{cost['currency']} for the prompts (estimate; answers cost extra). Nothing was sent."
        )
        return
    report = _call(commands.run, opts)
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
@click.option("--watch", is_flag=True, help="Refresh every 2 seconds until Ctrl-C.")
@PRICE_OPTION
def status(db: str, as_json: bool, watch: bool, price: tuple[str, ...]) -> None:
    """Counts per state, tokens, estimated cost, retries and the commonest errors.

    \b
    Example:
      runner status
      runner status --json | jq .cost
    """
    prices = _prices(price)
    while True:
        data = _call(reports.status, db, prices)
        if watch and not as_json:
            click.clear()
        click.echo(json.dumps(data, ensure_ascii=False) if as_json else format_status(data))
        if not watch:
            return
        time.sleep(2)


def format_status(data: dict[str, Any]) -> str:
    states = ("pending", "submitting", "running", "done", "failed", "cancelled")
    u, cost = data["usage"], data["cost"]
    lines = [
        f"jobs      {data['total']}: " + ", ".join(f"{s} {data[s]}" for s in states),
        f"tokens    input {u['inputTextTokens']}, completion {u['completionTokens']}, "
        f"reasoning {u['reasoningTokens']}, total {u['totalTokens']}",
        f"cost      ~{cost['total']:.2f} {cost['currency']} (estimate"
        + (f"; no price for {', '.join(cost['unpriced'])}" if cost["unpriced"] else "")
        + ")",
        f"submits   {data['submits']} (ambiguous {data['ambiguousSubmits']}, resubmitted after "
        f"expiry {data['resubmits']}, transient errors retried {data['retries']})",
    ]
    if data["oldestRunningAgeSeconds"] is not None:
        lines.append(f"oldest running operation: {data['oldestRunningAgeSeconds']:.0f} s")
    if data["topErrors"]:
        lines.append("top errors:")
        lines += [
            f"  {e['count']:>6} x code {e['code']}: {e['message']}" for e in data["topErrors"]
        ]
        lines.append(
            "  (runner retry moves failed jobs back to pending; runner jobs --status failed lists them)"
        )
    return "\n".join(lines)


@cli.command()
@DB_OPTION
@click.option("--status", "state", type=click.Choice([s.value for s in State]))
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def jobs(db: str, state: str | None, limit: int, as_json: bool) -> None:
    """List jobs with their state, attempts, operation id and last error.

    \b
    Example:
      runner jobs --status failed --limit 20
    """
    rows = _call(reports.jobs, db, state, limit)
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    for r in rows:
        error = r["lastError"]
        detail = f"  error {error['code']}: {error['message']}" if error else ""
        turn = f"  turn {r['turn']}" if "turn" in r else ""
        click.echo(
            f"{r['id']}\t{r['state']}\tattempts {r['attempts']}\t{r['operationId'] or '-'}{turn}{detail}"
        )


@cli.command()
@DB_OPTION
@click.option("--status", "states", multiple=True, type=click.Choice(["failed", "cancelled"]),
              default=["failed"], show_default=True)  # fmt: skip
@click.option("--error-code", type=int, help="Only jobs that failed with this gRPC code.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def retry(db: str, states: tuple[str, ...], error_code: int | None, as_json: bool) -> None:
    """Move finished jobs back to pending (their outcome is kept in history); rerun to resend.

    \b
    Example:
      runner retry --error-code 13 && runner run -o results.jsonl
    """
    from runner import commands

    moved = _call(commands.retry, db, tuple(states), error_code)
    if as_json:
        click.echo(json.dumps({"moved": moved}))
    else:
        click.echo(f"{moved} jobs moved back to pending; run `runner run` to submit them again")


@cli.command()
@DB_OPTION
@click.option("--pending-only", is_flag=True, help="Leave running operations alone.")
@click.option("--emulator", is_flag=True, help="Talk to the built-in emulator.")
@click.option("--folder-id", help="Folder id (default: env YC_FOLDER_ID).")
@click.option("--llm-url", envvar="RUNNER_LLM_URL")
@click.option("--operation-url", envvar="RUNNER_OPERATION_URL")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cancel(db: str, pending_only: bool, emulator: bool, folder_id: str | None, llm_url: str | None,
           operation_url: str | None, as_json: bool) -> None:  # fmt: skip
    """Stop a batch: pending jobs are cancelled; running operations are cancelled on the
    server where it allows (best effort), otherwise left to finish and recorded by a later run.

    \b
    Example:
      runner cancel --pending-only
    """
    from runner import commands

    opts = commands.RunOptions(db=db, emulator=emulator, folder_id=folder_id, llm_url=llm_url,
                               operation_url=operation_url)  # fmt: skip
    report = _call(commands.cancel, opts, pending_only)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(
        f"{report['cancelledPending']} pending jobs cancelled, {report['cancelledRunning']} running "
        f"operations cancelled, {report['leftRunning']} left running (a later `runner run` records them)"
    )


@cli.command()
@DB_OPTION
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="File (default: stdout).")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option("--status", "state", type=click.Choice(["done", "failed", "cancelled"]))
@click.option("--include-request", is_flag=True, help="Add the request body sent for each job.")
def results(
    db: str, output: str | None, fmt: str, state: str | None, include_request: bool
) -> None:
    """Export finished jobs from the database.

    \b
    Example:
      runner results -o results.csv --format csv --status done
    """
    if output is None:
        _call(reports.results, db, sys.stdout, fmt, state, include_request)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        n = _call(reports.results, db, f, fmt, state, include_request)
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
    from runner import commands
    from runner import emulator as emu

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
