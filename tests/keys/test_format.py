from __future__ import annotations

import hashlib

from sluice.keys.format import display, hash_key, new_key_id


def test_secret_helpers() -> None:
    key_id = new_key_id()
    assert key_id.startswith("key_")
    assert len(key_id) == 16
    assert int(key_id[4:], 16) >= 0
    assert hash_key("sk-x") == hashlib.sha256(b"sk-x").hexdigest()
    assert display("sk-sluice-abcdefghijklmnop") == "sk-sluice-…mnop"
