"""Estimated cost: one small price table, overridable, always labelled an estimate.

Prices are per 1,000 tokens (prompt and completion billed alike) for asynchronous mode, in
roubles, as published in Yandex AI Studio's price list in 2025; synchronous mode costs twice
as much. They change: check the current list and override with ``--price MODEL=PER_1K``. A
model missing from the table is reported without a cost rather than guessed.
"""

from __future__ import annotations

CURRENCY = "RUB"

ASYNC_PRICE_PER_1K: dict[str, float] = {
    "yandexgpt-lite": 0.10,
    "yandexgpt": 0.60,
    "yandexgpt-32k": 0.60,
    "llama-lite": 0.10,
    "llama": 0.60,
}
SYNC_FACTOR = 2.0


def model_name(uri: str) -> str:
    """``gpt://<folder>/yandexgpt-lite/latest`` -> ``yandexgpt-lite``; a name stays a name."""
    if "://" not in uri:
        return uri
    parts = uri.split("://", 1)[1].split("/")
    return parts[1].split("@")[0] if len(parts) > 1 else parts[0]


def parse_prices(overrides: tuple[str, ...] | list[str]) -> dict[str, float]:
    prices = dict(ASYNC_PRICE_PER_1K)
    for item in overrides:
        name, sep, value = item.partition("=")
        try:
            price = float(value)
        except ValueError:
            price = -1.0
        if not sep or not name or price < 0:
            raise ValueError(f"--price {item!r}: use MODEL=PRICE_PER_1K_TOKENS, e.g. yandexgpt=0.6")
        prices[name] = price
    return prices


def estimate(
    tokens_by_model: dict[str, int], prices: dict[str, float], mode: str = "async"
) -> dict[str, object]:
    """Cost by model and in total; models without a price are listed as unpriced."""
    factor = SYNC_FACTOR if mode == "sync" else 1.0
    by_model: dict[str, float] = {}
    unpriced: list[str] = []
    for uri, tokens in sorted(tokens_by_model.items()):
        name = model_name(uri)
        if name in prices:
            by_model[name] = by_model.get(name, 0.0) + tokens / 1000 * prices[name] * factor
        elif tokens:
            unpriced.append(name)
    return {
        "estimate": True,
        "currency": CURRENCY,
        "total": round(sum(by_model.values()), 4),
        "byModel": {k: round(v, 4) for k, v in by_model.items()},
        "unpriced": sorted(set(unpriced)),
    }
