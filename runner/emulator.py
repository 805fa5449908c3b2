"""A local stand-in for the AI Studio text generation API, as a real aiohttp server.

It follows the wire contract: completionAsync returns an Operation; ``GET /operations/{id}``
answers without ``done`` while running (or ``done: false``, alternating, since both are legal),
then with the response, int64 token counts as strings; errors come in both documented body
shapes. Auth and folder headers are required. Answers are derived from the request alone
(``answer_for``), so a test can check that every result belongs to its job.

Its switches are what tests and benchmarks turn: latency (uniform ``MIN:MAX`` or log-normal),
quotas per second and per hour enforced with a rolling window and answered with 429 (with or
without ``Retry-After``), and faults injected at a chosen rate per endpoint (5xx, connection
reset, hang, non-JSON or truncated bodies, operations that fail, expire or never finish).
``GET /emulator/stats`` reports what it saw, including submits per request body, which is how
the kill-loop test counts duplicate charges.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
from aiohttp import web

FAULTS = ("500", "503", "504", "429", "400", "401", "403", "reset", "hang", "garbage", "truncated")
ENDPOINTS = ("submit", "poll", "complete")


@dataclass
class Config:
    latency: tuple[float, float] = (0.05, 0.2)
    lognormal: tuple[float, float] | None = None  # (median seconds, sigma)
    submit_rps: float | None = None
    submit_per_hour: int | None = None
    hour_seconds: float = 3600.0  # the "hour" of the hourly quota; shorter in compressed time
    poll_rps: float | None = None
    max_concurrent_sync: int = 10
    retry_after: float | None = None  # seconds to send with 429s; None: no header
    faults: dict[str, float] = field(default_factory=dict)  # "submit:503" -> rate
    op_error_rate: float = 0.0  # operation finishes with an error
    op_error_running_rate: float = 0.0  # error while done is still false
    never_finish_rate: float = 0.0
    expire_after: float | None = None  # seconds after finishing that a poll gives 404
    op_expire_rate: float = 0.0  # operations that are gone (404) once finished
    hang_seconds: float = 30.0
    dedupe: bool = False  # honour Idempotency-Key
    reject_tokens: frozenset[str] = frozenset()  # bearer tokens answered with 401
    seed: int | None = None


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


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


@dataclass
class Op:
    id: str
    body: dict[str, Any]
    created: float
    ready_at: float
    error: dict[str, Any] | None = None
    error_while_running: bool = False
    never: bool = False
    cancelled: bool = False
    expired: bool = False


class Window:
    """A rolling-window rate limit: at most ``limit`` events in any ``span`` seconds."""

    def __init__(self, limit: float, span: float) -> None:
        self.limit = limit
        self.span = span
        self.events: collections.deque[float] = collections.deque()

    def admit(self, now: float) -> bool:
        while self.events and self.events[0] <= now - self.span:
            self.events.popleft()
        if len(self.events) >= self.limit:
            return False
        self.events.append(now)
        return True


class Emulator:
    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self.rng = random.Random(self.config.seed)
        self._salt = self.config.seed if self.config.seed is not None else self.rng.random()
        self.ops: dict[str, Op] = {}
        self.by_idem: dict[str, str] = {}
        self.stats: collections.Counter[str] = collections.Counter()
        self.submits_per_body: collections.Counter[str] = collections.Counter()
        self.messages_seen: list[int] = []
        self.idem_keys: list[str] = []  # Idempotency-Key of every accepted submit, in order
        self.sync_inflight = 0
        c = self.config
        self.windows: dict[str, list[Window]] = {"submit": [], "poll": [], "complete": []}
        if c.submit_rps:
            self.windows["submit"].append(Window(c.submit_rps, 1.0))
        if c.submit_per_hour:
            self.windows["submit"].append(Window(c.submit_per_hour, c.hour_seconds))
        if c.poll_rps:
            self.windows["poll"].append(Window(c.poll_rps, 1.0))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/foundationModels/v1/completionAsync", self.submit)
        app.router.add_post("/foundationModels/v1/completion", self.complete)
        app.router.add_get("/operations/{op}", self.operation)
        app.router.add_post("/operations/{op}", self.operation)
        app.router.add_get("/emulator/stats", self.report)
        return app

    # -- helpers ----------------------------------------------------------------------

    def _latency(self, body: dict[str, Any]) -> float:
        """A request's latency: a fixed draw for this request body and this emulator.

        Derived from the body rather than from a shared generator, so that every client sees
        the same latency for the same job, whatever else (429s, faults) it made the emulator
        do first: a benchmark then compares clients on equal terms.
        """
        c = self.config
        digest = hashlib.sha256(f"{self._salt}:{body_key(body)}".encode()).digest()
        u = (int.from_bytes(digest[:8], "big") + 0.5) / 2**64
        if c.lognormal:
            median, sigma = c.lognormal
            return median * math.exp(sigma * statistics.NormalDist().inv_cdf(u))
        lo, hi = c.latency
        return lo + u * (hi - lo)

    def _error(self, status: int, code: int, message: str, **headers: str) -> web.Response:
        # both documented shapes, chosen by a coin so clients must parse both
        if self.rng.random() < 0.5:
            payload: dict[str, Any] = {"code": code, "message": message, "details": []}
        else:
            payload = {
                "error": {
                    "grpcCode": code,
                    "httpCode": status,
                    "message": message,
                    "httpStatus": web.Response(status=status).reason,
                    "details": [],
                }
            }
        return web.json_response(payload, status=status, headers=headers)

    def _quota(self, endpoint: str) -> web.Response | None:
        now = time.monotonic()
        for w in self.windows[endpoint]:
            if not w.admit(now):
                self.stats[f"{endpoint}_429"] += 1
                headers = {}
                if self.config.retry_after is not None:
                    headers["Retry-After"] = str(self.config.retry_after)
                per = "Hour" if w.span > 1 else "Second"
                return self._error(
                    429, 8,
                    f"ai.textGeneration{endpoint.title()}RequestsPer{per}.rate rate quota limit "
                    f"exceed: allowed {int(w.limit)} requests",
                    **headers,
                )  # fmt: skip
        return None

    async def _fault(self, endpoint: str, request: web.Request) -> web.StreamResponse | None:
        for name in FAULTS:
            rate = self.config.faults.get(f"{endpoint}:{name}", 0.0)
            if rate and self.rng.random() < rate:
                self.stats[f"fault_{endpoint}_{name}"] += 1
                return await self._inject(name, request)
        return None

    async def _inject(self, name: str, request: web.Request) -> web.StreamResponse:
        if name.isdigit():
            status = int(name)
            code = {500: 13, 503: 14, 504: 4, 429: 8, 400: 3, 401: 16, 403: 7}[status]
            headers = {}
            if status == 429 and self.config.retry_after is not None:
                headers["Retry-After"] = str(self.config.retry_after)
            return self._error(status, code, f"injected {status}", **headers)
        if name == "hang":
            await anyio.sleep(self.config.hang_seconds)
            return web.json_response({"code": 4, "message": "late"}, status=504)
        if name == "garbage":
            return web.Response(text="<html>upstream hiccup</html>", content_type="text/html")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = 4096
        await resp.prepare(request)
        if name == "truncated":
            await resp.write(b'{"id": "trunc')
        if request.transport is not None:
            request.transport.abort()  # "reset": the connection dies mid-response
        return resp

    def _auth(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        scheme, _, secret = auth.partition(" ")
        if scheme not in ("Api-Key", "Bearer") or not secret:
            return self._error(401, 16, "Unauthenticated: missing or malformed Authorization")
        if scheme == "Bearer" and secret in self.config.reject_tokens:
            self.stats["rejected_tokens"] += 1
            return self._error(401, 16, "Token is invalid or has expired.")
        if not request.headers.get("x-folder-id"):
            return self._error(401, 16, "x-folder-id header is required")
        return None

    def _validate(self, body: Any) -> str | None:
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
        max_tokens = (body.get("completionOptions") or {}).get("maxTokens")
        if max_tokens is not None and int(max_tokens) <= 0:
            return "completionOptions.maxTokens: must be positive"
        return None

    async def _body(
        self, request: web.Request
    ) -> tuple[dict[str, Any] | None, web.Response | None]:
        try:
            body = await request.json()
        except ValueError:
            return None, self._error(400, 3, "request body is not valid JSON")
        problem = self._validate(body)
        if problem:
            return None, self._error(400, 3, problem)
        return body, None

    def _response(self, body: dict[str, Any]) -> dict[str, Any]:
        text = answer_for(body)
        inp = sum(_tokens(m.get("text", "")) for m in body["messages"])
        out = _tokens(text)
        return {
            "alternatives": [
                {
                    "message": {"role": "assistant", "text": text},
                    "status": "ALTERNATIVE_STATUS_FINAL",
                }
            ],
            "usage": {
                "inputTextTokens": str(inp),
                "completionTokens": str(out),
                "totalTokens": str(inp + out),
                "completionTokensDetails": {"reasoningTokens": "0"},
            },
            "modelVersion": "23.10.2024",
        }

    # -- handlers ---------------------------------------------------------------------

    async def submit(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        denied = self._auth(request) or self._quota("submit")
        if denied:
            return denied
        fault = await self._fault("submit", request)
        if fault:
            return fault
        body, bad = await self._body(request)
        if bad or body is None:
            self.stats["submit_400"] += 1
            return bad or self._error(400, 3, "bad request")
        key = request.headers.get("Idempotency-Key")
        if self.config.dedupe and key and key in self.by_idem:
            self.stats["deduplicated"] += 1
            return web.json_response(self._op_json(self.ops[self.by_idem[key]]))
        self.stats["submits"] += 1
        self.submits_per_body[body_key(body)] += 1
        self.messages_seen.append(len(body["messages"]))
        self.idem_keys.append(key or "")
        now = time.monotonic()
        c = self.config
        op = Op(f"d7q{uuid.uuid4().hex[:17]}", body, now, now + self._latency(body))
        roll = self.rng.random()
        if roll < c.op_error_rate:
            op.error = {"code": 3, "message": "injected: generation failed", "details": []}
        elif roll < c.op_error_rate + c.op_error_running_rate:
            op.error = {"code": 13, "message": "injected: internal error", "details": []}
            op.error_while_running = True
        elif roll < c.op_error_rate + c.op_error_running_rate + c.never_finish_rate:
            op.never = True
        elif (
            roll
            < c.op_error_rate + c.op_error_running_rate + c.never_finish_rate + c.op_expire_rate
        ):
            op.expired = True
        self.ops[op.id] = op
        if key:
            self.by_idem[key] = op.id
        return web.json_response(self._op_json(op))

    def _op_json(self, op: Op) -> dict[str, Any]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data: dict[str, Any] = {
            "id": op.id,
            "description": "Async GPT Completion",
            "createdAt": stamp,
            "createdBy": "emulator",
            "modifiedAt": stamp,
            "metadata": None,
        }
        now = time.monotonic()
        if op.error and (op.error_while_running or now >= op.ready_at):
            data["done"] = not op.error_while_running
            data["error"] = op.error
        elif op.cancelled:
            data["done"] = True
            data["error"] = {"code": 1, "message": "operation cancelled", "details": []}
        elif op.never or now < op.ready_at:
            if int(op.id[-1], 16) % 2:  # absent and false are both legal "running" forms
                data["done"] = False
        else:
            data["done"] = True
            data["response"] = {
                "@type": "type.googleapis.com/yandex.cloud.ai.foundation_models.v1.CompletionResponse",
                **self._response(op.body),
            }
        return data

    async def operation(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        op_id = request.match_info["op"]
        cancel = op_id.endswith(":cancel")
        op_id = op_id.removesuffix(":cancel")
        denied = self._auth(request) or (None if cancel else self._quota("poll"))
        if denied:
            return denied
        if not cancel:
            fault = await self._fault("poll", request)
            if fault:
                return fault
        op = self.ops.get(op_id)
        c = self.config
        now = time.monotonic()
        if (
            op is None
            or (op.expired and now >= op.ready_at)
            or (c.expire_after is not None and now > op.ready_at + c.expire_after)
        ):
            self.stats["poll_404"] += 1
            return self._error(404, 5, f"Operation {op_id} not found")
        if cancel:
            self.stats["cancels"] += 1
            if time.monotonic() < op.ready_at and not op.error:
                op.cancelled = True
            return web.json_response(self._op_json(op))
        self.stats["polls"] += 1
        data = self._op_json(op)
        if data.get("done"):
            self.stats["polls_done"] += 1
        return web.json_response(data)

    async def complete(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        denied = self._auth(request) or self._quota("complete")
        if denied:
            return denied
        if self.sync_inflight >= self.config.max_concurrent_sync:
            self.stats["complete_429"] += 1
            return self._error(429, 8, "too many concurrent generations")
        fault = await self._fault("complete", request)
        if fault:
            return fault
        body, bad = await self._body(request)
        if bad or body is None:
            return bad or self._error(400, 3, "bad request")
        self.stats["completions"] += 1
        self.submits_per_body[body_key(body)] += 1
        self.messages_seen.append(len(body["messages"]))
        self.sync_inflight += 1
        self.stats["max_sync_inflight"] = max(self.stats["max_sync_inflight"], self.sync_inflight)
        try:
            await anyio.sleep(self._latency(body))
        finally:
            self.sync_inflight -= 1
        return web.json_response({"result": self._response(body)})

    async def report(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                **self.stats,
                "submits_per_body": dict(self.submits_per_body),
                "messages_seen": self.messages_seen,
            }
        )


def parse_latency(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(":")
    low = float(lo)
    high = float(hi) if hi else low
    if low < 0 or high < low:
        raise ValueError("latency must be MIN:MAX with 0 <= MIN <= MAX")
    return low, high


def parse_lognormal(text: str) -> tuple[float, float]:
    """``MEDIAN:SIGMA`` of a log-normal latency, in seconds."""
    median, _, sigma = text.partition(":")
    m, sd = float(median), float(sigma or 0.5)
    if m <= 0 or sd < 0:
        raise ValueError("lognormal must be MEDIAN:SIGMA with MEDIAN > 0 and SIGMA >= 0")
    return m, sd


def parse_fault(text: str) -> tuple[str, float]:
    """``submit:503=0.1`` -> ("submit:503", 0.1)."""
    key, _, rate = text.partition("=")
    endpoint, _, name = key.partition(":")
    if endpoint not in ENDPOINTS or name not in FAULTS:
        raise ValueError(
            f"unknown fault {key!r}: use ENDPOINT:FAULT=RATE with ENDPOINT in {', '.join(ENDPOINTS)} "
            f"and FAULT in {', '.join(FAULTS)}"
        )
    value = float(rate)
    if not 0 <= value <= 1:
        raise ValueError("fault rate must be between 0 and 1")
    return key, value


async def serve(emulator: Emulator, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Start the server; returns the runner (to clean up) and its base URL (port 0 picks one)."""
    runner = web.AppRunner(emulator.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, f"http://{host}:{bound}"
