"""Response header lines the pipeline writes (``x-sluice-*``), as ready-made bytes for the
header block (`sluice.http_protocol.HEADER_BLOCK`)."""

from __future__ import annotations

import re

_UNSAFE_IN_HEADER = re.compile(rb"[^\x21-\x7e ]")


def header_value(text: str) -> bytes:
    """A name from the configuration as a header value: anything but printable ASCII
    becomes ``?`` (a name never splits a header line)."""
    return _UNSAFE_IN_HEADER.sub(b"?", text.encode())
