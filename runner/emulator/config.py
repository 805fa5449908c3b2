"""The emulator's switches: one ``Config`` dataclass, the ``Outage`` window, and text parsers.

Everything a test or benchmark can turn is a plain field of ``Config`` with a default that
behaves like the real service on a good day (no quotas, no faults, any folder and model), so
``Config()`` is a working emulator and each test states only what it changes. The parsers turn
the CLI's compact ``A:B[:C]`` spellings into those fields and raise ``ValueError`` with a
message fit for the user; the CLI wraps that into ``click.BadParameter``.

The names in ``FAULTS``, ``ENDPOINTS``, ``OUTAGE_KINDS``, ``HOUR_SHAPES`` and ``CANCEL_MODES``
are the whole vocabulary: ``Config.__post_init__`` rejects anything else among the enumerated
switches, so a typo in a test fails at once instead of silently emulating nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FAULTS = (
    "500", "503", "504", "429", "400", "401", "403",
    "reset", "hang", "garbage", "truncated", "shape",
)  # fmt: skip
ENDPOINTS = ("submit", "poll", "complete", "tokenize")
OUTAGE_KINDS = ("503", "reset", "refuse")
HOUR_SHAPES = ("rolling", "bucket", "fixed")
CANCEL_MODES = ("allow", "refuse", "ignore")


@dataclass(frozen=True)
class Outage:
    """A window in which the service is down, ``start`` seconds after the emulator began serving.

    ``kind``: ``"503"`` answers every API request with 503 UNAVAILABLE; ``"reset"`` aborts the
    connection without an answer; ``"refuse"`` closes the listening socket (new connections are
    refused, open ones closed) and listens again on the same port when the window ends. A
    ``"refuse"`` window needs the socket, so it only works for an emulator started by ``serve()``.
    """

    start: float
    length: float
    kind: str = "503"

    def __post_init__(self) -> None:
        if self.kind not in OUTAGE_KINDS:
            raise ValueError(f"outage kind must be one of {', '.join(OUTAGE_KINDS)}")
        if self.length <= 0 or self.start < 0:
            raise ValueError("outage needs START >= 0 and LENGTH > 0")

    @property
    def end(self) -> float:
        return self.start + self.length

    def covers(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass
class Config:
    latency: tuple[float, float] = (0.05, 0.2)
    lognormal: tuple[float, float] | None = None  # (median seconds, sigma)
    latency_cap: float | None = None  # latencies above this are clipped to it
    submit_rps: float | None = None
    submit_per_hour: int | None = None
    hour_seconds: float = 3600.0  # the "hour" of the hourly quota; shorter in compressed time
    hour_shape: str = "rolling"  # rolling | bucket | fixed: the shape of the hourly window
    poll_rps: float | None = None
    tokenize_rps: float | None = None
    max_concurrent_sync: int = 10
    retry_after: float | None = None  # seconds to send with 429s; None: no header
    faults: dict[str, float] = field(default_factory=dict)  # "submit:503" -> rate
    op_error_rate: float = 0.0  # operation finishes with an error (code op_error_code)
    op_error_code: int = 3
    op_error_running_rate: float = 0.0  # error (code 13) while done is still false
    never_finish_rate: float = 0.0
    expire_after: float | None = None  # seconds after finishing that a poll gives 404
    op_expire_rate: float = 0.0  # operations that are gone (404) once finished
    hang_seconds: float = 30.0
    dedupe: bool = False  # honour Idempotency-Key
    reject_tokens: frozenset[str] = frozenset()  # bearer tokens answered with 401
    seed: int | None = None
    outages: tuple[Outage, ...] = ()
    poison_marker: str | None = None  # prompts containing this always get 500 INTERNAL
    known_models: frozenset[str] | None = None  # None: any model name is served
    folder: str | None = None  # None: any x-folder-id is accepted
    cancel_mode: str = "allow"  # allow | refuse | ignore
    state_file: str | None = None  # JSON lines of operations, kept across restarts

    def __post_init__(self) -> None:
        if self.hour_shape not in HOUR_SHAPES:
            raise ValueError(f"hour_shape must be one of {', '.join(HOUR_SHAPES)}")
        if self.cancel_mode not in CANCEL_MODES:
            raise ValueError(f"cancel_mode must be one of {', '.join(CANCEL_MODES)}")
        if self.latency_cap is not None and self.latency_cap < 0:
            raise ValueError("latency_cap must not be negative")
        self.outages = tuple(self.outages)
        if self.known_models is not None:
            self.known_models = frozenset(self.known_models)


def parse_latency(text: str) -> tuple[float, float]:
    """``MIN:MAX`` (or one number) of a uniform latency, in seconds."""
    lo, _, hi = text.partition(":")
    low = float(lo)
    high = float(hi) if hi else low
    if low < 0 or high < low:
        raise ValueError("latency must be MIN:MAX with 0 <= MIN <= MAX")
    return low, high


def parse_lognormal_capped(text: str) -> tuple[float, float, float | None]:
    """``MEDIAN:SIGMA[:CAP]`` of a log-normal latency, in seconds; SIGMA defaults to 0.5."""
    parts = text.split(":")
    if len(parts) > 3:
        raise ValueError("lognormal must be MEDIAN:SIGMA[:CAP]")
    try:
        median = float(parts[0])
        sigma = float(parts[1]) if len(parts) > 1 and parts[1] else 0.5
        cap = float(parts[2]) if len(parts) > 2 and parts[2] else None
    except ValueError:
        raise ValueError("lognormal must be MEDIAN:SIGMA[:CAP], numbers in seconds") from None
    if median <= 0 or sigma < 0 or (cap is not None and cap <= 0):
        raise ValueError("lognormal must be MEDIAN:SIGMA[:CAP] with MEDIAN, CAP > 0, SIGMA >= 0")
    return median, sigma, cap


def parse_lognormal(text: str) -> tuple[float, float]:
    """``MEDIAN:SIGMA`` of a log-normal latency; use ``parse_lognormal_capped`` for a CAP."""
    median, sigma, cap = parse_lognormal_capped(text)
    if cap is not None:
        raise ValueError("a CAP here would be lost: parse with parse_lognormal_capped")
    return median, sigma


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


def parse_outage(text: str) -> Outage:
    """``START:LENGTH[:KIND]`` -> Outage (seconds after serving began; KIND defaults to 503)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError("outage must be START:LENGTH[:KIND]")
    try:
        start, length = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(
            "outage must be START:LENGTH[:KIND], START and LENGTH in seconds"
        ) from None
    return Outage(start, length, parts[2] if len(parts) == 3 else "503")
