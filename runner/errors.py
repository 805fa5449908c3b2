"""The error hierarchy, small on purpose: one class per way a run can end short of done.

Every failure a user can act on is a ``RunnerError`` carrying the CLI's exit code; the CLI turns
it into one line on stderr and that code, and the Python API raises it as is. Messages say what
happened, where, and what to do next, and never contain a credential. Jobs that fail are not
errors here: they are results with ``status == "failed"`` (exit code 1 from the CLI).

``InputError`` collects every problem found in a jobs file (or list) so that one run reports
them all with file, line and field, instead of making the user fix them one at a time. Whenever
one of these is raised, nothing that was not already committed changed: the store is the truth
and every transition commits before it is acted on.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_CREDENTIALS = 3
EXIT_OUTAGE = 4
EXIT_STORAGE = 5
EXIT_INTERRUPTED = 130


class RunnerError(Exception):
    exit_code = EXIT_SOME_FAILED


class UsageError(RunnerError):
    """Bad options, missing credentials, an unusable database or output file."""

    exit_code = EXIT_USAGE


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
    """The jobs are invalid; nothing was stored or sent."""

    def __init__(self, problems: list[Problem], more: int = 0, *, listed: bool = False) -> None:
        self.problems = problems
        self.more = more
        lines = [str(p) for p in problems]
        if more:
            lines.append(f"... and {more} more problems not shown")
        lines.append(f"Nothing was stored or sent. Fix the {'items' if listed else 'lines'} "
                     "above and run again.")  # fmt: skip
        super().__init__("\n".join(lines))


class CredentialsError(RunnerError):
    """The API refused us in a way retrying cannot fix: 403, 401 with no way to refresh, or a
    404 for operations too young to have expired (a wrong URL, folder or key).

    State is committed before this propagates, so the run can be resumed.
    """

    exit_code = EXIT_CREDENTIALS


class OutageError(RunnerError):
    """The API was unreachable for longer than ``--max-outage``; state is intact."""

    exit_code = EXIT_OUTAGE


class StorageError(RunnerError):
    """The database or the output file could not be written (disk full, I/O error, locked).

    Everything committed is intact; what could not be committed is named in the message.
    """

    exit_code = EXIT_STORAGE


class Interrupted(RunnerError):
    """Ctrl-C, SIGTERM or a cancelled call: requests on the wire were finished and saved."""

    exit_code = EXIT_INTERRUPTED
