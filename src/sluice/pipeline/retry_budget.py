"""Retry budgets: retries may be at most a share of a deployment's requests, so that they
cannot multiply the load on an upstream that is already failing.

As Finagle's ``RetryBudget``: every request sent to a deployment deposits ``ratio`` of a
retry, every retry sent to it withdraws one, and deposits count for a window of ``window``
seconds (one-second slots). A reserve of ``min_per_second * window`` retries is always
there on top, so a deployment with little traffic can still retry now and then. With the
defaults (20%, 5 a second, 10 s) a deployment serving 100 requests a second takes at most
about 25 retries a second; one serving 2 a second, at most 5.

The request path deposits once per request: a clock value already read, a dictionary
lookup, one call and two integer additions; the slots move on at most once a second.
"""

from __future__ import annotations

from collections.abc import Callable

WINDOW_SECONDS = 10


class RetryBudget:
    """The budget of one deployment. ``now`` is any monotonic clock in seconds."""

    __slots__ = (
        "_deposited",
        "_deposits",
        "_index",
        "_on_roll",
        "_ratio",
        "_reserve",
        "_slot",
        "_withdrawals",
        "_withdrawn",
    )

    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        window: int = WINDOW_SECONDS,
        on_roll: Callable[[float], None] | None = None,
    ) -> None:
        self._ratio = ratio
        self._reserve = min_per_second * window
        # Per one-second slot of the window, indexed by the slot's number modulo the window.
        self._deposits = [0] * window
        self._withdrawals = [0] * window
        self._deposited = 0  # sums over the window
        self._withdrawn = 0
        self._slot = 0
        self._index = 0  # the current slot's place in the lists
        self._on_roll = on_roll
        """Called with the balance when the window moves on (at most once a second)."""

    def deposit(self, now: float) -> None:
        if int(now) != self._slot:
            self._roll(int(now))
        self._deposits[self._index] += 1
        self._deposited += 1

    def try_withdraw(self, now: float) -> bool:
        """Take one retry from the budget: False, and nothing taken, when it is empty."""
        if int(now) != self._slot:
            self._roll(int(now))
        if self.balance() < 1:
            return False
        self._withdrawals[self._index] += 1
        self._withdrawn += 1
        return True

    def balance(self) -> float:
        """Retries that may be sent now (as of the last deposit or withdrawal)."""
        return self._reserve + self._ratio * self._deposited - self._withdrawn

    def _roll(self, slot: int) -> None:
        """Forget the slots that left the window since the last call."""
        size = len(self._deposits)
        passed = slot - self._slot
        self._slot = slot
        self._index = slot % size
        if passed >= size or passed < 0:
            self._deposits[:] = [0] * size
            self._withdrawals[:] = [0] * size
            self._deposited = self._withdrawn = 0
        else:
            for step in range(slot - passed + 1, slot + 1):
                index = step % size
                self._deposited -= self._deposits[index]
                self._withdrawn -= self._withdrawals[index]
                self._deposits[index] = self._withdrawals[index] = 0
        if self._on_roll is not None:
            self._on_roll(self.balance())


class RetryBudgets(dict[str, RetryBudget]):
    """One `RetryBudget` per deployment id, made on first use (a handful per process):
    ``budgets[deployment].deposit(now)`` is a dictionary lookup and one call."""

    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        window: int = WINDOW_SECONDS,
        on_balance: Callable[[str, float], None] | None = None,
    ) -> None:
        super().__init__()
        self._ratio = ratio
        self._min_per_second = min_per_second
        self._window = window
        self._on_balance = on_balance
        """Told a deployment's balance when its window moves on and after a withdrawal."""

    def __missing__(self, deployment: str) -> RetryBudget:
        on_roll = None
        if self._on_balance is not None:
            report = self._on_balance

            def on_roll(balance: float) -> None:
                report(deployment, balance)

        budget = self[deployment] = RetryBudget(
            self._ratio, self._min_per_second, self._window, on_roll
        )
        return budget

    def try_withdraw(self, deployment: str, now: float) -> bool:
        budget = self[deployment]
        taken = budget.try_withdraw(now)
        if self._on_balance is not None:
            self._on_balance(deployment, budget.balance())
        return taken
