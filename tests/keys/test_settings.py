"""A key's cache settings are admin input: validated like every other field of a key."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from sluice.keys.service import TEAM_MAX_LENGTH, KeySettings


def test_cache_settings_default_to_no_team_controls_allowed_and_the_models_choice() -> None:
    spec = KeySettings()
    assert (spec.team, spec.cache_controls, spec.semantic_cache) == (None, True, None)


@pytest.mark.parametrize(
    "team",
    ["search", "Équipe données", "team a/b:c", "検索チーム", "x" * TEAM_MAX_LENGTH, "a😀b"],
)
def test_printable_team_names_are_kept_as_given(team: str) -> None:
    assert KeySettings(team=team).team == team


@pytest.mark.parametrize(
    "team",
    [
        "",  # no team is null, not an empty name
        "x" * (TEAM_MAX_LENGTH + 1),
        "a\x00b",  # PostgreSQL text cannot hold it
        "a\nb",  # a second line in a listing or a log
        "a\x1b[31mb",  # a terminal escape
        "a\x7fb",
        "a\u202eb",  # right-to-left override: shows one name, stores another
        "a\u200bb",  # zero-width space: two names that read the same
        "a\u00a0b",  # no-break space
        "a\u2028b",  # line separator
        "a\ud800b",  # lone surrogate: not Unicode text
        " search",
        "search ",
    ],
)
def test_team_names_that_hide_or_fake_text_are_refused(team: str) -> None:
    with pytest.raises(ValidationError) as caught:
        KeySettings(team=team)
    assert caught.value.errors()[0]["loc"] == ("team",)


@pytest.mark.parametrize(
    "change",
    [
        {"team": 5},
        {"team": ["search"]},
        {"cache_controls": None},  # the setting is on or off, never unset
        {"cache_controls": "false"},  # a string that reads as a boolean is not one
        {"cache_controls": 0},
        {"semantic_cache": "yes"},
        {"semantic_cache": 1},
    ],
)
def test_cache_settings_of_the_wrong_type_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        KeySettings.model_validate(change)
    with pytest.raises(ValidationError):  # as the admin API parses it
        KeySettings.model_validate_json(json.dumps(change))


def test_only_the_cache_settings_given_count_as_set() -> None:
    change = KeySettings.model_validate({"semantic_cache": None, "team": None})
    assert change.model_dump(exclude_unset=True) == {"semantic_cache": None, "team": None}
    assert KeySettings.model_validate({"cache_controls": False}).model_dump(exclude_unset=True) == {
        "cache_controls": False
    }
