"""Incremental text assembly for one sequence: UTF-8 reassembly and stop strings.

Tokens decode to byte pieces that may split a multi-byte character; `Utf8Assembler` only
releases text once it decodes. `StopMatcher` holds back any tail that could still grow into
a stop string, so a stop string is never emitted, not even in part.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class Utf8Assembler:
    """Turn a stream of byte pieces into text, emitting characters only when complete."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Find stop strings in streamed text without ever emitting any part of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add `text`; return what is now safe to emit. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        cut = -1
        for stop in self._stops:
            at = buf.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut = at
        if cut != -1:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = self._longest_partial(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back tail, released when the sequence ends without a stop match."""
        if self.stopped:
            return ""
        held, self._held = self._held, ""
        return held

    def _longest_partial(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
