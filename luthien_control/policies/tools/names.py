# ruff: noqa: RUF001, RUF002, RUF003  (look-alike characters are this module's subject)
"""Tool names compared as a reader sees them, not as their code points spell them.

``normalise_name`` is applied to ``allowed_tools``, ``denied_tools`` and every call's
name before they are compared, so that ``Bash``, ``ｂａｓｈ`` (fullwidth), ``bаsh`` (a
Cyrillic ``а``), ``ba\u200bsh`` (a zero-width space) and ``ba\u00adsh`` (a soft hyphen)
all name ``bash``. The steps: default-ignorable code points removed (they render as
nothing), NFKC (compatibility forms: fullwidth, ligatures, styled letters), look-alike
letters of other scripts mapped to the Latin letter they imitate, case folding, and NFKC,
removal and mapping once more for what case folding produced (as Unicode's
NFKC_Casefold does).
"""

from __future__ import annotations

import re
import unicodedata

# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt; the same set in
# Unicode 14 to 17): code points that are not displayed, whatever the font. Soft hyphen,
# combining grapheme joiner, Arabic letter mark, Hangul fillers, Khmer inherent vowels,
# Mongolian variation selectors and vowel separator, zero-width space / non-joiner /
# joiner and the direction marks, the bidirectional embeddings and overrides, word
# joiner and the invisible operators and isolates, variation selectors, zero-width
# no-break space (the BOM), Shorthand format controls, musical beam and phrase marks,
# and the tag characters and variation selectors of plane 14.
_DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
_IGNORABLE = re.compile(
    "[" + "".join(f"\\U{start:08x}-\\U{end:08x}" for start, end in _DEFAULT_IGNORABLE) + "]"
)

# Letters of other scripts that look like a Latin letter, with that letter: the
# single-letter Latin targets of Unicode's confusables.txt (UTS #39) for Cyrillic and
# Greek, and three Latin look-alikes (ı, ɑ, ɡ). Case folding comes after, so a capital
# maps to the Latin capital it imitates; unlike confusables.txt, which maps the
# I-shaped capitals (Greek Ι, Cyrillic І and Ӏ) to ``l``, they map to ``I`` here because
# a Latin ``I`` folds to ``i`` too. Other scripts (Armenian, Cherokee, ...) and
# multi-letter look-alikes (Cyrillic Ы for ``bl``) are not mapped.
_LOOKALIKES = str.maketrans(
    {
        # Greek capitals
        "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M",
        "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X", "Ϳ": "J", "ϒ": "Y",
        "Ϝ": "F", "Ϲ": "C", "Ϻ": "M",
        # Greek small letters
        "α": "a", "γ": "y", "ι": "i", "ν": "v", "ο": "o", "ρ": "p", "σ": "o", "υ": "u",
        "ϱ": "p", "ϲ": "c", "ϳ": "j",
        # Cyrillic capitals
        "Ѕ": "S", "І": "I", "Ј": "J", "А": "A", "В": "B", "Е": "E", "З": "3", "К": "K",
        "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T", "У": "Y", "Х": "X",
        "Ь": "b", "Ѵ": "V", "Ү": "Y", "Ӏ": "I", "Ԍ": "G", "Ԝ": "W",
        # Cyrillic small letters (ӏ, the small palochka, is a bar: ``l``)
        "а": "a", "г": "r", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x",
        "ѕ": "s", "і": "i", "ј": "j", "ѡ": "w", "ѵ": "v", "ү": "y", "һ": "h", "ҽ": "e",
        "ӏ": "l", "ԁ": "d", "ԛ": "q", "ԝ": "w",
        # Latin look-alikes that NFKC leaves alone
        "ı": "i", "ɑ": "a", "ɡ": "g",
    }
)  # fmt: skip


def normalise_name(name: str) -> str:
    """``name`` as compared against ``allowed_tools`` and ``denied_tools``."""
    if name.isascii():  # nothing to remove, compose or map: only the case
        return name.lower()
    text = unicodedata.normalize("NFKC", _IGNORABLE.sub("", name))
    text = text.translate(_LOOKALIKES).casefold()
    text = _IGNORABLE.sub("", unicodedata.normalize("NFKC", text))
    return text.translate(_LOOKALIKES)
