from __future__ import annotations

import pytest

from sluice.cache.controls import NONE, Controls, read_controls
from sluice.errors import InvalidRequestError


def test_header_directives() -> None:
    assert read_controls(None, None) is NONE
    assert read_controls(b"no-cache", None) == Controls(no_cache=True)
    assert read_controls(b"No-Store, max-age=60", None) == Controls(no_store=True, max_age=60)
    assert read_controls(b"max-age=abc, private", None) is NONE  # unknown or bad: ignored


def test_body_field_wins_over_the_header() -> None:
    assert read_controls(b"max-age=60", {"max-age": 5}) == Controls(max_age=5)
    assert read_controls(b"no-cache", {"no-cache": False}) is NONE


@pytest.mark.parametrize(
    "field",
    ["no-cache", {"no-cache": "yes"}, {"max-age": -1}, {"max-age": 1.5}, {"ttl": 5}],
)
def test_a_malformed_body_field_is_a_400(field: object) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        read_controls(None, field)
    assert caught.value.param == "cache"
