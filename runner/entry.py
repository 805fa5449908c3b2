"""The ``runner`` command's entry point: signals first, then the (heavier) CLI.

A Ctrl-C while Python imports click, anyio and the CLI would print a traceback; installed
before those imports, the handler ends the process with exit code 130 instead (nothing has
been done yet). See ``runner.interrupts``.
"""

from __future__ import annotations


def main() -> None:
    from runner.interrupts import exit_at_once

    exit_at_once()
    from runner.cli import main as cli

    cli()
