"""The command line: each command is options in, one call to the Python API (``runner.Batch``),
print; the options several commands share, and the plumbing, are in ``runner.options``.

A ``RunnerError`` becomes one line on stderr and its exit code (2 bad usage or input, 1 some jobs
failed, 3 credentials refused, 4 API unreachable past --max-outage, 5 cannot write, 130
interrupted). ``-v`` shows runner's INFO lines, ``-vv`` its DEBUG lines, ``-vvv`` everyone's;
they and ``-q`` work before or after the command.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any, ClassVar

import click

from runner import __version__, display
from runner.options import (
    CONNECT,
    DB,
    JSON,
    PRICE,
    Duration,
    Number,
    batch_of,
    call,
    dump,
    fail,
    options,
    reader,
    setup_logging,
    verbosity,
    within,
)


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
@click.option("--latency-prior", type=Duration(positive=True), envvar="RUNNER_LATENCY_PRIOR",
              help="First poll before 20 results have taught the latency, each chat turn's too "
                   "(default 60s; 1s with --emulator); lower it for prompts that finish in seconds.")
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
        data = call(partial(within, batch, batch.status))
        if watch and not as_json:
            click.clear()
        dump(data) if as_json else click.echo(display.status(data))
        if not watch:
            return
        time.sleep(2)


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
    rows, total = call(lambda: within(batch, batch.jobs, state, limit))
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
    data = call(lambda: within(batch, batch.show, job_id))
    if data is None:
        raise fail(__import__("runner.errors", fromlist=["UsageError"]).UsageError(
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
        n = call(lambda: within(batch, batch.export, output, fmt, state, include_request))
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
    moved = call(lambda: within(batch, batch.retry, tuple(states), error_code))
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
    report = call(lambda: within(batch, batch.cancel, pending_only))
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
    report = call(lambda: within(batch, batch.check))
    dump(report) if as_json else click.echo(("OK: " if report["ok"] else "NOT OK: ") + report["message"])
    sys.exit(0 if report["ok"] else 3)


def main() -> None:
    cli(prog_name="runner")
