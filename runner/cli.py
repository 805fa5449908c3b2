"""The command line: options in, one call to the Python API (``runner.Batch``), print.

A ``RunnerError`` becomes one line on stderr and its exit code (2 bad usage or input, 1 some jobs
failed, 3 credentials refused, 4 API unreachable past --max-outage, 5 cannot write, 130
interrupted). ``-v`` shows runner's INFO lines, ``-vv`` its DEBUG lines, ``-vvv`` everyone's;
they and ``-q`` work before or after the command.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, ClassVar

import click

from runner import __version__, display, pricing
from runner.errors import RunnerError

ENV = "env: "


def _fail(e: RunnerError) -> click.ClickException:
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
        raise _fail(e) from None


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
        raise _fail(e) from None


class Group(click.Group):
    """Commands with heavy imports are loaded when named, so `runner status` stays quick."""

    lazy: ClassVar[dict[str, str]] = {"emulator": "runner.emulator.cli"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            import importlib

            command: click.Command = getattr(importlib.import_module(self.lazy[name]), name)
            return command
        return super().get_command(ctx, name)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="runner")
@verbosity
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Run JSONL prompts through Yandex AI Studio's completionAsync API, resumably.

    Credentials come from YC_API_KEY or YC_IAM_TOKEN, and YC_FOLDER_ID (see the README).
    """
    ctx.obj = (verbose, quiet)


def dump(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False))


@cli.command()
@click.argument("jobs", required=False, type=click.Path(dir_okay=True))
@DB
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Results file (JSONL), kept equal to the database: one line per finished job, "
              "completed on every run, a torn tail cut; a file runner did not write is refused.")
@options(CONNECT)
@click.option("--mode", type=click.Choice(["async", "sync"]), default="async", show_default=True,
              help="async: completionAsync and polling, half price; sync: /completion.")
@click.option("--submit-rps", default=10.0, show_default=True, type=Number(min=0.01),
              help="Submit quota: requests per second.")
@click.option("--submit-per-hour", default=5000, show_default=True, type=click.IntRange(min=1),
              help="Submit quota: requests per hour (async).")
@click.option("--poll-rps", default=50.0, show_default=True, type=Number(min=0.01),
              help="Operation poll quota: requests per second.")
@click.option("--quota-window", default=3600.0, hidden=True, type=Number(min=0.1),
              help="Seconds in the hourly quota's window (compressed-time benchmarks).")
@click.option("--max-faults", default=5, show_default=True, type=click.IntRange(min=1),
              help="A job's own transient errors before it fails (outages do not count).")
@click.option("--max-resubmits", default=2, show_default=True, type=click.IntRange(min=0),
              help="Times a job is sent again after its operation expired or failed transiently.")
@click.option("--op-deadline", default="24h", show_default=True, type=Duration(positive=True),
              help="An operation still running after this long fails (or see --resubmit-stuck).")
@click.option("--resubmit-stuck", is_flag=True, help="Resubmit operations past --op-deadline instead.")
@click.option("--max-outage", type=Duration(),
              help="Stop (exit 4) once the API has been unreachable this long (default: wait).")
@click.option("--retention", default="3d", hidden=True, type=Duration(),
              help="How long the server keeps results; a 404 for a younger operation stops the run.")
@click.option("--latency-prior", hidden=True, type=Duration(positive=True), envvar="RUNNER_LATENCY_PRIOR",
              help="First poll before any latency is learned (compressed-time benchmarks).")
@click.option("--probe-max", default=120.0, hidden=True, type=Number(min=0.05),
              help="Longest wait between probes of an unreachable API (seconds).")
@click.option("--storage-patience", default=60.0, hidden=True, type=Number(min=0),
              help="Seconds of failing database writes before the run stops (exit 5).")
@click.option("--context-budget", default=32768, show_default=True, type=click.IntRange(min=1),
              help="Tokens a chat turn may need; a longer conversation stops before the API refuses it.")
@click.option("--dry-run", is_flag=True, help="Validate, count and price JOBS; store and send nothing.")
@click.option("--exact", is_flag=True, help="With --dry-run: count input tokens with the API's (free) tokenizer.")
@PRICE
@JSON
@click.option("--progress-interval", type=Number(min=0.1),
              help="Seconds between progress updates (default: 1 on a terminal, 10 otherwise).")
@verbosity
@click.pass_context
def run(ctx: click.Context, /, jobs: str | None, db: str, output: str | None, dry_run: bool,
        exact: bool, as_json: bool, progress_interval: float | None, verbose: int, quiet: bool,
        **kw: Any) -> None:  # fmt: skip
    """Add JOBS (if given) to the database, then submit and poll until every job is finished.

    \b
    Example:
      runner run jobs.example.jsonl --emulator -o out.jsonl
      runner run -o out.jsonl          # resume what runner.db holds
    """
    from runner.batch import Quotas
    from runner.progress import render

    v, q = setup_logging(ctx, verbose, quiet)
    if exact and not dry_run:
        raise click.UsageError("--exact counts tokens for --dry-run; add --dry-run")
    quotas = Quotas(kw.pop("submit_rps"), kw.pop("submit_per_hour"), kw.pop("poll_rps"),
                    hour=kw.pop("quota_window"))  # fmt: skip
    tty = sys.stderr.isatty() and not v
    live: Any = None

    def show(snap: Any) -> None:
        if live is not None:
            live.update(render(snap))
        else:
            click.echo(f"{__import__('time').strftime('%H:%M:%S')} progress: {snap.line()}", err=True)

    batch = batch_of(ctx, db, quotas=quotas, progress=None if q else show,
                     progress_interval=progress_interval or (1.0 if tty else 10.0), **kw)  # fmt: skip
    batch.handle_signals = True

    async def go() -> Any:
        from runner.interrupts import listening

        return await listening(batch, early, work)

    async def work() -> Any:
        nonlocal live
        if not jobs and not dry_run:  # a resume: a mistyped --db must not pass for a done batch
            from runner.database import must_exist

            must_exist(db)
        async with batch:
            if dry_run:
                if not jobs:
                    raise click.UsageError("--dry-run needs a JOBS file")
                return await batch.plan(jobs, exact=exact)
            if jobs:  # whatever would refuse the run refuses it before anything is stored
                await batch.require_credentials(jobs)
                batch.jobs_path = jobs
            if output:
                await batch.check_output(output)
            added = await batch.add(jobs) if jobs else None
            if tty and not q:
                from rich.console import Console
                from rich.live import Live

                live = Live(console=Console(stderr=True), refresh_per_second=2)
                live.start()
            try:
                report = await batch.run(output=output)
            finally:
                if live is not None:
                    live.stop()
            return added, report

    from runner.interrupts import remembered

    with remembered() as early:  # until the run listens (go), a signal is remembered
        result = call(go, listens=True)
    if dry_run:
        return dump(result) if as_json else click.echo(display.plan(result, db))
    added, report = result
    if as_json:  # the summary's figures, on stdout
        dump({"added": added.added if added else 0, "counts": report.counts,
              "thisRun": report.this_run, "exitCode": report.exit_code})  # fmt: skip
    else:
        click.echo(display.summary(report.counts, report.this_run, added.added if added else 0, db), err=True)
    if report.interrupted:
        click.echo("interrupted: state is saved; run the same command to resume", err=True)
    sys.exit(report.exit_code)


def reader(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Common plumbing of the commands that only read: --db, -v/-q."""
    wrapped: Callable[..., Any] = DB(verbosity(click.pass_context(fn)))
    return wrapped


@cli.command()
@JSON
@click.option("--watch", is_flag=True, help="Refresh every 2 seconds until Ctrl-C.")
@PRICE
@reader
def status(ctx: click.Context, /, db: str, as_json: bool, watch: bool, price: tuple[str, ...],
           verbose: int, quiet: bool) -> None:  # fmt: skip
    """Counts per state, tokens, estimated cost, retries, outages and the commonest errors.

    \b
    Example:
      runner status
      runner status --json | jq .cost
    """
    import time

    setup_logging(ctx, verbose, quiet)
    while True:
        batch = batch_of(ctx, db, price=price)
        data = call(partial(_with, batch, batch.status))
        if watch and not as_json:
            click.clear()
        dump(data) if as_json else click.echo(display.status(data))
        if not watch:
            return
        time.sleep(2)


async def _with(batch: Any, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    async with batch:
        return await fn(*args)


@cli.command()
@click.option("--status", "state", type=click.Choice(["pending", "submitting", "running", "done", "failed", "cancelled"]),
              help="Only jobs in this state.")  # fmt: skip
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1), help="Rows to show.")
@JSON
@reader
def jobs(ctx: click.Context, /, db: str, state: str | None, limit: int, as_json: bool, verbose: int,
         quiet: bool) -> None:  # fmt: skip
    """List jobs with their state, attempts, operation id and last error.

    \b
    Example:
      runner jobs --status failed --limit 20
    """
    setup_logging(ctx, verbose, quiet)
    batch = batch_of(ctx, db)
    rows, total = call(lambda: _with(batch, batch.jobs, state, limit))
    dump({"jobs": rows, "total": total}) if as_json else click.echo(display.jobs(rows, total))


@cli.command()
@click.argument("job_id")
@JSON
@reader
def show(ctx: click.Context, /, db: str, job_id: str, as_json: bool, verbose: int, quiet: bool) -> None:
    """One job in full: request, answer, usage, and every attempt.

    \b
    Example:
      runner show q1
    """
    setup_logging(ctx, verbose, quiet)
    batch = batch_of(ctx, db)
    data = call(lambda: _with(batch, batch.show, job_id))
    if data is None:
        raise _fail(__import__("runner.errors", fromlist=["UsageError"]).UsageError(
            f"no job {job_id!r} in {db}"))  # fmt: skip
    dump(data) if as_json else click.echo(display.show(data))


@cli.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="File (default: stdout); written whole through a temporary file.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
              help="Output format.")  # fmt: skip
@click.option("--status", "state", type=click.Choice(["done", "failed", "cancelled"]), help="Only these.")
@click.option("--include-request", is_flag=True, help="Add the request body sent for each job.")
@reader
def results(ctx: click.Context, /, db: str, output: str | None, fmt: str, state: str | None,
            include_request: bool, verbose: int, quiet: bool) -> None:  # fmt: skip
    """Export finished jobs from the database.

    \b
    Example:
      runner results -o results.csv --format csv --status done
    """
    from runner import exports
    from runner import output as out

    setup_logging(ctx, verbose, quiet)
    batch = batch_of(ctx, db)
    if output is not None:
        n = call(lambda: _with(batch, batch.export, output, fmt, state, include_request))
        click.echo(f"{n} results written to {output}", err=True)
        return

    async def lines() -> str:
        async with batch:
            db_ = await batch._open(write=False)
            states = (state,) if state else ("done", "failed", "cancelled")
            found = [line async for _, line in out.lines_since(db_, 0, states, include_request)]
            return exports.render(found, fmt, include_request)

    click.echo(call(lines), nl=False)


@cli.command()
@click.option("--status", "states", multiple=True, type=click.Choice(["failed", "cancelled"]),
              default=["failed"], show_default=True, help="Which finished jobs to send again.")
@click.option("--error-code", type=int, help="Only jobs that failed with this gRPC code.")
@JSON
@reader
def retry(ctx: click.Context, /, db: str, states: tuple[str, ...], error_code: int | None,
          as_json: bool, verbose: int, quiet: bool) -> None:  # fmt: skip
    """Move failed (or cancelled) jobs back to pending, their outcome kept in history; rerun to
    resend. A job whose operation was never seen to end is polled again, not sent again.

    \b
    Example:
      runner retry --error-code 13 && runner run -o results.jsonl
    """
    setup_logging(ctx, verbose, quiet)
    batch = batch_of(ctx, db)
    moved = call(lambda: _with(batch, batch.retry, tuple(states), error_code))
    dump({"moved": moved}) if as_json else click.echo(
        f"{moved} jobs moved back to pending; run `runner run` to submit them again")


@cli.command()
@click.option("--pending-only", is_flag=True, help="Leave running operations alone.")
@options(CONNECT)
@JSON
@reader
def cancel(ctx: click.Context, /, db: str, pending_only: bool, as_json: bool, verbose: int,
           quiet: bool, **kw: Any) -> None:  # fmt: skip
    """Stop a batch: pending jobs are cancelled; running operations are cancelled on the server
    where it allows; finished ones are recorded with their answers; the rest are left running
    for a later `runner run` to collect, and nothing more is sent for them (no chat turn).

    \b
    Example:
      runner cancel --pending-only
    """
    setup_logging(ctx, verbose, quiet)
    batch = batch_of(ctx, db, **kw)
    report = call(lambda: _with(batch, batch.cancel, pending_only))
    dump(report) if as_json else click.echo(
        f"{report['cancelledPending']} pending jobs cancelled; running operations: "
        f"{report['cancelledRunning']} cancelled, {report['finishedRunning']} had finished and "
        f"were recorded, {report['leftRunning']} left running (a later `runner run` collects them)")


@cli.command()
@options(CONNECT)
@JSON
@reader
def check(ctx: click.Context, /, db: str, as_json: bool, verbose: int, quiet: bool, **kw: Any) -> None:
    """Check credentials, folder, role and model with one free tokenizer request.

    \b
    Example:
      YC_API_KEY=... YC_FOLDER_ID=b1g... runner check
    """
    setup_logging(ctx, verbose, quiet)
    batch = batch_of(ctx, db, **kw)
    report = call(lambda: _with(batch, batch.check))
    dump(report) if as_json else click.echo(("OK: " if report["ok"] else "NOT OK: ") + report["message"])
    sys.exit(0 if report["ok"] else 3)


def main() -> None:
    cli(prog_name="runner")
