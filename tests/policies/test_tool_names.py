"""Tool names compared after normalisation: what looks like a denied name is that name."""

# ruff: noqa: RUF001  (look-alike characters are what these tests are about)

from __future__ import annotations

import unicodedata

import pytest
import regex

from luthien_control.policies.tools.names import _DEFAULT_IGNORABLE, normalise_name

LOOK_ALIKES_OF_BASH = {
    "upper case": "BASH",
    "mixed case": "Bash",
    "fullwidth": "ｂａｓｈ",
    "Cyrillic а": "b\u0430sh",
    "Cyrillic capitals": "ВАЅН",
    "Cyrillic ѕ and һ": "ba\u0455\u04bb",
    "zero-width space": "ba\u200bsh",
    "zero-width joiner": "b\u200dash",
    "zero-width non-joiner": "bas\u200ch",
    "soft hyphen": "ba\u00adsh",
    "word joiner": "\u2060bash",
    "byte order mark": "\ufeffbash",
    "variation selector": "ba\ufe0fsh",
    "tag characters": "bash\U000e0062\U000e007f",
    "mathematical bold": "\U0001d41b\U0001d41a\U0001d42c\U0001d421",
    "several at once": "Ｂ\u0430\u00ad\u0405\u200bh",
}


@pytest.mark.parametrize("name", LOOK_ALIKES_OF_BASH.values(), ids=LOOK_ALIKES_OF_BASH.keys())
def test_look_alikes_normalise_to_the_plain_name(name: str) -> None:
    assert normalise_name(name) == "bash"


def test_greek_look_alikes() -> None:
    assert normalise_name("\u03bf\u03c1en") == "open"  # Greek omicron, rho
    assert normalise_name("ΚΕΥ") == "key"  # Greek capitals kappa, epsilon, upsilon
    assert normalise_name("\u0399nstall") == "install"  # Greek capital iota


def test_plain_names_keep_their_letters() -> None:
    assert normalise_name("read_file") == "read_file"
    assert normalise_name("get-weather.v2") == "get-weather.v2"
    assert normalise_name("") == ""
    assert normalise_name("café") == normalise_name("cafe\u0301")  # composed either way
    assert normalise_name("straße") == "strasse"  # case folding, not lower()
    assert normalise_name("日本語") == "日本語"


def test_the_ignorable_ranges_are_unicode_s_default_ignorable_code_points() -> None:
    """The explicit table holds exactly the set the regex module knows by name."""
    listed = {c for start, end in _DEFAULT_IGNORABLE for c in range(start, end + 1)}
    prop = regex.compile(r"\p{Default_Ignorable_Code_Point}")
    known = {c for c in range(0x110000) if prop.match(chr(c))}
    assert listed == known
    for code in sorted(listed)[::37]:
        assert normalise_name(f"ba{chr(code)}sh") == "bash", hex(code)


def test_normalising_twice_changes_nothing() -> None:
    for name in [*LOOK_ALIKES_OF_BASH.values(), "ǅ", "ﬀ", "\u1e9e", "ΐ", "\u3164x"]:
        once = normalise_name(name)
        assert normalise_name(once) == once
        assert unicodedata.is_normalized("NFKC", once)
