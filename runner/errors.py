"""The error hierarchy, small on purpose.

Every failure a user can act on is a ``RunnerError`` carrying an exit code; the CLI turns it
into a ``click.ClickException`` at the edge and nothing below the CLI prints or exits.
Messages end with what to do next and never contain a credential.

``InputError`` collects every problem found in a jobs file so that one run reports them all
(file, line, field), instead of making the user fix them one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass


class RunnerError(Exception):
    exit_code = 1


class UsageError(RunnerError):
    """Bad options, missing credentials, unusable database file."""

    exit_code = 2


class StoreError(UsageError):
    """The database file cannot be used (corrupt, foreign, newer schema, locked by a live run)."""


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        field = f" [{self.field}]" if self.field else ""
        return f"{where}{field}: {self.message}"


class InputError(UsageError):
    """The jobs file is invalid; nothing was stored or sent."""

    def __init__(self, problems: list[Problem], more: int = 0) -> None:
        self.problems = problems
        self.more = more
        lines = [str(p) for p in problems]
        if more:
            lines.append(f"... and {more} more problems")
        lines.append("Nothing was stored or sent. Fix the lines above and run again.")
        super().__init__("\n".join(lines))


class FatalApiError(RunnerError):
    """The API refused us in a way retrying cannot fix (403, 401 with no way to refresh).

    State is committed before this propagates, so the run can be resumed.
    """

    exit_code = 3
