"""Leaked-secret detection: keeps API keys and private keys out of requests and answers.

Before the backend, a secret anywhere in the request (any string of the body, any object
key, the path, the query, a header) blocks it (403) or is redacted. After it, a secret in
the response, streamed too and split across chunks in any way, never reaches the client:
the scanner holds back only the text that could still be the start of a secret (the
regex module's partial matching says exactly how much), and scans every character once,
plus that bounded tail.
"""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal
from urllib.parse import unquote

import orjson
import regex

from luthien_control.dialects.base import Dialect, TextSlot, joined_slots
from luthien_control.policies.backend import CLIENT_KEY_HEADERS, sent_keys
from luthien_control.policies.base import BlockingConfig, Policy, RegexPattern
from luthien_control.policies.literals import minimal, required_prefixes
from luthien_control.policies.text import TextRewriter, TextStream
from luthien_control.transaction import Message, ProxyRequest, StreamTransform, Transaction

REDACTED = "[REDACTED]"
_ASCII_LETTERS = frozenset(string.ascii_letters)

# Name → pattern. Names appear in decisions and error messages; the secret never does.
#
# A key whose prefix is distinctive (sk-proj-, sk-ant-api03-, AKIA, ghp_, xoxb-, xapp-1-,
# AIza, glpat-, ...) is found whatever comes before it, a word included: no word ends in
# those. Two prefixes are generic, and keep a word-boundary rule (``_START``): the bare
# ``sk-`` of legacy OpenAI keys ("task-list-for-the-quarterly-report" would otherwise be
# a key) and ``sk-ant-<letters>-`` without a version number ("ask-ant-colony-...").
# After ``_START`` a key never follows an ASCII letter, unless that letter ends an escape
# or a terminal code: URL encoding (%0Ask-...), JSON in JSON text (\nsk-..., \u004Bsk-...)
# or an ANSI colour code (\x1b[31msk-...).
_START = (
    r"(?:(?<![A-Za-z])|(?<=%[0-9A-Fa-f]{2})|(?<=\\[nrtbf])|(?<=\\u[0-9A-Fa-f]{4})"
    r"|(?<=\x1b\[[0-9;?]{0,16}[A-Za-z]))"
)
# The body of a PEM or PGP private key, up to its END line: base64, whitespace, armour
# headers ("Proc-Type: 4,ENCRYPTED", "Version: ..."), and the escapes of JSON text.
_KEY_BODY = (
    r"(?:(?:(?<=\n)|(?<=\\n))[A-Za-z][A-Za-z0-9-]*+: [^\r\n\\]*+"
    r"|[A-Za-z0-9+/=]++|\s++|\\++[nrt/])*+"
)
DEFAULT_PATTERNS: dict[str, str] = {
    "anthropic_api_key": (
        r"(?:sk-ant-[a-z]{2,8}\d{1,3}-|" + _START + r"sk-ant-[a-z]{2,8}-)[A-Za-z0-9_-]{20,}"
    ),
    "openai_api_key": (r"(?:sk-(?:proj|svcacct|admin)-|" + _START + r"sk-)[A-Za-z0-9_-]{20,}"),
    "aws_access_key_id": r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b",
    "github_token": r"(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
    # Not "xoxo-" (a sign-off, not a token type).
    "slack_token": r"xox[abeprs]-[0-9][A-Za-z0-9-]{9,}",
    "slack_app_token": r"xapp-[0-9]+-[A-Za-z0-9-]{10,}",
    "google_api_key": r"AIza[0-9A-Za-z_-]{35}",
    "gitlab_token": r"glpat-[A-Za-z0-9_-]{20,}",
    # The whole block: header, body and END line (header and body when the END is not
    # there, as in a key cut short).
    "pgp_private_key": (
        r"-----BEGIN PGP PRIVATE KEY BLOCK-----"
        + _KEY_BODY
        + r"(?:-----END PGP PRIVATE KEY BLOCK-----)?+"
    ),
    "private_key": (
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
        + _KEY_BODY
        + r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----)?+"
    ),
}
# What a lookbehind may need to see before a match (``_START``: an ANSI code).
LOOKBEHIND_CHARS = 24
_MAX_SCRUBS = 32  # rounds of ``SecretPattern.scrub``: more means the text never settles
# The name of the literal secrets of a transaction (``SecretPattern.with_literals``).
LITERAL_KIND = "backend_key"
_MAX_LITERAL_SETS = 64  # sets of literals compiled and kept, per set of patterns
# A header value (or path, or query) is also checked decoded, this many times over:
# "%2573k-..." is "%73k-..." once decoded, and "sk-..." twice.
PERCENT_DECODINGS = 3


def default_secrets() -> SecretPattern:
    return SecretPattern(DEFAULT_PATTERNS)


def derived_literals(patterns: Iterable[str]) -> tuple[str, ...] | None:
    """The prefilter of a set of patterns: strings one of which begins every match of
    every pattern (``required_prefixes``), or ``None`` (always scan) when one pattern
    has none."""
    found: set[str] = set()
    for pattern in patterns:
        prefixes = required_prefixes(pattern)
        if prefixes is None:
            return None
        found |= prefixes
    return tuple(sorted(minimal(found))) or None


_ANSI_END = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]\Z")
_ANSI_PARAMETERS = frozenset("0123456789;?[")  # what comes before an ANSI code's letter


def _key_may_start(before: str, text: str, cut: int) -> bool:
    """Whether a key is likely to start at ``text[cut:]`` (``before`` came just before
    ``text``): what the scanner holds back. A tail it releases (after a letter) is still
    watched: a key glued to it is caught when the rest comes (``SecretScanner``), with
    the few characters of its public prefix already out."""
    if text[cut] not in _ASCII_LETTERS:
        return True
    last = text[cut - 3 : cut] if cut >= 3 else (before[-3:] + text[:cut])[-3:]
    if not last or last[-1] not in _ASCII_LETTERS:
        return True
    # A letter that ends an escape (%0A, \n) or a terminal code (\x1b[31m) does not count.
    if (len(last) == 3 and last[0] == "%") or last[-2:-1] == "\\":
        return True
    if len(last) < 2 or last[-2] not in _ANSI_PARAMETERS:
        return False  # the usual case: a letter after a letter
    preceding = text[max(0, cut - LOOKBEHIND_CHARS) : cut]
    if len(preceding) < LOOKBEHIND_CHARS:
        preceding = before[max(0, len(before) - LOOKBEHIND_CHARS + len(preceding)) :] + preceding
    return _ANSI_END.search(preceding) is not None


def _trie(words: Iterable[str]) -> str:
    """A regex matching exactly ``words`` (one of them at the point of the match), as a
    trie of alternatives sharing their prefixes."""
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}  # a word ends here

    def branches(node: dict[str, Any]) -> str:
        alternatives = [
            re.escape(char) + branches(rest) for char, rest in sorted(node.items()) if char
        ]
        if not alternatives:
            return ""
        group = alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"
        if "" in node:  # a word ends before the longer ones: they are optional
            return f"(?:{group})?"
        return group

    return branches(root)


class SecretPattern:
    """All patterns as one regex with a named group each, compiled once, and the literal
    prefilter derived from them.

    ``literals`` are strings one of which every match starts with: text that contains
    none of them holds no secret, and only a tail that begins one of them could still
    become one. Checking them (C substring search) spares the regex on most text. They
    are ``None`` when a pattern has no literal start: the regex then runs on all text.
    """

    def __init__(self, patterns: dict[str, str]) -> None:
        self.patterns = dict(patterns)
        self.names = list(patterns)
        self._with: dict[tuple[str, ...], SecretPattern] = {}
        joined = "|".join(f"(?P<p{i}>{p})" for i, p in enumerate(patterns.values()))
        self.regex = regex.compile(joined)
        literals = self.literals = derived_literals(patterns.values())
        self._prefixes = frozenset(
            literal[:size] for literal in literals or () for size in range(1, len(literal))
        )
        self._first = frozenset(literal[0] for literal in literals or ())
        # One search for any literal, written as a trie (``sk-|x(?:app-|ox[...]-)``): the
        # engine tries one branch per first character instead of every literal in turn.
        any_literal = _trie(literals) if literals else None
        self._any_literal = re.compile(any_literal) if any_literal else None
        self._any_literal_bytes = re.compile(any_literal.encode()) if any_literal else None
        # A literal with a character JSON escapes can hide behind any escape, not only \u.
        self._json_escapable = any(
            char in '"\\/' or char < " " for literal in literals or () for char in literal
        )
        self._longest = max(map(len, literals or ("",)))
        # The released text the stream scanner keeps: enough for a lookbehind, and for
        # the start of a literal that a later piece may complete.
        self.context_chars = self._longest + LOOKBEHIND_CHARS
        # A prefix of a literal at the very end of a text: the start of a secret that the
        # next piece could complete (searched only over the last characters).
        self._tail = (
            re.compile(
                "(?:"
                + "|".join(map(re.escape, sorted(self._prefixes, key=len, reverse=True)))
                + r")\Z"
            )
            if self._prefixes
            else None
        )

    def with_literals(self, literals: Iterable[str]) -> SecretPattern:
        """These patterns and ``literals`` (strings that are secrets whatever their
        shape: the keys the proxy itself sends the backend), as one more pattern
        (``LITERAL_KIND``) scanned by the same machinery, prefilter included. Compiled
        once per set of literals (most transactions share the same few keys)."""
        key = tuple(sorted(set(literals), key=lambda text: (-len(text), text)))
        if not key:
            return self
        extended = self._with.get(key)
        if extended is None:
            if len(self._with) >= _MAX_LITERAL_SETS:
                self._with.clear()
            alternatives = "|".join(regex.escape(text) for text in key)
            patterns = {**self.patterns, LITERAL_KIND: f"(?:{alternatives})"}
            extended = self._with[key] = SecretPattern(patterns)
        return extended

    def kind(self, match: Any) -> str:
        group = match.lastgroup
        return self.names[int(group[1:])] if group else "secret"

    def is_quiet(self, text: str) -> bool:
        """True only when ``text`` holds no literal and does not end in the start of one:
        it can neither hold a secret nor begin one (two C searches, the second over the
        last few characters only)."""
        if self._any_literal is None or self._any_literal.search(text) is not None:
            return False
        return (
            self._tail is None
            or self._tail.search(text, max(0, len(text) - self._longest + 1)) is None
        )

    def may_contain(self, text: str) -> bool:
        """False only when ``text`` certainly holds no (complete) secret."""
        return self._any_literal is None or self._any_literal.search(text) is not None

    def may_contain_json(self, body: bytes) -> bool:
        """False only when no string (or object key) of the JSON (or text) ``body`` can
        hold a secret: none of the literals is in its bytes, and no escape could spell
        one (a ``\\u`` escape any character; the others only ``"``, ``\\``, ``/`` and
        control characters)."""
        return (
            self._any_literal_bytes is None
            or b"\\u" in body
            or (self._json_escapable and b"\\" in body)
            or self._any_literal_bytes.search(body) is not None
            # Logprobs spell text as byte values (byte_arrays): the key, however spaced.
            or b'"bytes"' in body
        )

    def tail(self, text: str) -> int:
        """How many final characters of ``text`` are the start of a literal (the longest
        such ending; 0 when none)."""
        first, prefixes = self._first, self._prefixes
        for size in range(min(len(text), self._longest - 1), 0, -1):
            if text[-size] in first and text[-size:] in prefixes:
                return size
        return 0

    def search(self, text: str) -> Any:
        return self.regex.search(text) if self.may_contain(text) else None

    def scrub(self, text: str) -> str:
        """``text`` with every secret replaced, for what is stored or logged. When a key
        shows only once ``text`` is decoded (a URL's percent escapes, JSON escapes in JSON
        text: ``field_forms``), the decoded text, redacted; again on what that gives until
        nothing changes, so that a second key one decoding deeper than the first
        (``%73k-...`` beside ``%2573k-...``) is not left in it. Each round that changes
        the text shortens it (a key becomes ``[REDACTED]``, escapes are undone); past
        ``_MAX_SCRUBS`` rounds nothing of it is kept."""
        for _ in range(_MAX_SCRUBS):
            cleaned = self._scrub_once(text)
            if cleaned == text:
                return text
            text = cleaned
        return REDACTED

    def _scrub_once(self, text: str) -> str:
        redacted = self.redact(text)[0]
        if "%" not in redacted and "\\" not in redacted:
            return redacted
        for decoded in itertools.islice(field_forms(redacted), 1, None):
            cleaned = self.redact(decoded)[0]
            if cleaned != decoded:
                return cleaned
        return redacted

    def redact(self, text: str) -> tuple[str, list[str]]:
        if not self.may_contain(text):
            return text, []
        found: list[str] = []

        def replace(match: Any) -> str:
            found.append(self.kind(match))
            return REDACTED

        return self.regex.sub(replace, text), found


def _is_byte_array(item: list[Any]) -> bool:
    return len(item) > 2 and all(type(b) is int and 0 <= b < 256 for b in item)


def byte_arrays(value: Any) -> list[tuple[list[Any], str]]:
    """Arrays of byte values inside a JSON value (a logprobs entry's ``bytes``), with the
    text they spell: a client decodes them (no recursion)."""
    out: list[tuple[list[Any], str]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            if _is_byte_array(item):
                out.append((item, bytes(item).decode("utf-8", "replace")))
            else:
                stack.extend(item)
    return out


def joined_secrets(secrets: SecretPattern, group: list[TextSlot], *, redact: bool) -> list[str]:
    """The secrets in the text that the strings of ``group`` spell together (the parts
    of one message, read as one text), as kinds; with ``redact``, each is taken out of
    the strings that hold its pieces, ``[REDACTED]`` where it begins, so that neither
    the joined text nor any string still spells it."""
    texts = [slot.text for slot in group]
    joined = "".join(texts)
    if not secrets.may_contain(joined):
        return []
    matches = list(secrets.regex.finditer(joined))
    if not matches or not redact:
        return [secrets.kind(match) for match in matches]
    start = 0
    for slot, text in zip(group, texts, strict=True):
        end = start + len(text)
        pieces: list[str] = []
        position = start
        for match in matches:
            if match.end() <= position or match.start() >= end:
                continue
            pieces.append(joined[position : max(match.start(), position)])
            if match.start() >= start:  # it begins here
                pieces.append(REDACTED)
            position = min(match.end(), end)
        if position != start or pieces:
            pieces.append(joined[position:end])
            slot.set("".join(pieces))
        start = end
    return [secrets.kind(match) for match in matches]


def json_strings(value: Any) -> list[str]:
    """Every string of a JSON value, object keys included, at any depth (no recursion)."""
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            out.extend(key for key in item if isinstance(key, str))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


def rewrite_json(value: Any, rewrite: Callable[[str], str]) -> tuple[Any, bool]:
    """Apply ``rewrite`` to every string of a JSON value and to every object key, in
    place, at any depth (no recursion); returns (the value, whether anything changed).
    A renamed key keeps its place; two keys renamed alike keep the later value. An array
    of byte values (logprobs' ``bytes``) is rewritten as the text it spells."""
    if isinstance(value, str):
        new = rewrite(value)
        return new, new != value
    changed = False
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            renamed: dict[str, str] = {}
            for key, child in item.items():
                if isinstance(child, str):
                    new = rewrite(child)
                    if new != child:
                        item[key] = new  # same key: allowed while iterating
                        changed = True
                elif isinstance(child, (dict, list)):
                    stack.append(child)
                if isinstance(key, str) and (new_key := rewrite(key)) != key:
                    renamed[key] = new_key
            if renamed:
                entries = [(renamed.get(key, key), child) for key, child in item.items()]
                item.clear()
                item.update(entries)
                changed = True
        elif isinstance(item, list):
            if _is_byte_array(item):
                text = bytes(item).decode("utf-8", "replace")
                if (new := rewrite(text)) != text:
                    item[:] = list(new.encode())
                    changed = True
                continue
            for index, child in enumerate(item):
                if isinstance(child, str):
                    new = rewrite(child)
                    if new != child:
                        item[index] = new
                        changed = True
                elif isinstance(child, (dict, list)):
                    stack.append(child)
    return value, changed


def copy_json(value: Any) -> Any:
    """A copy of a JSON value, every object and array copied, at any depth (no
    recursion): something to redact without touching the original."""
    if not isinstance(value, (dict, list)):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack = [(value, root)]
    while stack:
        source, target = stack.pop()
        children = source.items() if isinstance(source, dict) else enumerate(source)
        for key, child in children:
            if isinstance(child, (dict, list)):
                copied: Any = {} if isinstance(child, dict) else []
                stack.append((child, copied))
                child = copied
            if isinstance(target, dict):
                target[key] = child
            else:
                target.append(child)
    return root


def percent_decodings(text: str) -> Iterator[str]:
    """``text`` percent-decoded, once and again (up to ``PERCENT_DECODINGS`` times), each
    form that differs from the one before."""
    for _ in range(PERCENT_DECODINGS):
        if "%" not in text:
            return
        decoded = unquote(text)
        if decoded == text:
            return
        yield decoded
        text = decoded


_JSON_ESCAPE = re.compile(r"\\(?:u([0-9A-Fa-f]{4})|([\\/\"bfnrt]))")
_JSON_CHARS = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _json_unescape(match: re.Match[str]) -> str:
    code, char = match.groups()
    return chr(int(code, 16)) if code else _JSON_CHARS.get(char, char)


def field_forms(text: str) -> Iterator[str]:
    """``text`` and what it says once its escapes are undone: percent-decoded (once and
    again), and JSON string escapes (``\\u0073k-...``) in any of those forms. A header,
    a path or a query is opaque to the proxy but not to the backend."""
    yield text
    forms = [text, *percent_decodings(text)]
    yield from forms[1:]
    for form in forms:
        if "\\" in form:
            unescaped = _JSON_ESCAPE.sub(_json_unescape, form)
            if unescaped != form:
                yield unescaped


def request_fields(request: ProxyRequest) -> list[tuple[str, str]]:
    """What a request carries besides its body, as (where, text): the path, the query
    and every header (name and value) but the credential headers the proxy never
    forwards (they carry the client's own key)."""
    fields = [("request path", request.path)]
    if request.query:
        fields.append(("request query", request.query.decode("latin-1")))
    fields.extend(
        ("request headers", text)
        for name, value in request.headers.items()
        if name not in CLIENT_KEY_HEADERS
        for text in (name, value)
    )
    return fields


class SecretScanner:
    """One text channel of a stream: releases text only once it cannot start a secret.

    A few characters that could begin a key but follow a letter (the ``s`` that ends
    ``Thanks``) are released all the same, and remembered (``_open``): when the next
    piece completes a key glued to them, the key is caught there, its public prefix
    already out."""

    __slots__ = ("_before", "_context", "_held", "_limit", "_open", "_policy", "_secrets", "_tx")

    def __init__(
        self,
        policy: LeakedApiKeyDetection,
        tx: Transaction,
        secrets: SecretPattern | None = None,
    ) -> None:
        self._policy = policy
        self._secrets = secrets or policy.secrets
        self._context = self._secrets.context_chars
        self._limit = 2 * self._context
        self._tx = tx
        self._held = ""
        self._before = ""  # the last characters released: what lookbehinds see
        self._open = 0  # how many of them could begin a key that the next piece ends

    def feed(self, text: str) -> str:
        if self._held:
            text = self._held + text
            self._held = ""
        opened = self._open
        if self._secrets.is_quiet(self._before[-opened:] + text if opened else text):
            # The usual piece: out as it came.
            if opened:
                self._open = 0
            if text:
                before = self._before + text
                # Cut now and then, not at every piece: it grows to twice the context.
                self._before = before[-self._context :] if len(before) > self._limit else before
            return text
        return self._scan(text, final=False)

    @property
    def holding(self) -> bool:
        """Text is held back (a part that ends now may go on in the next one)."""
        return bool(self._held)

    def flush(self) -> str:
        held, self._held = self._held, ""
        if not held:
            return ""
        released = self._scan(held, final=True)
        # A part of a joined text ended: the start of a key it released may still be
        # completed by the next part (the scanner goes on there), so it stays watched.
        self._open = self._partial_tail()
        return released

    def _partial_tail(self) -> int:
        """How many of the last released characters begin a key not yet complete."""
        before = self._before
        for match in self._secrets.regex.finditer(before, 0, partial=True):
            if match.partial:
                return len(before) - int(match.start())
        return 0

    def flush_held(self) -> str:
        """What is held back, as it is, without scanning or releasing it (the caller
        takes it over)."""
        held, self._held = self._held, ""
        self._open = 0
        return held

    def _scan(self, text: str, *, final: bool) -> str:
        released = self._release(text, final=final)
        if released:
            before = self._before + released
            self._before = before[-self._context :] if len(before) > self._limit else before
        return released

    def _release(self, text: str, *, final: bool) -> str:
        secrets = self._secrets
        before, opened = self._before, self._open
        probe = before[len(before) - opened :] + text if opened else text
        if secrets.literals is not None and not secrets.may_contain(probe):
            size = 0 if final else secrets.tail(probe)
            cut = len(text) - size
            if size and cut >= 0 and _key_may_start(before, text, cut):
                self._open = 0
                self._held = text[cut:]
                return text[:cut]
            self._open = size  # released (it may have begun in what was released before)
            return text
        # The regex sees the released text before ``text`` too: for its lookbehinds, and
        # for a key that begins in the characters released open.
        text = before + text
        out: list[str] = []
        position = len(before)
        hold_from = len(text)
        self._open = 0
        for match in secrets.regex.finditer(text, position - opened, partial=not final):
            if match.partial or (
                not final
                and self._policy.action == "redact"
                # a complete secret that more text could extend
                and secrets.regex.fullmatch(text, match.start(), partial=True) is not None
            ):
                hold_from = max(match.start(), position)
                self._open = max(0, position - match.start())
                break
            if match.end() <= position:
                continue  # within what was released (and found no key then)
            self._policy.found(self._tx, secrets.kind(match), where="response")
            out.append(text[position : match.start()])
            out.append(REDACTED)
            position = max(position, match.end())
        out.append(text[position:hold_from])
        self._held = text[hold_from:]
        return "".join(out)


class LeakedApiKeyDetection(Policy):
    """Blocks (or redacts) secrets in the request or the response, by its position."""

    type_name = "LeakedApiKeyDetection"

    class Config(BlockingConfig):
        patterns: list[RegexPattern] | None = None
        action: Literal["block", "redact"] = "block"

    def __init__(self, config: Config, raw_config: dict[str, Any]) -> None:
        super().__init__(config, raw_config)
        self.action = config.action
        self.custom_patterns = list(config.patterns or ())
        if config.patterns is None:
            self.secrets = default_secrets()
        else:
            self.secrets = SecretPattern({f"pattern {i}": p for i, p in enumerate(config.patterns)})

    def found(self, tx: Transaction, kind: str, *, where: str, block: bool = False) -> None:
        """Record a secret; raise ``PolicyBlocked`` when the action is ``block`` (or
        ``block`` is set: a secret where nothing can be redacted)."""
        blocking = block or self.action == "block"
        tx.record(self.name, "blocked" if blocking else "redacted", f"{kind} in the {where}")
        if blocking:
            verb = "contain" if where.endswith("headers") else "contains"
            raise self.refuse(f"blocked by {self.name}: the {where} {verb} a secret ({kind})")

    def transaction_secrets(self, tx: Transaction) -> SecretPattern:
        """What an answer is scanned for: the patterns, and the keys the proxy itself
        sent the backend in this transaction (``sent_keys``), literal secrets whatever
        their shape."""
        return self.secrets.with_literals(sent_keys(tx))

    async def on_request(self, tx: Transaction) -> None:
        request = tx.request
        self._check_fields(tx, request_fields(request), self.secrets)
        self._check_message(tx, request, self.secrets, where="request")

    async def on_response(self, tx: Transaction) -> None:
        response = tx.response
        assert response is not None
        secrets = self.transaction_secrets(tx)
        self._check_response_headers(tx, secrets)
        self._check_message(tx, response, secrets, where="response")

    def _check_response_headers(self, tx: Transaction, secrets: SecretPattern) -> None:
        if tx.response is None:
            return
        headers = tx.response.headers
        self._check_fields(
            tx,
            [
                ("response headers", text)
                for name, value in headers.items()
                for text in (name, value)
            ],
            secrets,
        )

    def _check_fields(
        self, tx: Transaction, fields: list[tuple[str, str]], secrets: SecretPattern
    ) -> None:
        """Headers, the path, the query: a secret there blocks, even with ``redact`` (a
        path or a header cannot be meaningfully redacted). Each is also checked
        decoded (``field_forms``)."""
        joined = "\n".join(text for _, text in fields)
        if "%" not in joined and "\\" not in joined and not secrets.may_contain(joined):
            return  # one C search (and two character checks) for all of them
        for where, text in fields:
            for form in field_forms(text):
                if (match := secrets.search(form)) is not None:
                    self.found(tx, secrets.kind(match), where=where, block=True)

    def _check_message(
        self, tx: Transaction, message: Message, secrets: SecretPattern, *, where: str
    ) -> None:
        # One C search over the bytes instead of a walk over every string.
        if secrets.may_contain_json(message.body):
            payload = message.payload
            if payload is None:
                text = message.body.decode("utf-8", "replace")
                text, changed = self.scan_value(tx, text, where, secrets)
                if changed:
                    message.set_body(text.encode())
                return
            if self.scan_value(tx, payload, where, secrets)[1]:
                message.mark_changed()
        self._check_joined(tx, message, secrets, where=where)

    def _check_joined(
        self, tx: Transaction, message: Message, secrets: SecretPattern, *, where: str
    ) -> None:
        """The strings a client (or the model) reads as one text, joined: the parts of a
        message, the text blocks or output text of an answer (``TextSlot.joins``). A key
        split across them is no less a key (no literal need show in any one of them)."""
        payload = message.payload
        if not isinstance(payload, dict | list):
            return
        dialect = tx.dialect
        slots = (
            dialect.request_slots(payload) if where == "request" else dialect.answer_slots(payload)
        )
        changed = False
        for group in joined_slots(slots):
            kinds = joined_secrets(secrets, group, redact=self.action == "redact")
            for kind in kinds:
                self.found(tx, kind, where=where)
            changed = changed or bool(kinds)
        if changed:
            message.mark_changed()

    def scan_value(
        self, tx: Transaction, value: Any, where: str, secrets: SecretPattern | None = None
    ) -> tuple[Any, bool]:
        """Check every string and object key of a JSON value; block, or redact in place
        (→ changed). A string is also read with its JSON escapes undone: tool-call
        arguments are JSON text, and ``\\u0073k-...`` in them is a key to the client."""
        secrets = secrets or self.secrets
        if self.action == "block":
            for _, text in byte_arrays(value):  # what the client decodes them to
                if (match := secrets.search(text)) is not None:
                    self.found(tx, secrets.kind(match), where=where)
            for text in json_strings(value):
                match = secrets.search(text)
                if match is None and "\\" in text:
                    match = secrets.search(_JSON_ESCAPE.sub(_json_unescape, text))
                if match is not None:
                    self.found(tx, secrets.kind(match), where=where)
            return value, False
        kinds: list[str] = []

        def redact(text: str) -> str:
            new_text, found = secrets.redact(text)
            kinds.extend(found)
            if "\\" in new_text:
                new_text = self._redact_escaped(tx, new_text, where, secrets)
            return new_text

        value, changed = rewrite_json(value, redact)
        for kind in kinds:
            self.found(tx, kind, where=where)
        return value, changed

    def _redact_escaped(
        self, tx: Transaction, text: str, where: str, secrets: SecretPattern
    ) -> str:
        """``text`` holds JSON escapes: a key they spell is redacted in the decoded JSON
        (then written again), or, when ``text`` is not JSON, the whole text is."""
        if secrets.search(_JSON_ESCAPE.sub(_json_unescape, text)) is None:
            return text
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.found(tx, "escaped secret", where=where)
            return REDACTED
        value, changed = self.scan_value(tx, parsed, where, secrets)
        return orjson.dumps(value).decode() if changed else text

    def stream_transform(self, tx: Transaction) -> StreamTransform:
        stream = _SecretStream(self, tx)
        # The headers go out with the first event: checked now, a block is still a 403.
        self._check_response_headers(tx, stream.secrets)
        return stream


_STRING_BODY = re.compile(r'(?:[^"\\]|\\.)*')  # a JSON string's body, escapes whole
_PLAIN_BODY = re.compile(r'[^"\\]*')  # a JSON string's body up to a quote or an escape


class _ArgumentsScanner:
    """A tool call's arguments as they stream: JSON text, whose string literals the
    client reads decoded. Text flows through a ``SecretScanner`` as usual; a string
    literal with an escape in it (``\\u0073k-...`` can spell a key) is held from its
    first escape to its closing quote, then decoded, scanned, and written again with
    any secret redacted. Hold-back stays bounded by one string literal."""

    __slots__ = ("_escape", "_hold", "_in_string", "_plain", "_policy", "_secrets", "_tx")

    def __init__(
        self,
        policy: LeakedApiKeyDetection,
        tx: Transaction,
        secrets: SecretPattern | None = None,
    ) -> None:
        self._secrets = secrets or policy.secrets
        self._plain = SecretScanner(policy, tx, self._secrets)
        self._policy = policy
        self._tx = tx
        self._in_string = False
        self._hold: list[str] | None = None  # a literal's raw text, from its first escape
        self._escape = False  # the held text ends with a backslash still to be paired

    def feed(self, text: str) -> str:
        out: list[str] = []
        plain = self._plain
        while text:
            if self._hold is not None:
                start = 1 if self._escape and text else 0
                end = _STRING_BODY.match(text, start).end()  # type: ignore[union-attr]
                if end < len(text) and text[end] == '"':
                    self._hold.append(text[:end])
                    out.append(self._close())
                    out.append('"')
                    self._in_string = False
                    text = text[end + 1 :]
                    continue
                self._hold.append(text)
                self._escape = text.endswith("\\") and end < len(text)
                break
            if self._in_string:
                end = _PLAIN_BODY.match(text).end()  # type: ignore[union-attr]
                out.append(plain.feed(text[:end]))
                if end == len(text):
                    break
                if text[end] == '"':
                    out.append(plain.flush())  # a key does not run across two strings
                    out.append('"')
                    self._in_string = False
                    text = text[end + 1 :]
                else:  # an escape: hold the rest of this literal, and what was held of it
                    self._hold = [plain.flush_held()]
                    self._escape = False
                    text = text[end:]
                continue
            quote = text.find('"')
            if quote < 0:
                out.append(plain.feed(text))
                break
            out.append(plain.feed(text[: quote + 1]))
            self._in_string = True
            text = text[quote + 1 :]
        return "".join(out)

    def flush(self) -> str:
        if self._hold is not None:  # the arguments ended inside a literal
            return self._close()
        return self._plain.flush()

    def _close(self) -> str:
        """The held part of a literal, decoded and scanned, written again."""
        assert self._hold is not None
        raw, self._hold = "".join(self._hold), None
        self._escape = False
        decoded = _JSON_ESCAPE.sub(_json_unescape, raw)
        redacted, kinds = self._secrets.redact(decoded)
        if not kinds:
            return raw
        for kind in kinds:
            self._policy.found(self._tx, kind, where="response")
        return orjson.dumps(redacted).decode()[1:-1]


class _SecretStream(TextStream):
    """The dialect's text channels scanned across events; every other string and key of
    an event (tool names, item fields, errors, logprobs) scanned within the event, after
    the text its channels held back has been released."""

    def __init__(self, policy: LeakedApiKeyDetection, tx: Transaction) -> None:
        # The parts of one text (Dialect.joins) are scanned as one text, as it is read.
        super().__init__(lambda: SecretScanner(policy, tx), tx.dialect, joined=True)
        self._policy = policy
        self._tx = tx
        self.secrets = policy.transaction_secrets(tx)
        # The dialect's events may repeat the answer whole (Dialect.event_answer).
        self._answers = type(tx.dialect).event_answer is not Dialect.event_answer

    def _repeats_answer(self, data: dict[str, Any]) -> bool:
        return self._tx.dialect.event_answer(data) is not None

    def new_rewriter(self, kind: str) -> TextRewriter:
        if kind == "arguments":
            return _ArgumentsScanner(self._policy, self._tx, self.secrets)
        return SecretScanner(self._policy, self._tx, self.secrets)

    async def on_chunk(self, chunk: Any) -> list[Any]:
        # One C search over the event's bytes: without a key literal (or an escape that
        # could spell one) only a channel can hold the start of a secret.
        whole = self.secrets.may_contain_json(chunk.raw)
        if whole:
            self._check_lines(chunk.raw)
        data = chunk.data
        if not isinstance(data, dict):  # an array, a string, a number: no channels
            self._scan_whole(chunk)
            return [chunk]
        out = self.on_data(chunk, data)
        for event in out:
            # Events the dialect wrote (held text released) copy fields of other
            # events (an item id, the first event's model), and events that waited:
            # scanned as well; so is an event that repeats the answer whole.
            if event is not chunk or whole or (self._answers and self._repeats_answer(data)):
                self._scan_whole(event)
        return out

    async def on_end(self) -> list[Any]:
        out = await super().on_end()
        for event in out:
            self._scan_whole(event)
        return out

    def _check_lines(self, raw: bytes) -> None:
        """The event's lines other than ``data:`` (``id:``, ``event:``, ``retry:``, a
        comment) go out as they came, even when the event is rewritten: a secret there
        blocks (a line cannot be redacted and stay what it was)."""
        for line in raw.splitlines():
            if line and not line.startswith(b"data:"):
                text = line.decode("utf-8", "replace")
                for form in field_forms(text):
                    if (match := self.secrets.search(form)) is not None:
                        kind = self.secrets.kind(match)
                        self._policy.found(self._tx, kind, where="response", block=True)

    def _scan_whole(self, chunk: Any) -> None:
        """Every string and key of one event, within it (channels already scanned); and
        the answer an event repeats whole (``Dialect.event_answer``), its parts joined."""
        data = chunk.data
        if data is None:
            return
        changed = False
        if self.secrets.may_contain_json(chunk.raw):
            data, changed = self._policy.scan_value(self._tx, data, "response", self.secrets)
        dialect = self._tx.dialect
        answer = dialect.event_answer(data) if isinstance(data, dict) else None
        if answer is not None:  # no literal need show in any one part: joined first
            redact = self._policy.action == "redact"
            for group in joined_slots(dialect.answer_slots(answer)):
                kinds = joined_secrets(self.secrets, group, redact=redact)
                for kind in kinds:
                    self._policy.found(self._tx, kind, where="response")
                changed = changed or bool(kinds)
        if changed:
            chunk.set_data(data)
