"""The HTTP client for Yandex AI Studio: completionAsync, operations, sync completion, tokenizer.

It speaks the contract in ``docs/api.md``: credentials' headers, ``x-data-logging-enabled:
false``, a fresh ``x-client-request-id`` per request, and the job's stable ``Idempotency-Key``
on submits (harmless; the API does not deduplicate). Every answer is checked by ``wire``.
Messages never include headers, so no credential can leak through them.

Every failure becomes an ``ApiError`` with the ``kind`` the scheduler acts on and
``maybe_created``: whether a submit may have created a (billed) operation although its answer
did not reach us (a timeout or reset after sending, a garbled or malformed 2xx). That is what
makes a failed submit ambiguous, and so does a 504 (a deadline passed after the request went
in) or a 5xx that is not the service's own error body (a gateway's, which may have passed the
request on). The service's own 500 or 503, or a refused connection, created nothing.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import aiohttp

from runner import wire
from runner.credentials import Credentials
from runner.errors import CredentialsError, UsageError
from runner.jobs import ApiFailure, Completion
from runner.wire import Kind, OperationState

log = logging.getLogger("runner.client")
T = TypeVar("T")

DEFAULT_LLM_URL = "https://llm.api.cloud.yandex.net"
DEFAULT_OPERATION_URL = "https://operation.api.cloud.yandex.net"


class ApiError(Exception):
    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        status: int = 0,
        code: int = 0,
        retry_after: float | None = None,
        maybe_created: bool = False,
        short: str = "",
    ) -> None:
        super().__init__(message)
        self._short = short
        self.kind: Kind = kind
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.maybe_created = maybe_created

    def failure(self) -> ApiFailure:
        return ApiFailure(self.code or wire.GRPC_OF_HTTP.get(self.status, 2), self.message)

    @property
    def short(self) -> str:
        """What went wrong in a few words, for "API unreachable since ... (HTTP 503)"."""
        return self._short or (f"HTTP {self.status}" if self.status else self.message)


def check_url(url: str, option: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"{option}: {url!r} is not an http(s) URL")
    return url.rstrip("/")


class Client:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        creds: Credentials,
        *,
        llm_url: str = DEFAULT_LLM_URL,
        operation_url: str = DEFAULT_OPERATION_URL,
        timeout: float = 60.0,
        sync_timeout: float = 600.0,
    ) -> None:
        self.session = session
        self.creds = creds
        self.llm_url = llm_url.rstrip("/")
        self.operation_url = operation_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0))
        self.sync_timeout = aiohttp.ClientTimeout(total=sync_timeout, sock_connect=10.0)

    async def submit(self, body: str, idem_key: str) -> str:
        url = f"{self.llm_url}/foundationModels/v1/completionAsync"
        data, text = await self._call("POST", url, body, idem_key)
        return self._parse(wire.parse_submitted, data, text, "completionAsync", created=True)

    async def poll(self, operation_id: str) -> OperationState:
        data, text = await self._call("GET", f"{self.operation_url}/operations/{operation_id}")
        return self._parse(wire.parse_operation, data, text, "the operation")

    async def complete(self, body: str, idem_key: str) -> Completion:
        url = f"{self.llm_url}/foundationModels/v1/completion"
        data, text = await self._call("POST", url, body, idem_key, sync=True)
        result = data.get("result") if isinstance(data, dict) else None
        return self._parse(wire.parse_completion, result, text, "completion", created=True)

    async def tokenize_completion(self, body: str) -> int:
        url = f"{self.llm_url}/foundationModels/v1/tokenizeCompletion"
        data, text = await self._call("POST", url, body)
        return self._parse(wire.parse_tokens, data, text, "tokenizeCompletion")

    async def cancel(self, operation_id: str) -> OperationState | None:
        """Ask the server to cancel; the operation it returns (finished ones come back
        unchanged, with their answer), or None if it refused. POST per the design guide, GET
        (as the proto maps it) if POST is not allowed."""
        url = f"{self.operation_url}/operations/{operation_id}:cancel"
        for method in ("POST", "GET"):
            try:
                data, text = await self._call(method, url, "{}" if method == "POST" else None)
            except ApiError as e:
                if method == "POST" and e.status in (404, 405, 501):
                    continue
                if e.kind in ("invalid", "not_found", "forbidden"):
                    return None
                raise
            return self._parse(wire.parse_operation, data, text, "the cancelled operation")
        return None

    @staticmethod
    def _parse(fn: Callable[[Any], T], data: Any, text: str, what: str, created: bool = False) -> T:
        try:
            return fn(data)
        except wire.Malformed as e:
            raise ApiError(
                "malformed",
                f"unexpected answer from {what}: {e}; it began: {wire.snippet(text)}",
                maybe_created=created,
            ) from None

    async def _call(
        self, method: str, url: str, body: str | None = None, idem_key: str | None = None,
        *, sync: bool = False,
    ) -> tuple[Any, str]:  # fmt: skip
        for refreshed in (False, True):
            seen = self.creds.current()
            headers = {
                **await self.creds.headers(),
                "x-data-logging-enabled": "false",
                "x-client-request-id": str(uuid.uuid4()),
            }
            if body is not None:
                headers["Content-Type"] = "application/json"
            if idem_key:
                headers["Idempotency-Key"] = idem_key
            try:
                return await self._once(method, url, headers, body, sync)
            except ApiError as e:
                if e.kind != "auth":
                    raise
                if refreshed or not self.creds.can_refresh:
                    raise CredentialsError(
                        f"the API rejects the credentials (401: {e.message}); "
                        + ("they were refreshed and are still refused; " if refreshed else "")
                        + "set a valid YC_API_KEY or YC_IAM_TOKEN (API keys can expire), or pass "
                        "--iam-token-command, then run it again (a batch resumes where it stopped)"
                    ) from None
                await self.creds.refresh(seen)
        raise AssertionError("unreachable")

    async def _once(
        self, method: str, url: str, headers: dict[str, str], body: str | None, sync: bool
    ) -> tuple[Any, str]:
        try:
            async with self.session.request(
                method, url, data=body.encode() if body is not None else None, headers=headers,
                timeout=self.sync_timeout if sync else self.timeout,
            ) as resp:  # fmt: skip
                # JSON is UTF-8 (RFC 8259): no charset sniffing per answer
                text = (await resp.read()).decode("utf-8", errors="replace")
                status = resp.status
                trace = resp.headers.get("x-request-id", "")
                retry_after = wire.retry_after_seconds(resp.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise ApiError(
                "transient", "request timed out", maybe_created=True, short="timeout"
            ) from None
        except aiohttp.ClientConnectorError as e:
            raise ApiError(
                "transient", f"cannot connect ({e.os_error})", short="cannot connect"
            ) from None
        except (aiohttp.ClientError, OSError) as e:
            raise ApiError(
                "transient", f"connection failed ({type(e).__name__})", maybe_created=True,
                short="connection lost",
            ) from None  # fmt: skip
        if status >= 400:
            code, message, shaped = wire.parse_error(status, text)
            kind = wire.classify(status, code)
            log.debug("%s %s -> %s (request %s): %s", method, url, status, trace, message)
            raise ApiError(
                kind, message, status=status, code=code, retry_after=retry_after,
                maybe_created=wire.maybe_done(status, code, shaped),
            )  # fmt: skip
        try:
            return json.loads(text), text
        except ValueError:
            # a gateway's page, or a body cut short: the service's trouble, not the job's
            raise ApiError(
                "transient", f"HTTP {status} with a body that is not JSON: {wire.snippet(text)}",
                status=status, maybe_created=True, short="garbled answer",
            ) from None  # fmt: skip
