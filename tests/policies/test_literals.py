"""The literal prefixes read from a pattern: the prefilter of LeakedApiKeyDetection."""

from __future__ import annotations

import pytest
import regex

from luthien_control.policies.literals import MAX_LENGTH, minimal, required_prefixes


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
