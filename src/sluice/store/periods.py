"""Budget periods: where the current one started, in UTC, for a given instant."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal, TypeGuard, get_args

BudgetPeriod = Literal["daily", "weekly", "monthly"]
BUDGET_PERIODS: frozenset[str] = frozenset(get_args(BudgetPeriod))


def is_budget_period(value: object) -> TypeGuard[BudgetPeriod]:
    return isinstance(value, str) and value in BUDGET_PERIODS


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC; naive datetimes are refused rather than guessed at."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
    return value.astimezone(UTC)


def current_period_start(period: str, now: datetime) -> datetime:
    """Start of the budget period containing ``now`` (aware, UTC).

    daily: 00:00 UTC of ``now``'s day; weekly: Monday 00:00 UTC of its ISO week;
    monthly: the first of its month, 00:00 UTC.
    """
    now = as_utc(now)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return day
    if period == "weekly":
        return day - timedelta(days=day.weekday())
    if period == "monthly":
        return day.replace(day=1)
    raise ValueError(f"unknown budget period {period!r}; expected one of {sorted(BUDGET_PERIODS)}")
