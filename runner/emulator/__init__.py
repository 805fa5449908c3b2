"""A local stand-in for the AI Studio text generation API, as a real aiohttp server.

It follows the wire contract (``docs/api.md``): completionAsync returns an
Operation; ``GET /operations/{id}`` answers without ``done`` or with ``done: false`` while running,
then with the response, int64 token counts as strings; cancel answers by long-running-operation
semantics; the tokenizer counts exactly what a generation reports as ``inputTextTokens``; errors
come in both documented body shapes. Answers are derived from the request alone (``answer_for``)
so a test can check that every result belongs to its job, and each request body has a fixed
latency (``Emulator.latency_of``) so every client meets the same work. The package is split by
concern: ``config`` (the switches), ``quotas`` (three window shapes), ``wire`` (bodies and
tokens), ``gate`` (the checks every request passes), ``server`` (handlers), ``state`` (operations
and their file), ``outages``, ``measure`` (benchmark measurements), ``serving`` and ``cli``.

Its switches are what tests and benchmarks turn, all fields of ``Config``: latency (uniform or
log-normal, capped), quotas per second and per hour (rolling, token-bucket or fixed windows)
answered with 429, faults injected at a rate per endpoint (5xx, reset, hang, non-JSON, truncated
or wrong-shaped bodies), operations that fail, expire or never finish, outage windows (503,
reset, refused connections), poisoned prompts, model and folder checks, cancel modes, and a
state file that keeps operations across restarts. ``GET /emulator/stats`` reports what it saw
(submits per request body, which is how the kill-loop test counts duplicate charges, notice lag
and poll peaks for benchmarks); ``POST /emulator/outage`` starts an outage now.
"""

from __future__ import annotations

from runner.emulator.config import (
    CANCEL_MODES,
    ENDPOINTS,
    FAULTS,
    HOUR_SHAPES,
    OUTAGE_KINDS,
    Config,
    Outage,
    parse_fault,
    parse_latency,
    parse_lognormal,
    parse_lognormal_capped,
    parse_outage,
)
from runner.emulator.quotas import FixedWindow, Quota, RollingWindow, TokenBucket
from runner.emulator.server import Emulator
from runner.emulator.serving import serve
from runner.emulator.state import Op
from runner.emulator.wire import answer_for, body_key, count_tokens, tokenize

Window = RollingWindow  # the name the rolling window had before the package

__all__ = [
    "CANCEL_MODES",
    "ENDPOINTS",
    "FAULTS",
    "HOUR_SHAPES",
    "OUTAGE_KINDS",
    "Config",
    "Emulator",
    "FixedWindow",
    "Op",
    "Outage",
    "Quota",
    "RollingWindow",
    "TokenBucket",
    "Window",
    "answer_for",
    "body_key",
    "count_tokens",
    "parse_fault",
    "parse_latency",
    "parse_lognormal",
    "parse_lognormal_capped",
    "parse_outage",
    "serve",
    "tokenize",
]
