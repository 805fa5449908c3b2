"""What goes over the wire: answers, usage, tokens, error bodies and request validation.

Everything here is a pure function of the request, so a test can recompute what the emulator
will say: ``answer_for`` (the text of a completion: a digest of the messages and the last user
message, so every result can be traced to its job), ``body_key`` (the identity of a request
body, used to count duplicate charges), ``count_tokens`` / ``tokenize`` (a deterministic
four-characters-a-token tokenizer, the same one that fills ``usage.inputTextTokens``, so a dry
run's count agrees exactly with what a generation reports) and ``completion_response``.

Errors are built by ``error_payload`` in either documented body shape (the plain
``{"code", "message", "details"}`` or the gateway's ``{"error": {"grpcCode", "httpCode", ...}}``);
the server picks the shape at random so that clients must parse both.
"""

from __future__ import annotations

import hashlib
import json
from http import HTTPStatus
from typing import Any

MODEL_VERSION = "23.10.2024"
RESPONSE_TYPE = "type.googleapis.com/yandex.cloud.ai.foundation_models.v1.CompletionResponse"
GRPC_NAMES = {
    1: "CANCELLED", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION", 13: "INTERNAL",
    14: "UNAVAILABLE", 16: "UNAUTHENTICATED",
}  # fmt: skip


def answer_for(body: dict[str, Any]) -> str:
    """The emulator's deterministic answer to a request: a digest and the last user message."""
    messages = body.get("messages", [])
    digest = hashlib.sha256(
        json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()[:12]
    last = next((m.get("text", "") for m in reversed(messages) if m.get("role") == "user"), "")
    return f"[{digest}] {len(messages)} messages; you said: {last[:200]}"


def body_key(body: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    ).hexdigest()[:16]


def count_tokens(text: str) -> int:
    """Tokens in a text: one per four characters, at least one."""
    return max(1, len(text) // 4)


def tokenize(text: str) -> list[dict[str, Any]]:
    """``count_tokens(text)`` tokens: four-character chunks, the last one taking the rest."""
    n = count_tokens(text)
    chunks = [text[4 * i : 4 * i + 4] for i in range(n - 1)] + [text[4 * (n - 1) :]]
    return [
        {
            "id": str(int.from_bytes(hashlib.sha256(c.encode()).digest()[:4], "big") % 2**31),
            "text": c,
            "special": False,
        }
        for c in chunks
    ]


def message_texts(body: dict[str, Any]) -> list[str]:
    return [str(m.get("text", "")) for m in body.get("messages", []) if isinstance(m, dict)]


def completion_response(body: dict[str, Any]) -> dict[str, Any]:
    text = answer_for(body)
    inp = sum(count_tokens(t) for t in message_texts(body))
    out = count_tokens(text)
    return {
        "alternatives": [
            {"message": {"role": "assistant", "text": text}, "status": "ALTERNATIVE_STATUS_FINAL"}
        ],
        "usage": {
            "inputTextTokens": str(inp),
            "completionTokens": str(out),
            "totalTokens": str(inp + out),
            "completionTokensDetails": {"reasoningTokens": "0"},
        },
        "modelVersion": MODEL_VERSION,
    }


def error_payload(status: int, code: int, message: str, gateway_shape: bool) -> dict[str, Any]:
    """A google.rpc.Status body, or the gateway's ``{"error": {...}}`` wrapping of it."""
    if not gateway_shape:
        return {"code": code, "message": message, "details": []}
    return {
        "error": {
            "grpcCode": code,
            "httpCode": status,
            "message": message,
            "httpStatus": HTTPStatus(status).phrase,
            "details": [],
        }
    }


def parse_model_uri(uri: str) -> tuple[str, str] | None:
    """``gpt://<folder>/<model>[/<version>][@<suffix>]`` -> (folder, model), or None."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("gpt", "ds"):
        return None
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1].partition("@")[0]


def validate(body: Any) -> str | None:
    """What is wrong with a completion request body, or None."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    uri = body.get("modelUri")
    if not isinstance(uri, str) or not uri.startswith(("gpt://", "ds://")):
        return "modelUri: invalid model uri"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: must not be empty"
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            return "messages: invalid role"
    options = body.get("completionOptions") or {}
    if not isinstance(options, dict):
        return "completionOptions: must be an object"
    max_tokens = options.get("maxTokens")
    if max_tokens is not None:
        try:
            if int(max_tokens) <= 0:
                return "completionOptions.maxTokens: must be positive"
        except (TypeError, ValueError):
            return "completionOptions.maxTokens: must be an integer"
    return None
