"""The literal text every match of a regular expression begins with, read from the pattern.

``LeakedApiKeyDetection`` skips its regex on text that holds none of these strings (one C
substring search), and holds back at the end of a streamed piece only what could begin
one. Deriving them from the patterns, never writing them by hand beside them, keeps the
shortcut right when a pattern changes, and gives custom patterns the same shortcut.

The pattern is read with the standard library's parser, which knows the syntax that the
``regex`` module shares with ``re``. Anything it does not read exactly as ``regex`` does
(a case-insensitive part, fuzzy matching such as ``{e<=1}``, ``regex``-only syntax) gives
no literal: the caller then scans all the text.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

try:  # the standard library's own parser: private, so its absence only costs speed
    from re import _constants as _sre  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - every supported Python has them
    _sre = _sre_parse = None

MAX_PREFIXES = 64  # alternatives beyond this (a character range) end the prefix
MAX_LENGTH = 12  # a longer prefix filters no better: it is cut to this length
_MAX_SET = 8  # a character class of up to this many characters is spelled out
# A brace that is not a counted repeat ({2}, {2,}, {2,5}, {,5}) is fuzzy matching in the
# regex module ({e<=1}) but a literal brace to the standard parser: no prefix then.
_NOT_A_REPEAT = re.compile(r"\{(?!\d*,?\d*\})")


def required_prefixes(pattern: str) -> frozenset[str] | None:
    """Strings such that every match of ``pattern`` begins with one of them, none a
    prefix of another; ``None`` when the pattern has no such literal start (or one
    that cannot be read with certainty)."""
    if _sre_parse is None or _NOT_A_REPEAT.search(pattern):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "possible nested set": a regex-only class
            parsed = _sre_parse.parse(pattern)
    except Exception:  # regex-only syntax (\p{L}, (?|...), (?V1), ...)
        return None
    if parsed.state.flags & re.IGNORECASE:
        return None
    prefixes, _ = _extend(list(parsed), frozenset({""}))
    if prefixes is None or "" in prefixes:
        return None
    return minimal(prefix[:MAX_LENGTH] for prefix in prefixes)


def minimal(literals: Any) -> frozenset[str]:
    """The literals without those that begin with another one (the shorter one is in
    every text the longer one is in)."""
    ordered = sorted(set(literals), key=len)
    kept: list[str] = []
    for literal in ordered:
        if not any(literal.startswith(shorter) for shorter in kept):
            kept.append(literal)
    return frozenset(kept)


def _extend(
    items: list[tuple[Any, Any]], starts: frozenset[str]
) -> tuple[frozenset[str] | None, bool]:
    """``starts`` extended by what the parsed sequence ``items`` begins with; also whether
    the whole sequence was spelled out (so what follows it extends the prefixes too).
    ``None`` when a part of it cannot be read (a case-insensitive group)."""
    for op, av in items:
        if all(len(start) >= MAX_LENGTH for start in starts):
            return starts, False
        if op in (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT):
            continue  # anchors and lookarounds consume nothing
        if op is _sre.SUBPATTERN or op is _sre.ATOMIC_GROUP:
            sequence = av[-1] if op is _sre.SUBPATTERN else av
            if op is _sre.SUBPATTERN and av[1] & re.IGNORECASE:
                return None, False
            extended, complete = _extend(list(sequence), starts)
            if extended is None:
                return None, False
            if not complete:
                return extended, False
            starts = extended
            continue
        if op is _sre.BRANCH:
            union: set[str] = set()
            complete = True
            for alternative in av[1]:
                extended, done = _extend(list(alternative), starts)
                if extended is None:
                    return None, False
                union |= extended
                complete = complete and done
            if len(union) > MAX_PREFIXES:
                return starts, False
            starts = frozenset(union)
            if not complete:
                return starts, False
            continue
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
            low, high, sequence = av
            if low == 0:
                return starts, False
            extended, complete = _extend(list(sequence), starts)
            if extended is None:
                return None, False
            if low == high == 1 and complete:
                starts = extended
                continue
            return extended, False  # one repetition at least: its start, then stop
        chars = _chars(op, av)
        if chars is None or len(starts) * len(chars) > MAX_PREFIXES:
            return starts, False
        starts = frozenset(start + char for start in starts for char in chars)
    return starts, True


def _chars(op: Any, av: Any) -> list[str] | None:
    """The characters one item can match, when it is a literal or a small class."""
    if op is _sre.LITERAL:
        return [chr(av)]
    if op is not _sre.IN:
        return None
    chars: list[str] = []
    for kind, value in av:
        if kind is _sre.LITERAL:
            chars.append(chr(value))
        elif kind is _sre.RANGE and value[1] - value[0] < _MAX_SET:
            chars.extend(chr(code) for code in range(value[0], value[1] + 1))
        else:  # negation, a category (\d), a wide range
            return None
    return chars if len(chars) <= _MAX_SET else None
