"""The per-step token budget: what a prefilling sequence may add beside the decodes."""

from __future__ import annotations

import pytest

from sluice.engine.budget import MIN_STEP_TOKENS, AdaptiveBudget, FixedBudget


def fill(
    budget: AdaptiveBudget | FixedBudget, decoding: int, rests: list[int], split: bool = False
) -> list[int]:
    """What each prefilling sequence gets, in order, as the scheduler asks."""
    taken, out = 0, []
    for rest in rests:
        take = budget.take(decoding, taken, rest, split)
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


def test_a_split_prompt_ends_in_chunks_too() -> None:
    # The last 20 tokens of a long prompt beside 15 decodes: a chunk of 15, not all 20
    # (which would make the step three times a decode-only one).
    assert fill(AdaptiveBudget(), 15, [20], split=True) == [15]
    assert fill(AdaptiveBudget(), 15, [20], split=False) == [20]


@pytest.mark.parametrize("budget", [AdaptiveBudget(), FixedBudget(65)])
def test_the_first_prompt_of_a_step_always_makes_progress(budget: AdaptiveBudget) -> None:
    # The scheduler relies on it: below `parallel` decodes (step_tokens > parallel), the
    # first prefilling sequence of a step gets at least one token, split or not.
    for decoding in range(0, 64):
        for rest in (1, 2, 17, 1000):
            for split in (False, True):
                assert budget.take(decoding, 0, rest, split) >= 1


def test_a_long_waiting_prompt_goes_first_within_its_priority() -> None:
    from types import SimpleNamespace

    pytest.importorskip("llama_cpp")
    from sluice.engine.scheduler import PREFILL_AGING_S, _prefill_order

    def seq(order: int, rest: int, waited: float, priority: int = 0) -> SimpleNamespace:
        req = SimpleNamespace(priority=priority)
        prompt = [0] * rest
        return SimpleNamespace(req=req, prompt=prompt, cursor=0, admitted_at=-waited, order=order)

    fresh_long, short = seq(1, 900, 0.0), seq(2, 10, 0.0)
    aged_long = seq(3, 900, PREFILL_AGING_S)
    urgent = seq(4, 500, 0.0, priority=1)
    everyone = [fresh_long, short, aged_long, urgent]
    ranked = sorted(everyone, key=lambda s: _prefill_order(s, 0.0))  # type: ignore[arg-type]
    assert ranked == [urgent, aged_long, short, fresh_long]
