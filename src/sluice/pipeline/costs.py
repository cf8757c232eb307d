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
  choices it asks for (`sluice.protocol.completion_ceiling`, beside the validation that
  bounds those fields).
"""

from __future__ import annotations

from sluice.routing.settings import AliasSettings
from sluice.settings import ModelSettings

BYTES_PER_TOKEN = 4

Rates = tuple[float, float]
"""USD per million prompt tokens and per million completion tokens."""


def price_table(
    models: list[ModelSettings], aliases: list[AliasSettings] | None = None
) -> dict[str, Rates]:
    """Each model's rates; an alias is priced at the most its versions charge (each rate
    the highest of its versions'), because a budget hold is taken before the version is
    chosen and must cover whichever serves. What is charged in the end is the version's
    price (`sluice.pipeline.accounting.charged`)."""
    prices = {
        model.name: (model.pricing.prompt_per_million, model.pricing.completion_per_million)
        for model in models
    }
    for alias in aliases or ():
        rates = [prices[version.model] for version in alias.versions if version.model in prices]
        if rates:
            prices[alias.name] = (max(r[0] for r in rates), max(r[1] for r in rates))
    return prices


def cost_usd(rates: Rates | None, prompt_tokens: int, completion_tokens: int) -> float:
    if rates is None:
        return 0.0
    return (prompt_tokens * rates[0] + completion_tokens * rates[1]) / 1_000_000


def prompt_estimate(size: int) -> int:
    """A rough count of the prompt's tokens, from the body's size in bytes."""
    return size // BYTES_PER_TOKEN or 1
