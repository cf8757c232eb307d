"""How many prompt tokens a decode step takes beside its decodes (the per-step token budget).

On a CPU a step's time grows about linearly with its tokens, prompt and decode tokens
alike (more deep in a long prompt; measured by `bench/engine_costs.py`, figures in
docs/benchmarks.md), so every prompt token in a step delays every running stream by about
the same amount whichever step it is in. A budget therefore cannot make prompt work cheaper
for the running streams; what it decides is how the work is spread: a long prompt in chunks
keeps any one step from stalling the streams for long (a long prompt in one step stalls them
for seconds), while a short prompt split over two steps only delays its own first token by a
step and spares nobody anything.

`AdaptiveBudget` (the default) lets a step hold twice its decodes, at least
`MIN_STEP_TOKENS`, and lets a prompt not split yet join whole when it fits in that budget
beside the prompt tokens the step already took (the step then holds up to the decodes plus
the budget: three times a decode-only step at most); `FixedBudget` (`step_tokens` set) is a
hard cap on a step's tokens.
"""

from __future__ import annotations

from typing import Protocol

MIN_STEP_TOKENS = 16
"""The adaptive budget's floor: prompt work a step can always take beside few decodes. From
8 decoding streams up the budget is exactly twice the decodes; below that a step of 16
tokens stalls a few streams for longer than twice their decode-only step, but for less than
anyone watching them sees (docs/benchmarks.md)."""


class StepBudget(Protocol):
    def take(self, decoding: int, taken: int, rest: int, split: bool) -> int:
        """Prompt tokens the next prefilling sequence may add to a step that already holds
        `decoding` decodes and `taken` prompt tokens, of its `rest` still to prefill
        (`split`: earlier steps took part of it). At least 1 for the first prefilling
        sequence of a step (`taken` 0) while `decoding` is below the budget's own floor, so
        every step makes prompt progress."""
        ...


class FixedBudget:
    """At most `step_tokens` tokens a step, decodes first (as vLLM's
    ``max_num_batched_tokens``)."""

    def __init__(self, step_tokens: int) -> None:
        self.step_tokens = step_tokens

    def take(self, decoding: int, taken: int, rest: int, split: bool) -> int:
        return max(0, min(rest, self.step_tokens - decoding - taken))


class AdaptiveBudget:
    """A step of twice its decodes (at least `MIN_STEP_TOKENS`): with many streams running
    a step with prompt work takes about twice a decode-only one, so running streams'
    inter-token time at most doubles while a long prompt joins, chunk by chunk to its last.
    A prompt not split yet that fits in the budget beside what the step already took joins
    whole (the step then holds up to the decodes plus the budget), so a chat prompt beside
    sixteen streams gets its first token a step sooner."""

    def take(self, decoding: int, taken: int, rest: int, split: bool) -> int:
        budget = max(2 * decoding, MIN_STEP_TOKENS)
        if not split and taken + rest <= budget:
            return rest
        return max(0, min(rest, budget - decoding - taken))
