"""The checks every API request passes, and the answers they give when it fails them.

``Gate`` holds what the checks need (the config, the seeded generator, the counters and the
quotas) and nothing about operations, so the handlers in ``server.py`` read as the sequence the
real service follows: ``auth`` (401 UNAUTHENTICATED, 403 PERMISSION_DENIED for a foreign folder),
``quota`` (429 RESOURCE_EXHAUSTED, ``Retry-After`` only when configured), ``fault`` (injected
failures at a configured rate per endpoint), ``completion_body`` (400 INVALID_ARGUMENT for a
malformed body, an unknown model or a model URI of another folder) and ``poisoned`` (500 INTERNAL
for prompts carrying the poison marker, every time).

Every error body comes from ``error``, which tosses the seeded coin between the two documented
shapes; faults are rolled in the fixed order of ``FAULTS``, consuming randomness only for the
faults that are switched on.
"""

from __future__ import annotations

import collections
import random
import time
from typing import Any

import anyio
from aiohttp import web

from runner.emulator import wire
from runner.emulator.config import FAULTS, Config
from runner.emulator.quotas import Quota, RollingWindow, hourly

_STATUS_CODE = {500: 13, 503: 14, 504: 4, 429: 8, 400: 3, 401: 16, 403: 7}


class Gate:
    def __init__(self, config: Config, rng: random.Random, stats: collections.Counter[str]) -> None:
        self.config = config
        self.rng = rng
        self.stats = stats
        self.quotas: dict[str, list[Quota]] = {}
        self.refused_submits: list[float] = []  # monotonic times of submits answered 429
        self.reset_quotas(time.monotonic())

    def reset_quotas(self, origin: float) -> None:
        """Fresh quotas; ``origin`` (monotonic) is when serving began, for fixed windows."""
        c = self.config
        self.quotas = {"submit": [], "poll": [], "complete": [], "tokenize": []}
        if c.submit_rps:
            self.quotas["submit"].append(RollingWindow(c.submit_rps, 1.0))
        if c.submit_per_hour:
            self.quotas["submit"].append(
                hourly(c.hour_shape, c.submit_per_hour, c.hour_seconds, origin)
            )
        if c.poll_rps:
            self.quotas["poll"].append(RollingWindow(c.poll_rps, 1.0))
        if c.tokenize_rps:
            self.quotas["tokenize"].append(RollingWindow(c.tokenize_rps, 1.0))

    def error(self, status: int, code: int, message: str, **headers: str) -> web.Response:
        # both documented shapes, chosen by a coin so clients must parse both
        gateway = self.rng.random() >= 0.5
        payload = wire.error_payload(status, code, message, gateway)
        return web.json_response(payload, status=status, headers=headers)

    def quota(self, endpoint: str) -> web.Response | None:
        now = time.monotonic()
        for w in self.quotas[endpoint]:
            if not w.admit(now):
                self.stats[f"{endpoint}_429"] += 1
                if endpoint == "submit":
                    self.refused_submits.append(now)
                headers = {}
                if self.config.retry_after is not None:
                    headers["Retry-After"] = str(self.config.retry_after)
                per = "Hour" if w.span > 1 else "Second"
                return self.error(
                    429, 8,
                    f"ai.textGeneration{endpoint.title()}RequestsPer{per}.rate rate quota limit "
                    f"exceed: allowed {int(w.limit)} requests",
                    **headers,
                )  # fmt: skip
        return None

    async def fault(self, endpoint: str, request: web.Request) -> web.StreamResponse | None:
        for name in FAULTS:
            rate = self.config.faults.get(f"{endpoint}:{name}", 0.0)
            if rate and self.rng.random() < rate:
                self.stats[f"fault_{endpoint}_{name}"] += 1
                return await self.inject(endpoint, name, request)
        return None

    async def inject(self, endpoint: str, name: str, request: web.Request) -> web.StreamResponse:
        if name.isdigit():
            status = int(name)
            headers = {}
            if status == 429 and self.config.retry_after is not None:
                headers["Retry-After"] = str(self.config.retry_after)
            return self.error(status, _STATUS_CODE[status], f"injected {status}", **headers)
        if name == "hang":
            await anyio.sleep(self.config.hang_seconds)
            return web.json_response({"code": 4, "message": "late"}, status=504)
        if name == "garbage":
            return web.Response(text="<html>upstream hiccup</html>", content_type="text/html")
        if name == "shape":
            return web.json_response(_wrong_shape(endpoint, request))
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = 4096
        await resp.prepare(request)
        if name == "truncated":
            await resp.write(b'{"id": "trunc')
        if request.transport is not None:
            request.transport.abort()  # "reset": the connection dies mid-response
        return resp

    def auth(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        scheme, _, secret = auth.partition(" ")
        if scheme not in ("Api-Key", "Bearer") or not secret:
            return self.error(401, 16, "Unauthenticated: missing or malformed Authorization")
        if scheme == "Bearer" and secret in self.config.reject_tokens:
            self.stats["rejected_tokens"] += 1
            return self.error(401, 16, "Token is invalid or has expired.")
        # an API key belongs to a service account, whose own folder is used; a user's IAM
        # token must name the folder (docs/api.md, "Authentication")
        folder = request.headers.get("x-folder-id")
        if not folder and scheme == "Bearer":
            return self.error(401, 16, "x-folder-id header is required with an IAM token")
        if folder and self.config.folder is not None and folder != self.config.folder:
            self.stats["folder_403"] += 1
            return self.error(403, 7, f"Permission denied to folder {folder}")
        return None

    def check_model(self, uri: str, request: web.Request) -> str | None:
        """What is wrong with the model URI for this service and folder, or None."""
        parsed = wire.parse_model_uri(uri)
        if parsed is None:
            return "modelUri: invalid model uri"
        folder, model = parsed
        c = self.config
        if c.known_models is not None and model not in c.known_models:
            return f"model {model} not found"
        account = request.headers.get("x-folder-id") or c.folder
        if c.folder is not None and folder != account:
            return f"Specified folder ID {folder} does not match with service account"
        return None

    async def json(self, request: web.Request) -> tuple[Any, web.Response | None]:
        try:
            return await request.json(), None
        except ValueError:
            return None, self.error(400, 3, "request body is not valid JSON")

    async def completion_body(
        self, request: web.Request
    ) -> tuple[dict[str, Any] | None, web.Response | None]:
        """The completion request body, or the 400 answer to it."""
        body, bad = await self.json(request)
        if bad:
            return None, bad
        problem = wire.validate(body) or self.check_model(body["modelUri"], request)
        if problem:
            return None, self.error(400, 3, problem)
        return body, None

    def poisoned(self, body: dict[str, Any]) -> web.Response | None:
        marker = self.config.poison_marker
        if marker and any(marker in t for t in wire.message_texts(body)):
            self.stats["poison_500"] += 1
            return self.error(500, 13, "Internal error")
        return None


def _wrong_shape(endpoint: str, request: web.Request) -> dict[str, Any]:
    """Valid JSON of the wrong shape, answered with HTTP 200 (the ``shape`` fault)."""
    if endpoint == "submit":
        return {"id": 12345}
    if endpoint == "poll":
        op_id = request.match_info.get("op", "").removesuffix(":cancel")
        return {"id": op_id, "done": True, "response": {"@type": wire.RESPONSE_TYPE,
                                                        "alternatives": ["oops"]}}  # fmt: skip
    return {"result": {"alternatives": [{"message": "hi"}]}}
