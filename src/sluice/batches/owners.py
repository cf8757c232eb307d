"""Who owns a file or a batch: the key that made it. One rule for both."""

from __future__ import annotations

from enum import Enum
from typing import Any

from sluice.pipeline.auth import Principal


class Anyone(Enum):
    """An owner for the gateway's own reads (the batch worker, the operator's CLI): no
    check. Never a default: a caller's read always names its owner."""

    ANYONE = "anyone"


ANYONE = Anyone.ANYONE
Owner = str | None | Anyone
"""A key id; None for the master key and open mode (no keys); or `ANYONE`."""


def owner_of(principal: Principal | None) -> str | None:
    """The owner a caller's files and batches carry: its key's id; None for the master
    key and in open mode (no principal)."""
    return principal.key_id if principal is not None else None


def owned_by(column: Any, owner: str | None) -> Any:
    """The condition that a row's ``key_id`` column is ``owner``'s."""
    return column.is_(None) if owner is None else column == owner
