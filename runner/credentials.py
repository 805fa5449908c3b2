"""Where the Authorization header comes from: an API key, an IAM token, or a command.

Credentials are read from the environment only (``YC_API_KEY`` or ``YC_IAM_TOKEN``, and
``YC_FOLDER_ID``; also the API docs' plain ``API_KEY``, ``IAM_TOKEN``, ``FOLDER_ID``) or passed
in from Python, and stay in memory: nothing writes them to the database, an output or a log.
An API key is sent as ``Api-Key`` without ``x-folder-id`` (a service account's own folder is
used, and a different one is refused); an IAM token as ``Bearer`` with ``x-folder-id``.

IAM tokens live at most 12 hours. With a token command (``yc iam create-token``) they are
refreshed after 11 hours and once on a 401. The command usually calls a network service too, so
a failing run of it (non-zero exit, a hang past its timeout, empty output) is retried with
backoff for a while; while the current token is still valid the run goes on with it, and only
when there is no valid token left does the run stop with ``CredentialsError`` (exit code 3).
"""

from __future__ import annotations

import logging
import os
import shlex
import time

import anyio

from runner.backoff import delay
from runner.errors import CredentialsError, UsageError

log = logging.getLogger("runner.credentials")

IAM_REFRESH_AFTER = 11 * 3600.0
IAM_LIFETIME = 12 * 3600.0
EMULATOR_FOLDER = "emulator-folder"


def env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


class Credentials:
    def __init__(
        self,
        folder_id: str,
        *,
        api_key: str | None = None,
        iam_token: str | None = None,
        token_command: str | None = None,
        refresh_after: float = IAM_REFRESH_AFTER,
        command_timeout: float = 30.0,
        retry_for: float = 300.0,
    ) -> None:
        if not (api_key or iam_token or token_command):
            raise UsageError("credentials need an API key, an IAM token or a token command")
        self.folder_id = folder_id
        self.refresh_after = refresh_after
        self.command_timeout = command_timeout
        self.retry_for = retry_for
        self._api_key = api_key
        self._token = iam_token
        self._command = token_command
        self._token_at = time.monotonic() if iam_token else 0.0
        self._retry_at = 0.0
        self._lock = anyio.Lock()
        self._failed: tuple[str | None, float, CredentialsError] | None = None  # the last refresh

    def __repr__(self) -> str:  # never show a secret
        kind = "api-key" if self._api_key else "iam-token"
        return f"Credentials(folder_id={self.folder_id!r}, {kind})"

    @classmethod
    def from_env(
        cls, folder_id: str | None = None, token_command: str | None = None
    ) -> Credentials | None:
        """Credentials from the environment, or None when none are set."""
        folder = folder_id or env("YC_FOLDER_ID", "FOLDER_ID")
        api_key = env("YC_API_KEY", "API_KEY")
        token = env("YC_IAM_TOKEN", "IAM_TOKEN")
        command = token_command or env("RUNNER_IAM_TOKEN_COMMAND")
        if not (api_key or token or command):
            return None
        if not folder:
            raise UsageError(
                "no folder id: set YC_FOLDER_ID (or pass --folder-id); it is the folder your "
                "model URIs gpt://<folder>/... name"
            )
        return cls(folder, api_key=api_key, iam_token=token, token_command=command)

    @classmethod
    def for_emulator(cls, folder_id: str | None = None) -> Credentials:
        return cls(folder_id or EMULATOR_FOLDER, api_key="emulator-key")

    @property
    def can_refresh(self) -> bool:
        return self._command is not None

    def current(self) -> str | None:
        return self._token

    async def headers(self) -> dict[str, str]:
        if self._api_key:
            return {"Authorization": f"Api-Key {self._api_key}"}
        return {"Authorization": f"Bearer {await self._bearer()}", "x-folder-id": self.folder_id}

    async def _bearer(self) -> str:
        age = time.monotonic() - self._token_at
        if self._command and (not self._token or age > self.refresh_after):
            if self._token and age < IAM_LIFETIME - 600:  # due, but still good: never wait
                if time.monotonic() >= self._retry_at and not self._lock.locked():
                    await self._refresh_early(self._token)
                return self._token
            await self.refresh(self._token)
        assert self._token is not None
        return self._token

    async def _refresh_early(self, seen: str) -> None:
        """A refresh while the token is still good: one try of the command, by one caller; the
        others go on with the current token meanwhile, and a failure is tried again in a
        minute (the command's retries, which held every request, are for a token that no
        longer works)."""
        async with self._lock:
            if self._token != seen:
                return
            token = await self._try_command()
            if token.startswith("!"):
                log.warning("IAM token refresh failed (%s); using the current token for now, "
                            "trying again in a minute", token[1:])  # fmt: skip
                self._retry_at = time.monotonic() + 60.0
                return
            self._token, self._token_at, self._failed = token, time.monotonic(), None
            log.info("IAM token refreshed")

    async def refresh(self, seen: str | None) -> None:
        """Run the token command, once for all callers that saw the same stale token."""
        if not self._command:
            raise CredentialsError(
                "the API rejected the credentials (401 UNAUTHENTICATED) and there is no way to "
                "refresh them; set a fresh YC_IAM_TOKEN or pass --iam-token-command "
                "(an API key may have expired: create a new one), then run it again (a batch resumes "
                "where it stopped)"
            )
        async with self._lock:
            if self._token != seen:
                return  # someone else refreshed it meanwhile
            failed = self._failed
            if failed is not None and failed[0] == seen and time.monotonic() - failed[1] < 60:
                raise failed[2]  # callers that waited for that refresh share its failure
            try:
                self._token = await self._run_command()
            except CredentialsError as e:
                self._failed = (seen, time.monotonic(), e)
                raise
            self._token_at, self._failed = time.monotonic(), None
            log.info("IAM token refreshed")

    async def _run_command(self) -> str:
        assert self._command is not None
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            why = await self._try_command()
            if not why.startswith("!"):
                return why
            waited = time.monotonic() - started
            if waited >= self.retry_for:
                raise CredentialsError(
                    f"--iam-token-command failed for {waited:.0f} s ({why[1:]}); run it by hand "
                    "to see why, then run runner again (a batch resumes where it stopped)"
                )
            pause = max(0.05, min(delay(attempt, base=1.0, cap=30.0), self.retry_for - waited))
            log.warning("--iam-token-command failed (%s); trying again in %.0f s", why[1:], pause)
            await anyio.sleep(pause)

    async def _try_command(self) -> str:
        """The token, or '!' and why the command did not give one."""
        assert self._command is not None
        try:
            with anyio.fail_after(self.command_timeout):
                result = await anyio.run_process(shlex.split(self._command), check=False)
        except TimeoutError:
            return f"!no answer within {self.command_timeout:g} s"
        except OSError as e:
            return f"!could not start: {e.strerror}"
        token = result.stdout.decode(errors="replace").strip()
        if result.returncode != 0:
            return f"!exit code {result.returncode}"
        if not token or any(c.isspace() for c in token):
            return "!no token on its output"
        return token
