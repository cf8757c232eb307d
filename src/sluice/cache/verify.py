"""The second check on a semantic-cache candidate: do two prompts ask for the same answer?

A sentence embedding puts "What was Q3 revenue in 2023?" and "What was Q3 revenue in 2024?"
next to each other (cosine ~0.98), and "Convert Celsius to Fahrenheit" on top of its
reverse: the vector says what a prompt is *about*, not which answer it wants. Measured on
MRPC (docs/semantic-cache.md), cosine alone reaches <= 1% false hits only near 0.97, where
it finds few paraphrases. So a hit above the similarity threshold must also pass this check,
which compares the cheap signals that change an answer while barely moving the vector:

- numbers (``5/32``, ``1.23``, ``$1.04``, ``12%``, dates, "two", "million"): the same set;
- named entities (capitalised words not at a sentence start, acronyms, tickers): the same
  set, where a name only at the start of a sentence on one side still matches;
- negation (not, no, never, n't, without, ...): the same count;
- direction (the word after to/into, from, than, before, after) and opposite words (more /
  less, rose / fell, buy / sell, ...) must not flip;
- the content words: few may be new on either side, and rewording changes words on both
  sides alike, where an added clause adds them to one.

It is pure Python over a few regular expressions: no I/O, no model, tens of microseconds for
a chat-sized prompt, so it may run on the event loop. `signals` is split out so a cache can
compute the stored prompt's signals once, at store time, and `mismatch` names the signal that
disagreed (for a metric label or a debug log).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_IMBALANCE",
    "MAX_NEW_WORDS",
    "SecondCheck",
    "Signals",
    "mismatch",
    "same_meaning",
    "signals",
]

MAX_NEW_WORDS: Final = 0.4
"""Content words only one prompt has, at most this share of the shorter one's, per side."""
MAX_IMBALANCE: Final = 1
"""How many more new words one side may have than the other: rewording changes words on
both sides, an added clause ("... and its population") only on one."""

_NUMBER: Final = re.compile(r"(?<![A-Za-z0-9])\d+(?:[.,/:]\d+)*(?:st|nd|rd|th|s)?(?![A-Za-z0-9])")
_NUMERO: Final = re.compile(r"\.\s*\d")  # "No. 11" is a rank, not a negation
# Hyphens split words: "third-quarter" reads as "third quarter", "Hermon-Taylor" as two names.
_WORD: Final = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:['\u2019.&=][A-Za-z0-9]+)*")
_OPENERS: Final = frozenset(" \t\"'\u201c\u2018([*-\u2022")
_ABBREVIATIONS: Final = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "vs"})

_NUMBER_WORDS: Final = {
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
    "twenty": "20",
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "hundred": "100",
    "thousand": "1000",
    "million": "1e6",
    "millions": "1e6",
    "billion": "1e9",
    "billions": "1e9",
    "trillion": "1e12",
    "dozen": "12",
    "decade": "10",
    "half": "0.5",
    "quarter": "0.25",
    "twice": "2",
    "double": "2",
    "triple": "3",
    "second": "2",
    "third": "3",
    "fourth": "4",
    "fifth": "5",
    "sixth": "6",
    "seventh": "7",
    "eighth": "8",
    "ninth": "9",
    "tenth": "10",
}
# "the third quarter" and "the first half" name a period, not a fraction.
_PERIOD_WORDS: Final = frozenset({"quarter", "half"})
_PERIOD_OPENERS: Final = frozenset(
    {"first", "second", "third", "fourth", "last", "next", "this", "same", "previous", "fiscal"}
)
_NEGATIONS: Final = frozenset(
    {"not", "no", "never", "without", "none", "nothing", "nobody", "neither", "nor", "cannot"}
)
# Capitalised words that name no one: pronouns, titles and the words that open a question.
_NOT_NAMES: Final = frozenset(
    {"i", "mr", "mrs", "ms", "dr", "sir", "st", "jr", "ok", "a", "co", "corp", "inc", "ltd", "llc"}
)
# "X said on Monday" and "X said yesterday" date the report, not the fact reported: a day
# beside a reporting verb may be missing on one side (but may not differ when both say it).
_DAYS: Final = frozenset(
    {"monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"}
    | {"yesterday", "today", "tonight"}
)
_REPORTING: Final = frozenset({"said", "says", "told", "stated", "added", "announced", "reported"})
_DAY_FILLERS: Final = frozenset({"on", "late", "early", "this", "last"})
_STOPWORDS: Final = frozenset(
    """
    a an the and or but if then so of in on at by for with about as into onto from to up
    out over under is are was were be been being am do does did doing have has had having
    will would shall should can could may might must it its it's this that these those
    there here he she they them his her their our we us you your i me my mine what which
    who whom whose when where why how all any both each few more most other some such only
    own same than too very just also said says say told according while after before
    during between through again further once because until against among per via yet
    whether upon s t percent pct please tell hi hello hey thanks thank
    """.split()  # noqa: SIM905 (a list literal of 130 words reads worse)
)
# Words that point a relation one way; the word after them must not move to another.
_DIRECTIONS: Final = {
    "to": "to",
    "into": "to",
    "onto": "to",
    "towards": "to",
    "toward": "to",
    "from": "from",
    "than": "than",
    "before": "before",
    "after": "after",
}
# Opposites: one side of a pair only in one prompt and the other side only in the other.
_OPPOSITES: Final = (
    ("more", "less"),
    ("more", "fewer"),
    ("most", "least"),
    ("increase", "decrease"),
    ("increased", "decreased"),
    ("increases", "decreases"),
    ("rise", "fall"),
    ("rose", "fell"),
    ("rises", "falls"),
    ("gain", "loss"),
    ("gained", "lost"),
    ("up", "down"),
    ("higher", "lower"),
    ("highest", "lowest"),
    ("above", "below"),
    ("before", "after"),
    ("buy", "sell"),
    ("bought", "sold"),
    ("win", "lose"),
    ("won", "lost"),
    ("max", "min"),
    ("maximum", "minimum"),
    ("largest", "smallest"),
    ("biggest", "smallest"),
    ("best", "worst"),
    ("first", "last"),
    ("earliest", "latest"),
    ("add", "remove"),
    ("enable", "disable"),
    ("encrypt", "decrypt"),
    ("encode", "decode"),
    ("import", "export"),
    ("upload", "download"),
    ("ascending", "descending"),
    ("positive", "negative"),
    ("true", "false"),
    ("open", "close"),
    ("start", "stop"),
    ("push", "pull"),
    ("input", "output"),
    ("inside", "outside"),
    ("left", "right"),
    ("north", "south"),
    ("east", "west"),
    ("male", "female"),
    ("pros", "cons"),
    ("advantages", "disadvantages"),
    ("benefits", "risks"),
    ("legal", "illegal"),
    ("safe", "unsafe"),
    ("possible", "impossible"),
    ("agree", "disagree"),
    ("like", "dislike"),
    ("accept", "reject"),
    ("accepted", "rejected"),
    ("approve", "deny"),
    ("approved", "denied"),
)
_OPPOSITE_OF: Final = {
    word: (a, b) for a, b in _OPPOSITES for word in (a, b)
}  # word -> its pair, so a prompt's polar words are found with one lookup each


@dataclass(frozen=True, slots=True)
class Signals:
    """What `mismatch` compares, computed once per prompt."""

    numbers: frozenset[str]
    entities: frozenset[str]
    negations: int
    words: frozenset[str]
    directions: frozenset[tuple[str, str]]
    polar: frozenset[str]
    days: frozenset[str] = frozenset()


def _canonical_number(raw: str) -> str:
    text = raw.replace(",", "")
    text = re.sub(r"(?:st|nd|rd|th|s)$", "", text)
    whole, dot, frac = text.partition(".")
    whole = whole.lstrip("0") or "0"  # 06 is 6, and 0.60 is 0.6
    frac = frac.rstrip("0") if dot and "/" not in frac and ":" not in frac else frac
    return f"{whole}.{frac}" if frac else whole


def _at_sentence_start(text: str, start: int) -> bool:
    # Backwards over spaces, opening quotes and list bullets to the previous real character;
    # a capital after "Mr." or an initial ("George W. Bush") does not open a sentence.
    i = start - 1
    while i >= 0 and text[i] in _OPENERS:
        i -= 1
    if i < 0 or text[i] in "!?:;\n\r":
        return True
    if text[i] != ".":
        return False
    j = i
    while j > 0 and text[j - 1].isalpha():
        j -= 1
    before = text[j:i]
    return len(before) > 1 and before.lower() not in _ABBREVIATIONS


def _stem(word: str) -> str:
    # Enough to meet "purchased"/"purchase", "bodies"/"body", "planning"/"plan"; a real
    # stemmer costs more than the whole check and buys little on short prompts.
    for suffix, repl in (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            word = word[: -len(suffix)] + repl
            break
    if len(word) > 3 and word[-1] == "e":
        word = word[:-1]
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouls":
        word = word[:-1]
    return word[:-1] + "i" if word.endswith("y") else word


def _reporting_day(matches: list[re.Match[str]], at: int) -> bool:
    after = matches[at + 1].group().lower() if at + 1 < len(matches) else ""
    if after in _REPORTING:
        return True
    i = at - 1
    while i >= 0 and matches[i].group().lower() in _DAY_FILLERS:
        i -= 1
    return i >= 0 and matches[i].group().lower() in _REPORTING


def signals(text: str) -> Signals:
    """The signals of one prompt (pure, microseconds for a chat-sized text)."""
    numbers = {_canonical_number(m) for m in _NUMBER.findall(text)}
    entities: set[str] = set()
    words: set[str] = set()
    directions: set[tuple[str, str]] = set()
    polar: set[str] = set()
    negations = 0
    pending: str | None = None  # the direction word waiting for its content word
    days: set[str] = set()
    previous = ""
    matches = list(_WORD.finditer(text))
    for at, match in enumerate(matches):
        token = match.group()
        lower = token.lower().replace("\u2019", "'")
        if lower.endswith("n't"):
            negations += 1
            lower = lower[:-3]
        elif lower in _NEGATIONS and not _NUMERO.match(text, match.end()):
            negations += 1
        if lower.endswith("'s"):
            lower = lower[:-2]
        lower = lower.replace(".", "").replace("'", "")  # U.S. is US, O'Neill is ONeill
        before, previous = previous, lower
        if lower == "cent" and before == "per":
            continue  # "per cent" is "percent", a stop word
        if lower in _NUMBER_WORDS and not (lower in _PERIOD_WORDS and before in _PERIOD_OPENERS):
            # The number set carries it, so "two" and "2" are no new word for the words rule.
            numbers.add(_NUMBER_WORDS[lower])
            continue
        if lower in _OPPOSITE_OF:
            polar.add(lower)
        if lower in _DIRECTIONS:
            pending = _DIRECTIONS[lower]
            continue
        if lower in _STOPWORDS or lower in _NOT_NAMES or lower in _NEGATIONS:
            continue
        if lower in _DAYS and _reporting_day(matches, at):
            days.add(_stem(lower))  # stemmed, to meet the same day read as a word
            continue
        stem = _stem(lower)
        if pending is not None:
            directions.add((pending, stem))
            pending = None
        words.add(stem)
        if any(c.isdigit() for c in token) or sum(c.isupper() for c in token) > 1:
            entities.add(stem)  # acronyms, tickers, model names, versions: IBM, gpt4, US2YT
        elif token[0].isupper() and not _at_sentence_start(text, match.start()):
            entities.add(stem)
    return Signals(
        numbers=frozenset(numbers),
        entities=frozenset(entities),
        negations=negations,
        words=frozenset(words),
        directions=frozenset(directions),
        polar=frozenset(polar),
        days=frozenset(days),
    )


def _flipped(a: Signals, b: Signals) -> bool:
    only_a = a.polar - b.polar
    only_b = b.polar - a.polar
    for word in only_a:
        left, right = _OPPOSITE_OF[word]
        if (right if word == left else left) in only_b:
            return True
    # A direction word may not move from one shared word to another: "Celsius to Fahrenheit"
    # against "Fahrenheit to Celsius". Gaining or losing one ("agreed to the hikes", "agreed
    # to impose the hikes") is rewording, which the new-words rule weighs.
    shared = a.words & b.words
    moved_a = {(r, w) for r, w in a.directions if w in shared} - b.directions
    moved_b = {(r, w) for r, w in b.directions if w in shared} - a.directions
    return bool({r for r, _ in moved_a} & {r for r, _ in moved_b})


def mismatch(
    a: Signals,
    b: Signals,
    *,
    max_new_words: float = MAX_NEW_WORDS,
    max_imbalance: int = MAX_IMBALANCE,
) -> str | None:
    """The first signal on which two prompts disagree, or None when they agree."""
    if a.numbers != b.numbers or (a.days and b.days and a.days != b.days):
        return "number"  # a report of Monday is not one of Tuesday
    # A report's day counts as a word of its prompt when the other names the same day in
    # another place ("On Monday, X said" / "X said on Monday").
    words_a = a.words | a.days if a.days else a.words
    words_b = b.words | b.days if b.days else b.words
    # A name must be in the other prompt too, in any case: at a sentence start it is
    # capitalised like any word, and "Helmand Province" names what "Helmand province" does.
    if not (a.entities <= words_b and b.entities <= words_a):
        return "entity"
    if a.negations != b.negations:
        return "negation"
    if _flipped(a, b):
        return "direction"
    new_a = len(a.words - words_b)
    new_b = len(b.words - words_a)
    shorter = min(len(a.words), len(b.words))
    # One new word is allowed even in a three-word prompt ("What's" / "Tell me").
    allowed = max(1.0, max_new_words * shorter)
    if max(new_a, new_b) > allowed or abs(new_a - new_b) > max_imbalance:
        return "words"
    return None


def same_meaning(query: str, stored: str) -> bool:
    """Whether a semantic-cache candidate may serve ``query`` with the answer to ``stored``."""
    return mismatch(signals(query), signals(stored)) is None


@dataclass(frozen=True, slots=True)
class SecondCheck:
    """`same_meaning` with its tolerances fixed, for a cache that holds one configured check."""

    max_new_words: float = MAX_NEW_WORDS
    max_imbalance: int = MAX_IMBALANCE

    def __call__(self, query: str, stored: str) -> bool:
        return self.reason(signals(query), signals(stored)) is None

    def reason(self, query: Signals, stored: Signals) -> str | None:
        """`mismatch` with this check's tolerances: None when the candidate may be served."""
        return mismatch(
            query, stored, max_new_words=self.max_new_words, max_imbalance=self.max_imbalance
        )
