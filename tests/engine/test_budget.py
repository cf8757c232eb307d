"""The per-step token budget: what a prefilling sequence may add beside the decodes."""

from __future__ import annotations

import pytest

from sluice.engine.budget import MIN_STEP_TOKENS, AdaptiveBudget, FixedBudget


def fill(budget: AdaptiveBudget | FixedBudget, decoding: int, rests: list[int]) -> list[int]:
    """What each prefilling sequence gets, in order, as the scheduler asks."""
    taken, out = 0, []
    for rest in rests:
        take = budget.take(decoding, taken, rest)
        out.append(take)
        taken += take
    return out


def test_fixed_budget_is_a_hard_cap_with_decodes_first() -> None:
    budget = FixedBudget(24)
    assert fill(budget, 4, [100]) == [20]
    assert fill(budget, 4, [5, 100, 100]) == [5, 15, 0]
    assert fill(budget, 24, [3]) == [0]


@pytest.mark.parametrize("decoding", [0, 1, 8, 15, 40])
def test_adaptive_budget_chunks_a_long_prompt_to_twice_the_decodes(decoding: int) -> None:
    budget = max(2 * decoding, MIN_STEP_TOKENS)
    [take] = fill(AdaptiveBudget(), decoding, [1000])
    assert take == budget - decoding
    assert decoding + take == budget  # a step with prompt work: about twice a decode-only one


def test_adaptive_budget_lets_a_prompt_that_fits_join_whole() -> None:
    # Fifteen streams decoding: the budget is 30 tokens, 15 of them free beside the decodes;
    # a 20-token chat prompt joins whole instead of taking two steps to its first token.
    assert fill(AdaptiveBudget(), 15, [20]) == [20]
    # A second one would take the step past decodes + budget: it gets nothing this step.
    assert fill(AdaptiveBudget(), 15, [20, 20]) == [20, 0]
    # With nobody decoding, short prompts share the floor, the last one in part.
    assert MIN_STEP_TOKENS == 16
    assert fill(AdaptiveBudget(), 0, [6, 8, 20]) == [6, 8, 2]


def test_adaptive_budget_never_exceeds_decodes_plus_budget() -> None:
    adaptive = AdaptiveBudget()
    for decoding in range(0, 65):
        budget = max(2 * decoding, MIN_STEP_TOKENS)
        for rests in ([1] * 40, [5, 31, 64, 200], [33, 33], [budget, 1], [budget + 1]):
            assert decoding + sum(fill(adaptive, decoding, rests)) <= decoding + budget
            assert all(t >= 0 for t in fill(adaptive, decoding, rests))
