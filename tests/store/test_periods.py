from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from sluice.store.periods import current_period_start


def utc(
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    microsecond: int = 0,
) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


@pytest.mark.parametrize(
    ("period", "now", "start"),
    [
        ("daily", utc(2025, 3, 5, 12, 30, 1, 5), utc(2025, 3, 5)),
        ("daily", utc(2025, 3, 5), utc(2025, 3, 5)),
        ("daily", utc(2025, 3, 5, 23, 59, 59, 999999), utc(2025, 3, 5)),
        ("weekly", utc(2025, 3, 5, 12), utc(2025, 3, 3)),  # a Wednesday -> Monday
        ("weekly", utc(2025, 3, 3), utc(2025, 3, 3)),  # Monday 00:00 starts a week
        ("weekly", utc(2025, 3, 2, 23, 59), utc(2025, 2, 24)),  # Sunday is the week's end
        ("weekly", utc(2025, 1, 1, 8), utc(2024, 12, 30)),  # ISO week across the year
        ("monthly", utc(2025, 3, 31, 23), utc(2025, 3, 1)),
        ("monthly", utc(2024, 2, 29, 6), utc(2024, 2, 1)),
        ("monthly", utc(2025, 1, 1), utc(2025, 1, 1)),
    ],
)
def test_current_period_start(period: str, now: datetime, start: datetime) -> None:
    got = current_period_start(period, now)
    assert got == start
    assert got.tzinfo is UTC


def test_period_start_uses_utc_not_local_time() -> None:
    # 01:00 on the 1st in UTC+2 is still the last day of the previous month in UTC.
    plus_two = timezone(timedelta(hours=2))
    now = datetime(2025, 4, 1, 1, 0, tzinfo=plus_two)
    assert current_period_start("monthly", now) == utc(2025, 3, 1)
    assert current_period_start("daily", now) == utc(2025, 3, 31)


def test_rejects_naive_datetimes_and_unknown_periods() -> None:
    with pytest.raises(ValueError, match="naive"):
        current_period_start("daily", datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="unknown budget period"):
        current_period_start("hourly", utc(2025, 1, 1))
