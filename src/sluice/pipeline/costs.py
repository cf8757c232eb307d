"""What a request may use and what it costs: the one place the limits, the budget ledger
and the usage record take their token estimates and prices from.

Token counts before the upstream has answered:

- *estimate* of the prompt (the body's bytes / 4): for the rate limiter's token window,
  which is reconciled with the real count when the request ends, so a rough figure will do;
- *bound* on the prompt (the body's bytes): for the budget, which must not be exceeded.
  A token is at least one byte of text, and a token id at least two bytes of JSON (a digit
  and a comma), so a prompt cannot tokenize to more tokens than its body has bytes (the
  chat template's few tokens per message are paid for by the JSON around each message).
  Not covered: images and audio, which cost many tokens for few bytes of URL;
- *ceiling* of the completion: what the request allows the upstream to write, times the
  choices it asks for.
"""

from __future__ import annotations

from typing import Any

from sluice.settings import ModelSettings

BYTES_PER_TOKEN = 4

Rates = tuple[float, float]
"""USD per million prompt tokens and per million completion tokens."""


def price_table(models: list[ModelSettings]) -> dict[str, Rates]:
    return {
        model.name: (model.pricing.prompt_per_million, model.pricing.completion_per_million)
        for model in models
    }


def cost_usd(rates: Rates | None, prompt_tokens: int, completion_tokens: int) -> float:
    if rates is None:
        return 0.0
    return (prompt_tokens * rates[0] + completion_tokens * rates[1]) / 1_000_000


def prompt_estimate(size: int) -> int:
    """A rough count of the prompt's tokens, from the body's size in bytes."""
    return size // BYTES_PER_TOKEN or 1


def completion_ceiling(route: str, body: dict[str, Any], default: int) -> tuple[int, bool]:
    """The completion tokens the request may use in all its choices, and whether the client
    set the ceiling itself (False: ``default`` was assumed, and nothing stops an upstream
    from writing more unless the gateway sends it). Embeddings complete nothing.

    Chat takes the larger of ``max_completion_tokens`` and ``max_tokens`` (upstreams differ
    in which wins); legacy completions know only ``max_tokens``. Only integers of at least 1
    count (a bool is not a count); choices are ``n``, or ``best_of`` on completions, which
    generates that many and bills them all."""
    if route == "embeddings":
        return 0, True
    names = ("max_tokens",) if route == "completions" else ("max_completion_tokens", "max_tokens")
    ceiling = 0
    for name in names:
        value = body.get(name)
        if type(value) is int and value > ceiling:
            ceiling = value
    explicit = ceiling > 0
    if not explicit:
        ceiling = default
    choices = _count(body.get("n"))
    if route == "completions":
        choices = max(choices, _count(body.get("best_of")))
    return ceiling * choices, explicit


def _count(value: Any) -> int:
    return value if type(value) is int and value > 1 else 1
