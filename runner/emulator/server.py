"""The HTTP handlers: the API endpoints of the contract, and the emulator's own control endpoints.

``Emulator`` owns all state (operations, quotas, counters) and builds the aiohttp application;
each handler runs its checks in the order the real service would meet them: credentials and
folder (401/403), quota (429), injected faults, then the body (400: shape, model, folder of the
model), poisoned prompts (500), and only then the work. Outages sit in front of all of it as a
middleware that leaves the ``/emulator/*`` endpoints alone, so a test can always read the stats
or start an outage. Operation times are wall clock (they may come from a previous run through
the state file); quotas and outages use the monotonic clock from when serving began.

What an emulator decides for a request is reproducible: the latency is a fixed draw from the
request body (``latency_of``), and every random choice comes from one seeded generator. Faults
and fates are rolled in the same order as they always were, so a seed keeps meaning what it
meant to existing tests as new switches are added (a switch that is off consumes no randomness).
"""

from __future__ import annotations

import collections
import hashlib
import math
import random
import statistics
import time
import uuid
from typing import Any

import anyio
from aiohttp import web
from aiohttp.typedefs import Handler

from runner.emulator import wire
from runner.emulator.config import Config, Outage
from runner.emulator.gate import Gate
from runner.emulator.measure import Measurements
from runner.emulator.outages import Listener, OutageSchedule, RefuseDriver
from runner.emulator.state import Op, StateFile

_OP_ERROR_MESSAGES = {3: "injected: generation failed", 13: "injected: internal error"}


class Emulator:
    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        c = self.config
        self.rng = random.Random(c.seed)
        self._salt = c.seed if c.seed is not None else self.rng.random()
        self.stats: collections.Counter[str] = collections.Counter()
        self.submits_per_body: collections.Counter[str] = collections.Counter()
        self.messages_seen: list[int] = []
        self.idem_keys: list[str] = []  # Idempotency-Key of every accepted submit, in order
        self.sync_inflight = 0
        self.state = StateFile(c.state_file) if c.state_file else None
        self.ops: dict[str, Op] = self.state.load() if self.state else {}
        self.by_idem = {op.idem: op.id for op in self.ops.values() if op.idem}
        if self.state:
            self.stats["state_ops_loaded"] = len(self.ops)
            if self.state.skipped:
                self.stats["state_lines_skipped"] = self.state.skipped
        self.gate = Gate(c, self.rng, self.stats)
        self.schedule = OutageSchedule(c.outages)
        self.listener: Listener | None = None
        self._driver: RefuseDriver | None = None
        self._begin()

    def _begin(self) -> None:
        """Serving begins now: outage windows, fixed quota windows and measurements start here."""
        self.started_wall = time.time()
        self.started_mono = time.monotonic()
        self.measure = Measurements(self.started_wall, self.started_mono)
        self.gate.reset_quotas(self.started_mono)

    def elapsed(self) -> float:
        """Seconds since the emulator began serving (monotonic)."""
        return time.monotonic() - self.started_mono

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=[self._outage])
        app.router.add_post("/foundationModels/v1/completionAsync", self.submit)
        app.router.add_post("/foundationModels/v1/completion", self.complete)
        app.router.add_post("/foundationModels/v1/tokenize", self.tokenize)
        app.router.add_post("/foundationModels/v1/tokenizeCompletion", self.tokenize_completion)
        app.router.add_get("/operations/{op}", self.operation)
        app.router.add_post("/operations/{op}", self.operation)
        app.router.add_get("/emulator/stats", self.report)
        app.router.add_post("/emulator/outage", self.start_outage)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    # -- lifecycle --------------------------------------------------------------------

    def attach(self, listener: Listener) -> None:
        """Hand over the listening socket (``serve()`` does), which ``refuse`` outages need."""
        self.listener = listener

    async def _on_startup(self, app: web.Application) -> None:
        if self.listener is None and any(o.kind == "refuse" for o in self.config.outages):
            raise RuntimeError("'refuse' outages need the socket: start the emulator with serve()")
        self._begin()

    def start_refusals(self) -> None:
        """Start closing the socket during ``refuse`` windows (once it is listening)."""
        if self.listener is not None and self._driver is None:
            self._driver = RefuseDriver(self.schedule, self.listener, self.elapsed, self.stats)
            self._driver.start()

    async def stop_refusals(self) -> None:
        if self._driver is not None:
            await self._driver.stop()
            self._driver = None

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.stop_refusals()
        if self.state:
            self.state.close()

    # -- helpers ----------------------------------------------------------------------

    def latency_of(self, body: dict[str, Any]) -> float:
        """A request's latency: a fixed draw for this request body and this emulator.

        Derived from the body rather than from a shared generator, so that every client sees
        the same latency for the same job, whatever else (429s, faults) it made the emulator
        do first: a benchmark then compares clients on equal terms, and can compute each job's
        latency offline with this method.
        """
        c = self.config
        digest = hashlib.sha256(f"{self._salt}:{wire.body_key(body)}".encode()).digest()
        u = (int.from_bytes(digest[:8], "big") + 0.5) / 2**64
        if c.lognormal:
            median, sigma = c.lognormal
            latency = median * math.exp(sigma * statistics.NormalDist().inv_cdf(u))
        else:
            lo, hi = c.latency
            latency = lo + u * (hi - lo)
        return latency if c.latency_cap is None else min(latency, c.latency_cap)

    _latency = latency_of  # the name tests/test_units.py knew it by before it was public

    def _new_op(self, body: dict[str, Any], key: str | None) -> Op:
        now = time.time()
        c = self.config
        op = Op(f"d7q{uuid.uuid4().hex[:17]}", body, now, now + self.latency_of(body), idem=key)
        roll = self.rng.random()
        if roll < c.op_error_rate:
            message = _OP_ERROR_MESSAGES.get(
                c.op_error_code, f"injected: {wire.GRPC_NAMES.get(c.op_error_code, 'error')}"
            )
            op.error = {"code": c.op_error_code, "message": message, "details": []}
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
        return op

    def _op_json(self, op: Op, now: float) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": op.id,
            "description": "Async GPT Completion",
            "createdAt": _stamp(op.created),
            "createdBy": "emulator",
            "modifiedAt": _stamp(min(now, op.ready_at)),
            "metadata": None,
        }
        if op.cancelled:
            data["done"] = True
            data["error"] = {"code": 1, "message": "operation cancelled", "details": []}
        elif op.error and (op.error_while_running or now >= op.ready_at):
            data["done"] = not op.error_while_running
            data["error"] = op.error
        elif op.never or now < op.ready_at:
            if int(op.id[-1], 16) % 2:  # absent and false are both legal "running" forms
                data["done"] = False
        else:
            data["done"] = True
            data["response"] = {"@type": wire.RESPONSE_TYPE, **wire.completion_response(op.body)}
        return data

    def _gone(self, op: Op | None, now: float) -> bool:
        c = self.config
        return (
            op is None
            or (op.expired and now >= op.ready_at)
            or (c.expire_after is not None and now > op.ready_at + c.expire_after)
        )

    # -- API handlers -----------------------------------------------------------------

    async def submit(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        denied = self.gate.auth(request) or self.gate.quota("submit")
        if denied:
            return denied
        fault = await self.gate.fault("submit", request)
        if fault:
            return fault
        body, bad = await self.gate.completion_body(request)
        if bad or body is None:
            self.stats["submit_400"] += 1
            return bad or self.gate.error(400, 3, "bad request")
        poisoned = self.gate.poisoned(body)
        if poisoned:
            return poisoned
        key = request.headers.get("Idempotency-Key")
        if self.config.dedupe and key and key in self.by_idem:
            self.stats["deduplicated"] += 1
            return web.json_response(self._op_json(self.ops[self.by_idem[key]], time.time()))
        op = self._new_op(body, key)
        if self.state:
            try:
                self.state.append_op(op)  # on disk before the client can learn the id
            except OSError as e:
                self.stats["state_write_errors"] += 1
                return self.gate.error(500, 13, f"Internal error: state file: {e.strerror}")
        self.ops[op.id] = op
        if key:
            self.by_idem[key] = op.id
        self.stats["submits"] += 1
        self.submits_per_body[wire.body_key(body)] += 1
        self.messages_seen.append(len(body["messages"]))
        self.idem_keys.append(key or "")
        self.measure.submitted(op.created)
        return web.json_response(self._op_json(op, op.created))

    async def operation(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        op_id = request.match_info["op"]
        cancel = op_id.endswith(":cancel")
        op_id = op_id.removesuffix(":cancel")
        if not cancel:
            self.measure.polled(time.monotonic())
        denied = self.gate.auth(request) or (None if cancel else self.gate.quota("poll"))
        if denied:
            return denied
        if not cancel:
            fault = await self.gate.fault("poll", request)
            if fault:
                return fault
        op = self.ops.get(op_id)
        now = time.time()
        if op is None or self._gone(op, now):
            self.stats["poll_404"] += 1
            return self.gate.error(404, 5, f"Operation {op_id} not found")
        if cancel:
            return self._cancel(op, now)
        self.stats["polls"] += 1
        data = self._op_json(op, now)
        if data.get("done"):
            self.stats["polls_done"] += 1
            self.measure.seen_done(op, now)
        return web.json_response(data)

    def _cancel(self, op: Op, now: float) -> web.Response:
        self.stats["cancels"] += 1
        if op.finished(now):
            self.stats["cancels_of_finished"] += 1
        elif self.config.cancel_mode == "refuse":
            self.stats["cancels_refused"] += 1
            return self.gate.error(400, 9, "operation is not cancellable")
        elif self.config.cancel_mode == "allow":
            if self.state:
                self.state.append_cancel(op.id, now)
            op.cancelled = True
            self.stats["cancelled"] += 1
        return web.json_response(self._op_json(op, now))

    async def complete(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        denied = self.gate.auth(request) or self.gate.quota("complete")
        if denied:
            return denied
        if self.sync_inflight >= self.config.max_concurrent_sync:
            self.stats["complete_429"] += 1
            return self.gate.error(429, 8, "too many concurrent generations")
        fault = await self.gate.fault("complete", request)
        if fault:
            return fault
        body, bad = await self.gate.completion_body(request)
        if bad or body is None:
            return bad or self.gate.error(400, 3, "bad request")
        poisoned = self.gate.poisoned(body)
        if poisoned:
            return poisoned
        self.stats["completions"] += 1
        self.submits_per_body[wire.body_key(body)] += 1
        self.messages_seen.append(len(body["messages"]))
        self.sync_inflight += 1
        self.stats["max_sync_inflight"] = max(self.stats["max_sync_inflight"], self.sync_inflight)
        try:
            await anyio.sleep(self.latency_of(body))
        finally:
            self.sync_inflight -= 1
        return web.json_response({"result": wire.completion_response(body)})

    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        """``{"modelUri", "text"}`` -> the text's tokens; never billed, never an operation."""
        self.stats["requests"] += 1
        denied = self.gate.auth(request) or self.gate.quota("tokenize")
        if denied:
            return denied
        fault = await self.gate.fault("tokenize", request)
        if fault:
            return fault
        body, bad = await self.gate.json(request)
        if bad:
            return bad
        problem = None
        if not isinstance(body, dict) or not isinstance(body.get("modelUri"), str):
            problem = "modelUri: invalid model uri"
        elif not isinstance(body.get("text"), str):
            problem = "text: must be a string"
        problem = problem or self.gate.check_model(body["modelUri"], request)
        if problem:
            return self.gate.error(400, 3, problem)
        self.stats["tokenize"] += 1
        return web.json_response(
            {"tokens": wire.tokenize(body["text"]), "modelVersion": wire.MODEL_VERSION}
        )

    async def tokenize_completion(self, request: web.Request) -> web.StreamResponse:
        """A completion request body -> the tokens its messages count as ``inputTextTokens``."""
        self.stats["requests"] += 1
        denied = self.gate.auth(request) or self.gate.quota("tokenize")
        if denied:
            return denied
        fault = await self.gate.fault("tokenize", request)
        if fault:
            return fault
        body, bad = await self.gate.completion_body(request)
        if bad or body is None:
            return bad or self.gate.error(400, 3, "bad request")
        self.stats["tokenize"] += 1
        tokens = [t for text in wire.message_texts(body) for t in wire.tokenize(text)]
        return web.json_response({"tokens": tokens, "modelVersion": wire.MODEL_VERSION})

    # -- outages and control endpoints ------------------------------------------------

    @web.middleware
    async def _outage(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/emulator/"):
            return await handler(request)
        kind = self.schedule.active(self.elapsed())
        if kind not in ("503", "reset"):
            return await handler(request)
        self.stats["requests"] += 1
        self.stats["outage_requests"] += 1
        self.stats[f"outage_{kind}"] += 1
        if kind == "503":
            return self.gate.error(503, 14, "service unavailable: outage")
        if request.transport is not None:
            request.transport.abort()  # no answer at all
        return web.Response(status=503)

    async def start_outage(self, request: web.Request) -> web.StreamResponse:
        """``POST /emulator/outage {"length": s, "kind": "503"}``: an outage starting now."""
        body, bad = await self.gate.json(request)
        if bad:
            return bad
        try:
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            outage = Outage(self.elapsed(), float(body["length"]), str(body.get("kind", "503")))
        except (KeyError, TypeError, ValueError) as e:
            return web.json_response({"code": 3, "message": f"outage: {e}"}, status=400)
        if outage.kind == "refuse" and self._driver is None:
            message = "'refuse' outages need the socket: start the emulator with serve()"
            return web.json_response({"code": 9, "message": message}, status=409)
        self.schedule.add(outage)
        if self._driver is not None and outage.kind == "refuse":
            self._driver.poke()
        return web.json_response(
            {"start": outage.start, "length": outage.length, "kind": outage.kind}
        )

    async def report(self, request: web.Request) -> web.Response:
        data: dict[str, Any] = {
            **self.stats,
            "submits_per_body": dict(self.submits_per_body),
            "messages_seen": self.messages_seen,
            **self.measure.summary(),
        }
        if request.query.get("detail") in ("1", "true", "yes"):
            data.update(self.measure.detail(self.ops.values()))
            data["submit_429_times"] = [t - self.started_mono for t in self.gate.refused_submits]
        return web.json_response(data)


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
