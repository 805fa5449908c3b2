"""Reaching the API: credentials, base URLs, an HTTP session, or the built-in emulator.

``connect`` yields a ready ``Client``. Against the real service it takes the URLs from the
options or ``RUNNER_LLM_URL`` / ``RUNNER_OPERATION_URL`` (default: the real hosts) and the
credentials from the caller or the environment. With ``emulator=True`` it starts the built-in
emulator on a loopback port for the duration, keeping its operations in a file next to the
database (``<db>.emulator``), so that resuming a killed run finds its operations again exactly
as it would against the real service.

Nothing here is needed to read a database: ``status``, ``results`` and a run with nothing left
to send never import aiohttp.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runner.credentials import Credentials, env
from runner.database import side_file
from runner.errors import UsageError

if TYPE_CHECKING:
    from runner.client import Client


@dataclass(frozen=True)
class Endpoints:
    llm_url: str | None = None
    operation_url: str | None = None
    emulator: bool = False


def credentials(
    given: Credentials | None, folder_id: str | None, token_command: str | None, emulator: bool
) -> Credentials:
    if given is not None:
        return given
    found = Credentials.from_env(folder_id, token_command)
    if found is not None:
        return found
    if emulator:
        return Credentials.for_emulator(folder_id or env("YC_FOLDER_ID", "FOLDER_ID"))
    raise UsageError(
        "no credentials: set YC_API_KEY (a service account API key) or YC_IAM_TOKEN (or pass "
        "--iam-token-command; iam_token_command= in Python), and YC_FOLDER_ID; see README, "
        "'Getting credentials'; or add --emulator (emulator=True) to try the built-in emulator"
    )


def refuse_emulator_batch(db_path: str, endpoints: Endpoints, unfinished: int) -> None:
    """A batch run against the built-in emulator keeps its operations in ``<db>.emulator``.
    Resumed without it, its operations are unknown to the API asked (404), and its jobs would be
    finished by the real API beside the emulator's made-up answers. Say so before anything is
    stored or sent, rather than blame the URL or the credentials."""
    state = side_file(db_path, ".emulator")
    if unfinished and not endpoints.emulator and os.path.exists(state):
        raise UsageError(
            f"{db_path} was run against the built-in emulator ({state} holds its "
            "operations): add --emulator (emulator=True in Python) to resume it; for the real "
            "API, use another --db"
        )


@contextlib.asynccontextmanager
async def connect(
    creds: Credentials, endpoints: Endpoints, db_path: str, request_timeout: float
) -> AsyncIterator[Client]:
    import aiohttp  # here, not at the top: reading a database never needs the HTTP stack

    from runner.client import DEFAULT_LLM_URL, DEFAULT_OPERATION_URL, Client, check_url

    async with contextlib.AsyncExitStack() as stack:
        if endpoints.emulator:
            from runner import emulator as emu

            config = emu.Config(state_file=side_file(db_path, ".emulator"))
            server, url = await emu.serve(emu.Emulator(config), "127.0.0.1", 0)
            stack.push_async_callback(server.cleanup)
            llm = ops = url
        else:
            llm = check_url(
                endpoints.llm_url or env("RUNNER_LLM_URL") or DEFAULT_LLM_URL, "--llm-url"
            )
            ops = check_url(
                endpoints.operation_url or env("RUNNER_OPERATION_URL") or DEFAULT_OPERATION_URL,
                "--operation-url",
            )
        session = await stack.enter_async_context(aiohttp.ClientSession())
        yield Client(session, creds, llm_url=llm, operation_url=ops, timeout=request_timeout)
