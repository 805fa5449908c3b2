"""Models runner knows about, and estimated cost: always labelled an estimate.

Prices are roubles per 1,000 tokens (prompt and completion alike) in asynchronous mode, from
Yandex AI Studio's 2025 price list; synchronous mode costs twice as much. They change and could
not be checked from the machines runner was built on: override them with ``--price MODEL=PER_1K``.
A model without a price (Alice AI LLM prices input and output differently) is reported as
unpriced, never guessed.

The model list only informs warnings: the server decides what exists. Asynchronous mode exists
only for Yandex's own models, so an open-weight name in async mode is warned about before
anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

CURRENCY = "RUB"
SYNC_FACTOR = 2.0


@dataclass(frozen=True)
class Model:
    yandex: bool  # Yandex's own model: async mode exists for it
    price: float | None  # async, per 1,000 tokens


MODELS = {
    "yandexgpt-lite": Model(True, 0.10),
    "yandexgpt": Model(True, 0.60),
    "yandexgpt-32k": Model(True, 0.60),
    "aliceai-llm": Model(True, None),
    "llama-lite": Model(False, 0.10),
    "llama": Model(False, 0.60),
}
ASYNC_PRICE_PER_1K: dict[str, float] = {
    name: m.price for name, m in MODELS.items() if m.price is not None
}


def model_name(uri: str) -> str:
    """``gpt://<folder>/yandexgpt-lite/latest`` or ``yandexgpt-lite/latest`` -> ``yandexgpt-lite``."""
    path = uri.split("://", 1)[1].split("/", 1)[-1] if "://" in uri else uri
    return path.split("/")[0].split("@")[0]


def warnings(uris: set[str], mode: str) -> list[str]:
    """What to tell a user about the models a batch names, before anything is sent."""
    said = []
    for name in sorted({model_name(u) for u in uris}):
        known = MODELS.get(name)
        if known is None:
            said.append(f"model {name!r} is not one runner knows ({', '.join(MODELS)}); the "
                        "server decides whether it exists, and its cost is not estimated")  # fmt: skip
        elif mode == "async" and not known.yandex:
            said.append(f"model {name!r} is an open-weight model: asynchronous mode exists only "
                        "for Yandex's own models; use --mode sync, or expect the API to refuse it")  # fmt: skip
    return said


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
    tokens_by_model: dict[str, int], prices: dict[str, float], mode: str = "async",
    sync_tokens: dict[str, int] | None = None,
) -> dict[str, object]:  # fmt: skip
    """Cost by model and in total; models without a price are listed as unpriced.

    ``mode`` prices every token (a plan); ``sync_tokens``, what a database recorded: the share
    of each model's tokens that synchronous requests used, priced at the synchronous rate."""
    factor = SYNC_FACTOR if mode == "sync" else 1.0
    by_model: dict[str, float] = {}
    unpriced: list[str] = []
    for uri, tokens in sorted(tokens_by_model.items()):
        name = model_name(uri)
        if name in prices:
            billed = tokens * factor + (sync_tokens or {}).get(uri, 0) * (SYNC_FACTOR - 1)
            by_model[name] = by_model.get(name, 0.0) + billed / 1000 * prices[name]
        else:
            unpriced.append(name)
    return {
        "estimate": True,
        "currency": CURRENCY,
        "total": round(sum(by_model.values()), 4),
        "byModel": {k: round(v, 4) for k, v in by_model.items()},
        "unpriced": sorted(set(unpriced)),
    }
