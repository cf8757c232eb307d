"""UTF-8 reassembly across token pieces and stop-string hold-back."""

from __future__ import annotations

import pytest

from sluice.engine.text import StopMatcher, Utf8Assembler


def test_multibyte_character_split_across_pieces() -> None:
    data = "né ✓ 🙂".encode()
    asm = Utf8Assembler()
    out = [asm.feed(data[i : i + 1]) for i in range(len(data))]
    assert "".join(out) + asm.flush() == "né ✓ 🙂"
    # No piece ever carries half a character.
    assert all("\ufffd" not in piece for piece in out)
    emoji = "🙂".encode()
    asm2 = Utf8Assembler()
    assert asm2.feed(emoji[:2]) == ""
    assert asm2.feed(emoji[2:]) == "🙂"


def test_incomplete_tail_becomes_replacement_on_flush() -> None:
    asm = Utf8Assembler()
    assert asm.feed("🙂".encode()[:3]) == ""
    assert asm.flush() == "\ufffd"


def feed_all(matcher: StopMatcher, pieces: list[str]) -> str:
    out = ""
    for piece in pieces:
        out += matcher.feed(piece)
        if matcher.stopped:
            return out
    return out + matcher.flush()


@pytest.mark.parametrize(
    ("pieces", "stops", "expected", "stopped"),
    [
        (["Hello", " wor", "ld"], ["world"], "Hello ", True),
        (["Hel", "lo"], ["lo"], "Hel", True),
        (["a", "b", "c"], ["bd"], "abc", False),
        (["x<", "|e", "nd|>", "tail"], ["<|end|>"], "x", True),
        (["one two"], ["two", "one"], "", True),
        (["abc"], [], "abc", False),
        (["ab", "ab", "c"], ["abc"], "ab", True),
        (["end."], ["."], "end", True),
    ],
)
def test_stop_strings_are_never_emitted(
    pieces: list[str], stops: list[str], expected: str, stopped: bool
) -> None:
    matcher = StopMatcher(stops)
    assert feed_all(matcher, pieces) == expected
    assert matcher.stopped is stopped


def test_text_that_could_start_a_stop_is_held_until_resolved() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("go ST") == "go "
    assert matcher.feed("O") == ""
    assert matcher.feed("RM") == "STORM"
    assert not matcher.stopped
