"""The retry budget: a share of the requests over a sliding window, plus a floor."""

from __future__ import annotations

from sluice.pipeline.retry_budget import RetryBudget, RetryBudgets


def withdrawals(budget: RetryBudget, now: float) -> int:
    taken = 0
    while budget.try_withdraw(now):
        taken += 1
    return taken


def test_an_empty_budget_refuses() -> None:
    assert not RetryBudget(0.2, 0).try_withdraw(100.0)


def test_retries_are_a_share_of_requests() -> None:
    budget = RetryBudget(0.2, 0)
    for _ in range(100):
        budget.deposit(100.0)
    assert withdrawals(budget, 100.5) == 20


def test_the_floor_allows_retries_without_traffic() -> None:
    assert withdrawals(RetryBudget(0.2, 5, window=10), 100.0) == 50


def test_deposits_leave_the_window() -> None:
    budget = RetryBudget(0.5, 0, window=10)
    for _ in range(10):
        budget.deposit(100.0)
    assert budget.balance() == 5
    for _ in range(10):
        budget.deposit(105.0)
    budget.try_withdraw(109.9)
    assert budget.balance() == 9  # 20 deposits in the window, one retry
    budget.try_withdraw(110.0)  # the slot of second 100 has left the window
    assert budget.balance() == 3
    assert not budget.try_withdraw(125.0)  # everything has left it


def test_withdrawals_leave_the_window_too() -> None:
    budget = RetryBudget(0, 1, window=2)
    assert withdrawals(budget, 10.0) == 2
    assert not budget.try_withdraw(11.0)
    assert budget.try_withdraw(12.0)


def test_budgets_are_per_deployment_and_report_their_balance() -> None:
    reported: list[tuple[str, float]] = []
    budgets = RetryBudgets(0.5, 0, on_balance=lambda d, b: reported.append((d, b)))
    budgets["a"].deposit(1.0)
    budgets["a"].deposit(1.0)
    assert budgets.try_withdraw("a", 1.0)
    assert not budgets.try_withdraw("b", 1.0)
    assert ("a", 0.0) in reported
    assert reported[-1] == ("b", 0.0)
    budgets["a"].deposit(2.0)  # the window moves on: reported without a withdrawal
    assert reported[-1] == ("a", 0.0)
