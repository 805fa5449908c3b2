"""Reading a jobs file: one JSON object per line, turned into the request body we will send.

Three shapes are accepted (a ``prompt`` with optional ``system``; a ``messages`` list; a raw API
request body), each with optional overrides (``model``/``modelUri``, ``completionOptions``,
``jsonObject``, ``jsonSchema``, ``tools`` ...). Every line is normalised into the body the API
receives, serialised canonically (sorted keys, compact), so "same job" means "same bytes" and a
rerun with an unchanged file is recognised line by line. A short model name is stored without a
folder (``yandexgpt-lite/latest``) and expanded to ``gpt://<folder>/...`` only when sent
(``expand``): the folder is where a job runs, not part of what the job is.

The file is read as bytes, one bounded line at a time, so a million-line file or a 10 MB line
costs no more memory than a short one; problems are yielded, not raised, so the caller can
report every bad line at once and store nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from runner.errors import Problem, UsageError

MAX_LINE_BYTES = 1 << 20  # a 32k-token context is ~130 KB of text; 1 MiB leaves room for tools
MAX_ID_CHARS = 256
ROLES = ("system", "user", "assistant")
MODEL_SCHEMES = ("gpt://", "ds://")
DEFAULT_MODEL = "yandexgpt-lite"

_PASSTHROUGH = ("jsonObject", "jsonSchema", "tools", "toolChoice", "parallelToolCalls")
_KNOWN = frozenset(
    (
        "id", "prompt", "system", "messages", "turns", "model", "modelUri", "completionOptions",
        *_PASSTHROUGH,
    )
)  # fmt: skip
_OPTION_KEYS = frozenset(("stream", "temperature", "maxTokens", "reasoningOptions"))
_MESSAGE_KEYS = frozenset(("role", "text", "toolCallList", "toolResultList"))
_REASONING_MODES = ("REASONING_MODE_UNSPECIFIED", "DISABLED", "ENABLED_HIDDEN")


@dataclass(frozen=True)
class Spec:
    line: int
    id: str
    body: str  # canonical JSON of the request body (of the first turn, for a chat)
    turns: str | None = None  # canonical JSON list of a chat's user turns


class _Bad(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def model_ref(model: str) -> str:
    """A model as stored: a full ``gpt://`` URI as given, or a short name with its version
    (``yandexgpt-lite`` -> ``yandexgpt-lite/latest``) and no folder."""
    if "://" in model:
        if not model.startswith(MODEL_SCHEMES):
            raise _Bad("model", f"unknown model URI scheme in {model!r}; expected gpt:// or ds://")
        return model
    if not model or model.strip() != model or model.startswith("/"):
        raise _Bad("model", f"invalid model name {model!r}")
    return model if "/" in model else f"{model}/latest"


def model_uri(ref: str, folder_id: str) -> str:
    """The URI the API receives for a stored model reference."""
    return ref if "://" in ref else f"gpt://{folder_id}/{ref}"


def expand(body: str, folder_id: str) -> str:
    """The request to send for a stored body: its short model name gets the folder."""
    data = json.loads(body)
    ref = data.get("modelUri", "")
    if "://" in ref:
        return body
    data["modelUri"] = model_uri(ref, folder_id)
    return canonical(data)


def model_free(body: str) -> str:
    """A stored body with the folder left out of its model URI: what identifies a job.

    Databases written before short names were stored folder-free hold ``gpt://<folder>/...``
    for them; comparing without the folder makes a rerun from another folder the same job.
    """
    data = json.loads(body)
    ref = data.get("modelUri", "")
    if ref.startswith("gpt://"):
        data["modelUri"] = ref.split("/", 3)[3] if ref.count("/") >= 3 else ref
    return canonical(data)


# one encoder for every line: json.dumps with options builds a new one per call
_CANONICAL = json.JSONEncoder(
    ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
)


def canonical(body: dict[str, Any]) -> str:
    return _CANONICAL.encode(body)


def open_jobs_file(path: str) -> IO[bytes]:
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, not a jobs file")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None


def read_jobs(path: str, default_model: str) -> Iterator[Spec | Problem]:
    """Yield a ``Spec`` per job line and a ``Problem`` per bad line, in file order."""
    with open_jobs_file(path) as f:
        for number, raw in _lines(f):
            if raw is None:
                yield Problem(path, number, "", f"line longer than {MAX_LINE_BYTES} bytes")
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                yield Problem(
                    path, 1, "", "file starts with a UTF-8 byte-order mark; save it without BOM"
                )
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Problem(path, number, "", f"invalid UTF-8 at byte {e.start}")
                continue
            try:  # without its line break, an error at the line's end is placed at its end
                obj = _DECODER.decode(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                hint = " (truncated line?)" if not raw.endswith(b"\n") else ""
                if text.strip() in ("{", "["):
                    hint = " (one JSON object per line: this looks like indented JSON)"
                what = e.msg.removesuffix(" at")
                yield Problem(
                    path, number, "",
                    f"not valid JSON: {what} at line {number}, column {e.colno}{hint}",
                )  # fmt: skip
                continue
            except RecursionError:
                yield Problem(path, number, "", "not valid JSON here: nested too deeply")
                continue
            except ValueError as e:  # an integer of thousands of digits, NaN, Infinity
                yield Problem(path, number, "", f"not valid JSON here: {str(e).split(';')[0]}")
                continue
            if isinstance(obj, str):  # a prompt string is for the Python API; a line is an object
                yield Problem(path, number, "", 'expected a JSON object, got a string: {"prompt": ...}')
                continue
            if isinstance(obj, list):
                yield Problem(path, number, "", "expected a JSON object, got a list: one object "
                              "per line (JSONL), not a JSON array")  # fmt: skip
                continue
            yield spec_of(obj, number, path, default_model)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# one decoder for every line (json.loads with an option builds a new one per call); NaN and
# Infinity are not JSON, and SQLite's JSON functions refuse them once stored
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def spec_of(obj: Any, number: int, where: str, default_model: str) -> Spec | Problem:
    """One decoded job (a line's object, or an item of a Python list) as a Spec or a Problem."""
    if isinstance(obj, str):  # the Python API takes plain strings as prompts
        obj = {"prompt": obj}
    try:
        job_id, body = parse_job(obj, number, default_model)
        _storable(job_id, "id")
        turns = obj.get("turns")
        return Spec(number, job_id, _serialised(body), _serialised(turns) if turns else None)
    except _Bad as e:
        return Problem(where, number, e.field, e.message)
    except (TypeError, ValueError, RecursionError) as e:  # never a traceback for bad input
        return Problem(where, number, "", f"cannot be read: {e}")


def _serialised(value: Any) -> str:
    """Canonical JSON that SQLite and the API can take, or ``_Bad`` naming the field that is
    not (a Python object, NaN, a lone surrogate: "\\ud800" is valid JSON but not Unicode)."""
    try:
        return _storable(canonical(value), "")
    except (TypeError, ValueError, RecursionError):
        pass
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, part in items:  # name the first part that fails
        try:
            _storable(canonical(part), "")
        except (TypeError, ValueError, RecursionError, _Bad) as e:
            field = str(key) if isinstance(value, dict) else f"turns[{key}]"
            raise _Bad(field, _why(e)) from None
    raise _Bad("", "cannot be stored as JSON")


def _storable(text: str, field: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Bad(field, "is not valid Unicode (a lone surrogate such as \\ud800)") from None
    return text


def _why(e: Exception) -> str:
    if isinstance(e, _Bad):
        return e.message
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return f"is not JSON: {e}"  # a Python object, a non-string key, NaN or Infinity


def _lines(f: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """Physical lines with 1-based numbers; ``None`` for a line over the size limit."""
    number = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES:
            while raw and not raw.endswith(b"\n"):  # skip the rest without holding it
                raw = f.readline(MAX_LINE_BYTES)
            yield number, None
        else:
            yield number, raw


def parse_job(obj: Any, line: int, default_model: str) -> tuple[str, dict[str, Any]]:
    """Validate one decoded line and build the request body; raises ``_Bad`` on the first fault."""
    if not isinstance(obj, dict):
        raise _Bad("", f"expected a JSON object, got {type(obj).__name__}")
    if not all(isinstance(key, str) for key in obj):
        raise _Bad("", "field names must be strings")
    unknown = sorted(set(obj) - _KNOWN)
    if unknown:
        raise _Bad(unknown[0], "unknown field")
    job_id = _job_id(obj.get("id", f"line-{line}"))

    if "turns" in obj:
        # a chat: the history so far (system, or messages) and the first turn's question
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns:
            raise _Bad("turns", "must be a non-empty list of strings")
        for i, turn in enumerate(turns):
            _text(turn, f"turns[{i}]")
        if "prompt" in obj:
            raise _Bad("prompt", "give either prompt or turns, not both")
        if "system" in obj and "messages" in obj:
            raise _Bad("system", "put the system message inside messages")
        if "messages" in obj:
            messages = _messages(obj["messages"], history=True)
        elif "system" in obj:
            messages = [{"role": "system", "text": _text(obj["system"], "system")}]
        else:
            messages = []
        messages.append({"role": "user", "text": turns[0]})
    elif "prompt" in obj:
        if "messages" in obj:
            raise _Bad("prompt", "give either prompt or messages, not both")
        messages = []
        if "system" in obj:
            messages.append({"role": "system", "text": _text(obj["system"], "system")})
        messages.append({"role": "user", "text": _text(obj["prompt"], "prompt")})
    elif "messages" in obj:
        if "system" in obj:
            raise _Bad("system", "put the system message inside messages")
        messages = _messages(obj["messages"])
    else:
        raise _Bad("prompt", "missing: give prompt, messages or turns")

    if "model" in obj and "modelUri" in obj:
        raise _Bad("model", "give either model or modelUri, not both")
    if "modelUri" in obj:
        uri_value = obj["modelUri"]
        if not isinstance(uri_value, str) or "://" not in uri_value:
            raise _Bad("modelUri", "must be a string like gpt://<folder>/<model>/latest")
        uri = model_ref(uri_value)
    elif "model" in obj:
        if not isinstance(obj["model"], str):
            raise _Bad("model", "must be a string")
        uri = model_ref(obj["model"])
    else:
        uri = model_ref(default_model)

    body: dict[str, Any] = {
        "modelUri": uri,
        "completionOptions": _options(obj.get("completionOptions", {})),
        "messages": messages,
    }
    for key in _PASSTHROUGH:
        if key in obj:
            body[key] = obj[key]
    if "jsonObject" in body and not isinstance(body["jsonObject"], bool):
        raise _Bad("jsonObject", "must be true or false")
    if "jsonSchema" in body and not (
        isinstance(body["jsonSchema"], dict) and isinstance(body["jsonSchema"].get("schema"), dict)
    ):
        raise _Bad("jsonSchema", 'must be {"schema": {...}}')
    if body.get("jsonObject") and "jsonSchema" in body:
        raise _Bad("jsonSchema", "give either jsonObject or jsonSchema, not both")
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise _Bad("tools", "must be a list of objects")
    # null is passed on as given, as for tools (the API reads it as not set)
    if body.get("toolChoice") is not None and not isinstance(body["toolChoice"], dict):
        raise _Bad("toolChoice", "must be an object")
    if body.get("parallelToolCalls") is not None and not isinstance(body["parallelToolCalls"], bool):
        raise _Bad("parallelToolCalls", "must be true or false")
    return job_id, body


def _job_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Bad("id", "must be a string or an integer")
    if isinstance(value, int) and abs(value) >= 1 << 63:
        raise _Bad("id", "integer out of range; give it as a string")
    text = str(value)
    if not text or len(text) > MAX_ID_CHARS:
        raise _Bad("id", f"must be 1 to {MAX_ID_CHARS} characters")
    return text


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _Bad(field, "must be a string")
    if not value.strip():
        raise _Bad(field, "must not be empty")
    return value


def _messages(value: Any, history: bool = False) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _Bad("messages", "must be a list")
    if not value:
        raise _Bad("messages", "must not be empty")
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _Bad(where, "must be an object with role and text")
        unknown = sorted(str(k) for k in msg if k not in _MESSAGE_KEYS)
        if unknown:
            raise _Bad(f"{where}.{unknown[0]}", "unknown field")
        role = msg.get("role")
        if role not in ROLES:
            raise _Bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        for key in ("toolCallList", "toolResultList"):
            if key in msg and not isinstance(msg[key], dict):
                raise _Bad(f"{where}.{key}", "must be an object")
        if "text" in msg:
            _text(msg["text"], f"{where}.text")
        elif not ("toolCallList" in msg or "toolResultList" in msg):
            raise _Bad(f"{where}.text", "missing")
        out.append(msg)
    if not history and all(m["role"] == "system" for m in out):
        raise _Bad("messages", "needs at least one user or assistant message")
    return out


def _options(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad("completionOptions", "must be an object")
    unknown = sorted(set(value) - _OPTION_KEYS)
    if unknown:
        raise _Bad(f"completionOptions.{unknown[0]}", "unknown option")
    opts: dict[str, Any] = {"stream": False}
    if value.get("stream", False) is not False:
        raise _Bad("completionOptions.stream", "streaming is not supported by completionAsync")
    if "temperature" in value:
        t = value["temperature"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 1:
            raise _Bad("completionOptions.temperature", f"must be a number from 0 to 1, got {t!r}")
        opts["temperature"] = t
    if "maxTokens" in value:
        opts["maxTokens"] = str(_positive_int(value["maxTokens"], "completionOptions.maxTokens"))
    if "reasoningOptions" in value:
        ro = value["reasoningOptions"]
        extra = sorted(str(k) for k in ro if k != "mode") if isinstance(ro, dict) else []
        if extra:
            raise _Bad(f"completionOptions.reasoningOptions.{extra[0]}", "unknown option")
        if not isinstance(ro, dict) or ro.get("mode", "") not in _REASONING_MODES:
            raise _Bad(
                "completionOptions.reasoningOptions.mode",
                f"must be one of {', '.join(_REASONING_MODES)}",
            )
        opts["reasoningOptions"] = ro
    return opts


def _positive_int(value: Any, field: str) -> int:
    # int64 fields arrive as numbers or as decimal strings (proto3 JSON); accept both
    if isinstance(value, str) and value.isdecimal() and len(value) <= 4000:
        value = int(value)  # leading zeros included ("0100"); 4,000 digits is int()'s safe side
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 63:
        raise _Bad(field, f"must be a positive integer, got {value!r}")
    return value
