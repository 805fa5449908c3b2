"""The HTTP client for Yandex AI Studio: completionAsync, operations, and sync completion.

It speaks the wire contract in ``shared/foundation-models-api.md``: ``Authorization`` with an
API key or an IAM token, ``x-folder-id``, ``x-data-logging-enabled: false``, a fresh
``x-client-request-id`` per request and the job's stable ``Idempotency-Key`` on submits. Token
counts arrive as strings and leave as ints; ``done`` may be absent (running) and ``error`` may
come with ``done`` false (failed).

Every failure becomes an ``ApiError`` with a ``kind`` the scheduler acts on (retry, rate,
invalid, auth, forbidden, not_found) and ``sent``, which says whether the request may have
reached the server: that is what makes a failed submit ambiguous. Both documented error body
shapes are parsed. Messages never include headers, so no credential can leak through them.
"""

from __future__ import annotations

import email.utils
import json
import logging
import shlex
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import anyio

from runner.errors import FatalApiError, UsageError
from runner.jobs import ApiFailure, Completion

log = logging.getLogger("runner.api")

DEFAULT_LLM_URL = "https://llm.api.cloud.yandex.net"
DEFAULT_OPERATION_URL = "https://operation.api.cloud.yandex.net"
IAM_REFRESH_AFTER = 11 * 3600.0  # IAM tokens live at most 12 h

Kind = Literal["retry", "rate", "invalid", "auth", "forbidden", "not_found"]


class ApiError(Exception):
    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        status: int = 0,
        code: int = 0,
        retry_after: float | None = None,
        sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.kind: Kind = kind
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.sent = sent

    def failure(self) -> ApiFailure:
        return ApiFailure(self.code or _GRPC_OF_HTTP.get(self.status, 2), self.message)


_GRPC_OF_HTTP = {400: 3, 401: 16, 403: 7, 404: 5, 429: 8, 500: 13, 503: 14, 504: 4}
_KIND_OF_GRPC: dict[int, Kind] = {
    3: "invalid",
    5: "not_found",
    7: "forbidden",
    8: "rate",
    16: "auth",
}


def classify(status: int, code: int) -> Kind:
    if status == 429 or code == 8:
        return "rate"
    if status == 401:
        return "auth"
    if status == 403:
        return "forbidden"
    if status == 404:
        return "not_found"
    if status >= 500 or status == 408:
        return "retry"
    if status >= 400:
        return _KIND_OF_GRPC.get(code, "invalid")
    return "retry"


def parse_error(status: int, text: str) -> tuple[int, str]:
    """(gRPC code, message) from either documented error body shape, or from the status alone."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner: dict[str, Any] = data["error"] if isinstance(data.get("error"), dict) else data
        code = inner.get("grpcCode", inner.get("code"))
        message = inner.get("message")
        if isinstance(message, str):
            return (code if isinstance(code, int) else _GRPC_OF_HTTP.get(status, 2)), message
    snippet = " ".join(text.split())[:200]
    return _GRPC_OF_HTTP.get(status, 2), f"HTTP {status}" + (f": {snippet}" if snippet else "")


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def parse_completion(data: Any) -> Completion:
    """A CompletionResponse (the operation's ``response`` or sync ``result``), normalised."""
    if not isinstance(data, dict):
        raise ValueError("response is not an object")
    alternatives = data.get("alternatives")
    if not isinstance(alternatives, list) or not alternatives:
        raise ValueError("response has no alternatives")
    first = alternatives[0]
    message = first.get("message") or {}
    usage = data.get("usage") or {}
    details = usage.get("completionTokensDetails") or {}
    return Completion(
        text=str(message.get("text", "")),
        alternative_status=str(first.get("status", "ALTERNATIVE_STATUS_UNSPECIFIED")),
        usage={
            "inputTextTokens": _int(usage.get("inputTextTokens")),
            "completionTokens": _int(usage.get("completionTokens")),
            "reasoningTokens": _int(details.get("reasoningTokens")),
            "totalTokens": _int(usage.get("totalTokens")),
        },
        model_version=str(data.get("modelVersion", "")),
        tool_calls=message.get("toolCallList"),
    )


@dataclass(frozen=True)
class OperationState:
    done: bool
    completion: Completion | None = None
    failure: ApiFailure | None = None


def parse_operation(data: Any) -> OperationState:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise ValueError("not an Operation object")
    error = data.get("error")
    if isinstance(error, dict) and error:
        return OperationState(
            True, failure=ApiFailure(_int(error.get("code")) or 2, str(error.get("message", "")))
        )
    if not data.get("done", False):  # absent means running
        return OperationState(False)
    return OperationState(True, completion=parse_completion(data.get("response")))


class Credentials:
    """Where the Authorization header comes from: an API key, an IAM token, or a command."""

    def __init__(
        self,
        folder_id: str,
        *,
        api_key: str | None = None,
        iam_token: str | None = None,
        token_command: str | None = None,
        refresh_after: float = IAM_REFRESH_AFTER,
    ) -> None:
        self.folder_id = folder_id
        self.refresh_after = refresh_after
        self._api_key = api_key
        self._token = iam_token
        self._command = token_command
        self._token_at = time.monotonic() if iam_token else 0.0
        self._refresh_lock = anyio.Lock()

    @property
    def can_refresh(self) -> bool:
        return self._command is not None

    async def authorization(self) -> str:
        if self._api_key:
            return f"Api-Key {self._api_key}"
        if self._command and (
            not self._token or time.monotonic() - self._token_at > self.refresh_after
        ):
            await self.refresh(self._token)
        return f"Bearer {self._token}"

    async def refresh(self, seen: str | None) -> None:
        """Run the token command, once for all callers that saw the same stale token."""
        if not self._command:
            raise FatalApiError(
                "the API rejected the credentials (401 UNAUTHENTICATED) and there is no way to "
                "refresh them; set a fresh YC_IAM_TOKEN or pass --iam-token-command, then rerun"
            )
        async with self._refresh_lock:
            if self._token != seen:
                return
            try:
                result = await anyio.run_process(shlex.split(self._command), check=False)
            except OSError as e:
                raise FatalApiError(f"--iam-token-command could not start: {e.strerror}") from None
            token = result.stdout.decode().strip()
            if result.returncode != 0 or not token:
                raise FatalApiError(
                    f"--iam-token-command exited with {result.returncode} and gave no token; "
                    "check it by hand, then rerun"
                )
            self._token, self._token_at = token, time.monotonic()
            log.info("IAM token refreshed")

    def current(self) -> str | None:
        return self._token


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
        data = await self._call(
            "POST", f"{self.llm_url}/foundationModels/v1/completionAsync", body, idem_key
        )
        op_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(op_id, str) or not op_id:
            raise ApiError("retry", "completionAsync answered without an operation id")
        return op_id

    async def poll(self, operation_id: str) -> OperationState:
        data = await self._call("GET", f"{self.operation_url}/operations/{operation_id}")
        try:
            return parse_operation(data)
        except ValueError as e:
            raise ApiError("retry", f"malformed operation: {e}") from None

    async def complete(self, body: str, idem_key: str) -> Completion:
        data = await self._call(
            "POST", f"{self.llm_url}/foundationModels/v1/completion", body, idem_key, sync=True
        )
        try:
            return parse_completion(data.get("result") if isinstance(data, dict) else None)
        except ValueError as e:
            raise ApiError("retry", f"malformed completion: {e}") from None

    async def cancel(self, operation_id: str) -> bool:
        try:
            await self._call("POST", f"{self.operation_url}/operations/{operation_id}:cancel", "{}")
        except ApiError:
            return False
        return True

    async def _call(
        self,
        method: str,
        url: str,
        body: str | None = None,
        idem_key: str | None = None,
        *,
        sync: bool = False,
    ) -> Any:
        for refreshed in (False, True):
            token = self.creds.current()
            headers = {
                "Authorization": await self.creds.authorization(),
                "x-folder-id": self.creds.folder_id,
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
                if e.kind != "auth" or refreshed:
                    if e.kind == "auth":
                        raise FatalApiError(
                            f"the API still rejects the credentials after a refresh: {e.message}"
                        ) from None
                    raise
                await self.creds.refresh(token)
        raise AssertionError("unreachable")

    async def _once(
        self, method: str, url: str, headers: dict[str, str], body: str | None, sync: bool
    ) -> Any:
        try:
            async with self.session.request(
                method,
                url,
                data=body.encode() if body is not None else None,
                headers=headers,
                timeout=self.sync_timeout if sync else self.timeout,
            ) as resp:
                text = await resp.text(errors="replace")
                trace = resp.headers.get("x-request-id", "")
                status = resp.status
                retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise ApiError("retry", "request timed out") from None
        except aiohttp.ClientConnectorError as e:
            raise ApiError("retry", f"cannot connect: {e.os_error}", sent=False) from None
        except (aiohttp.ClientError, OSError) as e:
            raise ApiError("retry", f"connection failed: {type(e).__name__}") from None
        if status >= 400:
            code, message = parse_error(status, text)
            kind = classify(status, code)
            if status >= 500 or kind != "retry":
                log.debug("%s %s -> %s (request %s): %s", method, url, status, trace, message)
            raise ApiError(kind, message, status=status, code=code, retry_after=retry_after)
        try:
            return json.loads(text)
        except ValueError:
            raise ApiError("retry", f"HTTP {status} with a body that is not JSON") from None


def check_url(url: str, option: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"{option}: {url!r} is not an http(s) URL")
    return url
