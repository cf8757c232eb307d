"""A key's cache settings through ``/admin/keys``, on SQLite + memory and PostgreSQL + Redis."""

from __future__ import annotations

from tests.api.test_keys_and_limits import Gateway, gw

__all__ = ["gw"]


def test_cache_settings_are_created_shown_and_changed(gw: Gateway) -> None:
    plain = gw.new_key()
    assert (plain["team"], plain["cache_controls"], plain["semantic_cache"]) == (None, True, None)

    created = gw.new_key(team="search", cache_controls=False, semantic_cache=True)
    assert (created["team"], created["cache_controls"], created["semantic_cache"]) == (
        "search",
        False,
        True,
    )
    assert "key" not in (shown := gw.admin.get(f"/admin/keys/{created['id']}").json())
    assert (shown["team"], shown["cache_controls"], shown["semantic_cache"]) == (
        "search",
        False,
        True,
    )

    # Only the fields sent change; null puts the team and the semantic choice back to none.
    response = gw.admin.patch(
        f"/admin/keys/{created['id']}", json={"team": None, "semantic_cache": None}
    )
    assert response.status_code == 200, response.text
    changed = response.json()
    assert (changed["team"], changed["cache_controls"], changed["semantic_cache"]) == (
        None,
        False,
        None,
    )
    changed = gw.admin.patch(f"/admin/keys/{created['id']}", json={"cache_controls": True}).json()
    assert (changed["team"], changed["cache_controls"], changed["semantic_cache"]) == (
        None,
        True,
        None,
    )
    listed = {k["id"]: k for k in gw.admin.get("/admin/keys").json()["data"]}
    assert listed[created["id"]]["cache_controls"] is True
    assert listed[plain["id"]]["team"] is None


HOSTILE = [
    '{"team": "a\\u0000b"}',
    '{"team": "a\\nb"}',
    '{"team": "a\\u202eb"}',
    '{"team": "\\ud800"}',
    '{"team": ""}',
    '{"team": " search"}',
    '{"team": "' + "x" * 201 + '"}',
    '{"team": 7}',
    '{"cache_controls": null}',
    '{"cache_controls": "false"}',
    '{"semantic_cache": "on"}',
]


def test_hostile_cache_settings_are_refused_with_400(gw: Gateway) -> None:
    key = gw.new_key(team="search")
    headers = {"Content-Type": "application/json"}
    for body in HOSTILE:  # one gateway for all: each start costs a second or more
        created = gw.admin.post("/admin/keys", content=body, headers=headers)
        patched = gw.admin.patch(f"/admin/keys/{key['id']}", content=body, headers=headers)
        for response in (created, patched):
            assert response.status_code == 400, (body, response.text)
            field = body[2:].split('"', 1)[0]
            assert response.json()["error"]["param"] == field, body
    assert [k["id"] for k in gw.admin.get("/admin/keys").json()["data"]] == [key["id"]]
    unchanged = gw.admin.get(f"/admin/keys/{key['id']}").json()
    assert (unchanged["team"], unchanged["cache_controls"]) == ("search", True)
