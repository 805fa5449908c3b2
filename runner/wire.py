"""What comes off the wire, checked field by field: answers, operations, error bodies.

The contract (``docs/api.md``) allows some latitude that a client must take in its stride: a
running operation has ``done`` false or absent, an ``error`` may come while ``done`` is still
false, token counts are int64 written as strings, and error bodies come in two shapes. Anything
else that does not match it raises ``Malformed``: the caller turns that into a fault of the job
(counted against its budget, never a crash), quoting the first 200 characters of what arrived.

``classify`` sorts a failed request into the kinds the scheduler acts on. ``transient`` covers
5xx answers, timeouts, refused or reset connections, DNS failures and gateway pages that are not
JSON: one such failure says nothing about the job, many across jobs say the service is down
(``breaker``). ``malformed`` is an answer that arrived but does not fit, which is the job's own.
"""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from runner.jobs import ApiFailure, Completion

Kind = Literal["transient", "malformed", "rate", "invalid", "auth", "forbidden", "not_found"]

GRPC_OF_HTTP = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 429: 8, 500: 13, 503: 14, 504: 4}
TRANSIENT_OPERATION_CODES = frozenset({4, 8, 13, 14})  # DEADLINE, EXHAUSTED, INTERNAL, UNAVAILABLE
CANCELLED_CODE = 1
SNIPPET = 200


class Malformed(ValueError):
    """An answer that is valid JSON (or HTTP) but not of the contract's shape."""


def snippet(text: str) -> str:
    return " ".join(text.split())[:SNIPPET]


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
        return "transient"
    return "invalid"


def parse_error(status: int, text: str) -> tuple[int, str, bool]:
    """(gRPC code, message, whether the body is one of the service's documented error shapes)
    from the body, or from the status alone (a proxy's page, an empty body)."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner: Any = data["error"] if isinstance(data.get("error"), dict) else data
        code = inner.get("grpcCode", inner.get("code"))
        message = inner.get("message")
        if isinstance(message, str):
            # the service's shapes carry a gRPC code (0-16); {"message": ...} alone, or an HTTP
            # status in "code" ({"code": 503, ...}), is a gateway's
            ok = isinstance(code, int) and not isinstance(code, bool) and 0 <= code <= 16
            return (code if ok else GRPC_OF_HTTP.get(status, 2)), message, ok
    tail = snippet(text)
    return GRPC_OF_HTTP.get(status, 2), f"HTTP {status}" + (f": {tail}" if tail else ""), False


def maybe_done(status: int, code: int, shaped: bool) -> bool:
    """Whether a request answered with this error may still have been carried out (for a
    submit: an operation created and billed; docs/api.md, sections 3 and 6): a deadline that
    passed (504, DEADLINE_EXCEEDED) after the request went in, or a 5xx that is not the
    service's own error body, from a gateway that may have passed the request on. The service's
    own 500, 501 and 503 did nothing (an internal error is not charged); a 502, or any other
    5xx the service does not send, is a gateway's whatever its body."""
    own = shaped and status in (500, 501, 503)
    return status == 504 or code == 4 or (status >= 500 and not own)


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


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Malformed(f"{what} is not an object")
    return value


def _str(value: Any, what: str, default: str | None = None) -> str:
    if value is None and default is not None:
        return default
    if not isinstance(value, str):
        raise Malformed(f"{what} is not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: half a character, which nothing can store
        raise Malformed(f"{what} is not valid text") from None
    return value


def _count(value: Any, what: str) -> int:
    """An int64 count: a decimal string (as sent) or a number; absent is 0."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise Malformed(f"{what} is not a count")
    try:
        n = int(value)
    except ValueError:
        raise Malformed(f"{what} is not a count") from None
    if not 0 <= n < 2**63:
        raise Malformed(f"{what} is out of range")
    return n


def parse_completion(data: Any) -> Completion:
    """A CompletionResponse (an operation's ``response`` or a sync ``result``), normalised."""
    data = _obj(data, "response")
    alternatives = data.get("alternatives")
    if not isinstance(alternatives, list) or not alternatives:
        raise Malformed("response.alternatives is not a non-empty list")
    first = _obj(alternatives[0], "response.alternatives[0]")
    message = _obj(first.get("message"), "response.alternatives[0].message")
    tool_calls = message.get("toolCallList")
    text = _str(message.get("text"), "message.text", "" if tool_calls is not None else None)
    usage = _obj(data.get("usage", {}), "response.usage")
    details = _obj(usage.get("completionTokensDetails") or {}, "usage.completionTokensDetails")
    return Completion(
        text=text,
        alternative_status=_str(first.get("status"), "status", "ALTERNATIVE_STATUS_UNSPECIFIED"),
        usage={
            "inputTextTokens": _count(usage.get("inputTextTokens"), "usage.inputTextTokens"),
            "completionTokens": _count(usage.get("completionTokens"), "usage.completionTokens"),
            "reasoningTokens": _count(details.get("reasoningTokens"), "usage.reasoningTokens"),
            "totalTokens": _count(usage.get("totalTokens"), "usage.totalTokens"),
        },
        model_version=_str(data.get("modelVersion"), "modelVersion", ""),
        tool_calls=_storable(tool_calls, "message.toolCallList"),
    )


def _storable(value: Any, what: str) -> Any:
    """A nested value (tool calls) that can be written as JSON text, or ``Malformed``."""
    if value is not None:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError, UnicodeEncodeError):
            raise Malformed(f"{what} cannot be stored") from None
    return value


@dataclass(frozen=True)
class OperationState:
    done: bool
    completion: Completion | None = None
    failure: ApiFailure | None = None

    @property
    def cancelled(self) -> bool:
        return self.failure is not None and self.failure.code == CANCELLED_CODE


def parse_operation(data: Any) -> OperationState:
    data = _obj(data, "operation")
    _str(data.get("id"), "operation.id")
    done = data.get("done", False)  # absent means running
    if not isinstance(done, bool):
        raise Malformed("operation.done is not a boolean")
    error = data.get("error")
    if error is not None and error != {}:
        error = _obj(error, "operation.error")
        code = error.get("code", 2)
        if isinstance(code, bool) or not isinstance(code, int):
            raise Malformed("operation.error.code is not an integer")
        return OperationState(True, failure=ApiFailure(code or 2, _str(error.get("message"), "error.message", "")))
    if not done:
        return OperationState(False)
    return OperationState(True, completion=parse_completion(data.get("response")))


def parse_submitted(data: Any) -> str:
    op_id = _obj(data, "operation").get("id")
    if not isinstance(op_id, str) or not op_id:
        raise Malformed("completionAsync answered without an operation id")
    return op_id


def parse_tokens(data: Any) -> int:
    tokens = _obj(data, "tokenize answer").get("tokens")
    if not isinstance(tokens, list):
        raise Malformed("tokenize answer has no tokens list")
    return len(tokens)
