"""The literal prefixes read from a pattern: the prefilter of LeakedApiKeyDetection."""

from __future__ import annotations

import random
import re

import pytest
import regex

from luthien_control.policies.literals import MAX_LENGTH, minimal, required_prefixes
from luthien_control.policies.secrets import DEFAULT_PATTERNS, _trie, derived_literals

DEFAULT_PATTERNS_LITERALS = derived_literals(DEFAULT_PATTERNS.values()) or ()


@pytest.mark.parametrize(
    ("pattern", "prefixes"),
    [
        (r"secret-\d+", {"secret-"}),
        (r"(?:AKIA|ASIA)[A-Z0-9]{16}\b", {"AKIA", "ASIA"}),
        (r"gh[pousr]_[A-Za-z0-9]{36}", {"ghp_", "gho_", "ghu_", "ghs_", "ghr_"}),
        (r"(?<![A-Za-z])(?:(?<=x)|\b)sk-[a-z]{20}", {"sk-"}),  # lookarounds take no text
        (r"(?P<name>tok)(?>en)_\d", {"token_"}),
        (r"(?:a|)bc", {"abc", "bc"}),
        (r"ab(?:c|d[0-9])e", {"abc", "abd"}),
        (r"x{2}y", {"x"}),
        (r"(?:ab)+c", {"ab"}),
        (r"-----BEGIN PGP PRIVATE KEY BLOCK-----", {"-----BEGIN P"}),  # cut: MAX_LENGTH
        (r"sk-(?:proj-)?[a-z]{20}|sk-ant-[a-z]{20}", {"sk-"}),  # "sk-proj-" begins with "sk-"
    ],
)
def test_required_prefixes(pattern: str, prefixes: set[str]) -> None:
    assert required_prefixes(pattern) == prefixes
    assert all(len(prefix) <= MAX_LENGTH for prefix in prefixes)


@pytest.mark.parametrize(
    "pattern",
    [
        r"[a-z]+-token",  # no literal start
        r"a?b",  # optional first character
        r".secret",
        r"(?i)sk-[a-z]{20}",  # case-insensitive: the literal would be wrong
        r"key-(?i:abc)",
        r"sk-{e<=1}[a-z]{20}",  # regex's fuzzy matching: "sx-..." matches too
        r"(?:sk-){e<=1}abc",
        r"\p{L}key",  # regex-only syntax
        r"[[:alpha:]]key",
        r"(?|(a)|(b))c",
        r"x|y+|[0-9]z",
    ],
)
def test_no_prefix_when_the_start_is_not_certain(pattern: str) -> None:
    regex.compile(pattern)  # valid for the regex module, which runs them
    assert required_prefixes(pattern) is None


def test_fuzzy_matching_really_escapes_the_literal() -> None:
    """Why a brace that is not a count gives up: regex matches what the standard
    parser would read as the literal "sk-{e<=1}"."""
    assert regex.fullmatch(r"(?:sk-){e<=1}abc", "sx-abc") is not None


def test_minimal_drops_literals_that_begin_with_another() -> None:
    assert minimal(["sk-proj-", "sk-", "sk-ant-", "AKIA"]) == {"sk-", "AKIA"}


@pytest.mark.parametrize(
    "literals",
    [
        DEFAULT_PATTERNS_LITERALS,
        ("sk-", "sk-proj-", "AKIA", "ab", "a"),  # words that begin others
        ("a.b", "a*", "(x)", "\\d"),  # regex syntax, to be escaped
    ],
)
def test_the_literal_prefilter_finds_exactly_the_literals(literals: tuple[str, ...]) -> None:
    """``SecretPattern`` searches for its literals as one trie-shaped regex: it must find
    a literal exactly where a plain alternation of them does, no more, no less."""
    plain = re.compile("|".join(map(re.escape, literals)))
    trie = re.compile(_trie(literals))
    alphabet = "".join(sorted(set("".join(literals)))) + " zQ-_"
    rng = random.Random(7)
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))
        assert (trie.search(text) is None) == (plain.search(text) is None), text
    for literal in literals:
        assert trie.search(f"x{literal}y") is not None
