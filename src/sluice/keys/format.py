"""The virtual API key format: recognisable, checksummed, stored only as a hash.

    sk-sluice-<32 base62 characters of randomness (≈190 bits)><6 base62 characters of CRC32>

The fixed prefix lets secret scanners and people recognise a Sluice key; the checksum lets
the gateway reject typos and garbage without a database lookup. Only the SHA-256 of the
whole key is stored; the key is shown once, at creation, and afterwards displayed as its
prefix and last four characters.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import zlib
from dataclasses import dataclass

PREFIX = "sk-sluice-"
_ALPHABET = string.digits + string.ascii_letters
_BODY_LENGTH = 32
_CHECKSUM_LENGTH = 6
KEY_LENGTH = len(PREFIX) + _BODY_LENGTH + _CHECKSUM_LENGTH


@dataclass(frozen=True, slots=True)
class NewKey:
    secret: str
    key_hash: str
    display: str


def generate() -> NewKey:
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_BODY_LENGTH))
    secret = PREFIX + body + _checksum(body)
    return NewKey(secret=secret, key_hash=hash_key(secret), display=display(secret))


def well_formed(secret: str) -> bool:
    """Prefix, length, alphabet and checksum all right: worth a lookup."""
    if len(secret) != KEY_LENGTH or not secret.startswith(PREFIX):
        return False
    body = secret[len(PREFIX) : len(PREFIX) + _BODY_LENGTH]
    return secrets.compare_digest(_checksum(body), secret[-_CHECKSUM_LENGTH:])


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def display(secret: str) -> str:
    return f"{PREFIX}…{secret[-4:]}"


def new_key_id() -> str:
    return f"key_{secrets.token_hex(6)}"


def _checksum(body: str) -> str:
    value = zlib.crc32(body.encode())
    digits = []
    for _ in range(_CHECKSUM_LENGTH):
        value, digit = divmod(value, len(_ALPHABET))
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))
