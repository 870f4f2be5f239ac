"""Leaked-secret detection: keeps API keys and private keys out of requests and answers.

Before the backend, a secret anywhere in the request blocks it (403) or is redacted.
After it, a secret in the response, streamed too and split across chunks in any way,
never reaches the client: the scanner holds back only the text that could still be the
start of a secret (the regex module's partial matching says exactly how much), and scans
every character once, plus that bounded tail.
"""

from __future__ import annotations

import re
import string
from typing import Any, Literal

import regex

from luthien_control.exceptions import PolicyBlocked
from luthien_control.policies.base import Policy, PolicyConfig, RegexPattern
from luthien_control.policies.text import (
    RESPONSES_DELTAS,
    ChatTextStream,
    iter_strings,
    rewrite_strings,
)
from luthien_control.transaction import StreamTransform, Transaction

REDACTED = "[REDACTED]"
_ASCII_LETTERS = frozenset(string.ascii_letters)

# Name → pattern. Names appear in decisions and error messages; the secret never does.
# A key never follows a letter: the "s" that ends "Thanks" is not held back in case it
# begins "sk-...", while "%20sk-..." (URL-encoded) or "=sk-..." is still caught.
# A letter that ends an escape does not count: URL encoding (%0Ask-...) or JSON (\nsk-...).
_START = r"(?:(?<![A-Za-z])|(?<=%[0-9A-Fa-f]{2})|(?<=\\[nrtbf]))"
DEFAULT_PATTERNS: dict[str, str] = {
    "anthropic_api_key": _START + r"sk-ant-[a-z]{2,8}\d{0,3}-[A-Za-z0-9_-]{20,}",
    "openai_api_key": _START + r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
    "aws_access_key_id": _START + r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b",
    "github_token": _START + r"(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
    "slack_token": _START + r"xox[abposr]-[A-Za-z0-9-]{10,}",
    "google_api_key": _START + r"AIza[0-9A-Za-z_-]{35}",
    # The whole block when its END line is there, else the header and body.
    "private_key": (
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[A-Za-z0-9+/=\s]*+"
        r"(?:\\[nr][A-Za-z0-9+/=\s]*+)*+"  # a key inside JSON text: \n escapes
        r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----)?+"
    ),
}


# What every default pattern's match begins with (see SecretPattern).
DEFAULT_LITERALS = (
    "sk-",
    "AKIA",
    "ASIA",
    "ABIA",
    "ACCA",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "xox",
    "AIza",
    "-----BEGIN ",
)


def default_secrets() -> SecretPattern:
    return SecretPattern(DEFAULT_PATTERNS, DEFAULT_LITERALS)


def _key_may_start(preceding: str) -> bool:
    """Whether a key may start right after ``preceding`` (the rule of ``_START``)."""
    if not preceding or preceding[-1] not in _ASCII_LETTERS:
        return True
    return (len(preceding) >= 3 and preceding[-3] == "%") or preceding[-2:-1] == "\\"


class SecretPattern:
    """All patterns as one regex with a named group each, compiled once.

    ``literals``, when given, are strings every match starts with: text that contains
    none of them holds no secret, and only a tail that begins one of them could still
    become one. Checking them (C substring search) spares the regex on most text.
    """

    def __init__(self, patterns: dict[str, str], literals: tuple[str, ...] | None = None) -> None:
        self.names = list(patterns)
        joined = "|".join(f"(?P<p{i}>{p})" for i, p in enumerate(patterns.values()))
        self.regex = regex.compile(joined)
        self.literals = literals
        self._prefixes = frozenset(
            literal[:size] for literal in literals or () for size in range(1, len(literal))
        )
        self._first = frozenset(literal[0] for literal in literals or ())
        self._any_literal = re.compile("|".join(map(re.escape, literals))) if literals else None
        self._any_literal_bytes = (
            re.compile(b"|".join(re.escape(literal.encode()) for literal in literals))
            if literals
            else None
        )
        self._longest = max(map(len, literals or ("",)))
        # A prefix of a literal at the very end of a text: the start of a secret that the
        # next piece could complete (searched only over the last characters).
        self._tail = (
            re.compile(
                "(?:"
                + "|".join(map(re.escape, sorted(self._prefixes, key=len, reverse=True)))
                + r")\Z"
            )
            if literals
            else None
        )

    def kind(self, match: Any) -> str:
        group = match.lastgroup
        return self.names[int(group[1:])] if group else "secret"

    def is_quiet(self, text: str) -> bool:
        """True only when ``text`` holds no literal and does not end in the start of one:
        it can neither hold a secret nor begin one (two C searches, the second over the
        last few characters only)."""
        return (
            self._any_literal is not None
            and self._tail is not None
            and self._any_literal.search(text) is None
            and self._tail.search(text, max(0, len(text) - self._longest + 1)) is None
        )

    def may_contain(self, text: str) -> bool:
        """False only when ``text`` certainly holds no (complete) secret."""
        return self._any_literal is None or self._any_literal.search(text) is not None

    def may_contain_json(self, body: bytes) -> bool:
        """False only when no string of the JSON (or text) ``body`` can hold a secret:
        none of the literals is in its bytes, and no ``\\u`` escape could spell one
        (the other JSON escapes make no letter, digit, ``-`` or ``_``)."""
        return (
            self._any_literal_bytes is None
            or b"\\u" in body
            or self._any_literal_bytes.search(body) is not None
        )

    def open_tail(self, text: str, before: str) -> int:
        """How many final characters of ``text`` could start a secret (text that may not
        contain one: ``may_contain`` was False); ``before`` is the character that came
        just before ``text``, for the word boundary keys start at."""
        first, prefixes = self._first, self._prefixes
        for size in range(min(len(text), self._longest - 1), 0, -1):
            if (
                text[-size] in first
                and text[-size:] in prefixes
                and (
                    text[-size] == "-"
                    or _key_may_start(
                        before + text[max(0, len(text) - size - 3) : len(text) - size]
                    )
                )
            ):
                return size
        return 0

    def search(self, text: str) -> Any:
        return self.regex.search(text) if self.may_contain(text) else None

    def redact(self, text: str) -> tuple[str, list[str]]:
        if not self.may_contain(text):
            return text, []
        found: list[str] = []

        def replace(match: Any) -> str:
            found.append(self.kind(match))
            return REDACTED

        return self.regex.sub(replace, text), found


class SecretScanner:
    """One text channel of a stream: releases text only once it cannot start a secret."""

    __slots__ = ("_before", "_held", "_policy", "_secrets", "_tx")

    def __init__(self, policy: LeakedApiKeyDetection, tx: Transaction) -> None:
        self._policy = policy
        self._secrets = policy.secrets
        self._tx = tx
        self._held = ""
        self._before = ""  # the last characters released: what a key may not follow

    def feed(self, text: str) -> str:
        if self._held:
            text = self._held + text
            self._held = ""
        if self._secrets.is_quiet(text):  # the usual piece: out as it came
            if text:
                self._before = text[-3:] if len(text) >= 3 else (self._before + text)[-3:]
            return text
        return self._scan(text, final=False)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return self._scan(held, final=True) if held else ""

    def _scan(self, text: str, *, final: bool) -> str:
        released = self._release(text, final=final)
        if released:
            self._before = (self._before + released)[-3:]
        return released

    def _release(self, text: str, *, final: bool) -> str:
        secrets = self._secrets
        if secrets.literals is not None and not secrets.may_contain(text):
            hold = 0 if final else secrets.open_tail(text, self._before)
            self._held = text[len(text) - hold :] if hold else ""
            return text[: len(text) - hold] if hold else text
        # The regex sees the character before the text too, for its word boundaries.
        context = self._before
        text = context + text
        out: list[str] = []
        position = len(context)
        hold_from = len(text)
        for match in self._secrets.regex.finditer(text, len(context), partial=not final):
            if match.partial:
                hold_from = match.start()
                break
            if (
                not final
                and self._policy.action == "redact"
                and self._secrets.regex.fullmatch(text, match.start(), partial=True) is not None
            ):
                hold_from = match.start()  # a complete secret that more text could extend
                break
            self._policy.found(self._tx, self._secrets.kind(match), where="response")
            out.append(text[position : match.start()])
            out.append(REDACTED)
            position = match.end()
        out.append(text[position:hold_from])
        self._held = text[hold_from:]
        return "".join(out)


class LeakedApiKeyDetection(Policy):
    """Blocks (or redacts) secrets in the request or the response, by its position."""

    type_name = "LeakedApiKeyDetection"

    class Config(PolicyConfig):
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

    def found(self, tx: Transaction, kind: str, *, where: str) -> None:
        """Record a secret; raise ``PolicyBlocked`` when the action is ``block``."""
        action = "blocked" if self.action == "block" else "redacted"
        tx.record(self.name, action, f"{kind} in the {where}")
        if self.action == "block":
            raise PolicyBlocked(
                f"blocked by {self.name}: the {where} contains a secret ({kind})", policy=self.name
            )

    async def on_request(self, tx: Transaction) -> None:
        request = tx.request
        if request.query:
            query, changed = self.scan_value(tx, request.query.decode("latin-1"), "request")
            if changed:
                request.query = query.encode("latin-1")
        self._check_message(tx, request, where="request")

    async def on_response(self, tx: Transaction) -> None:
        assert tx.response is not None
        self._check_message(tx, tx.response, where="response")

    def _check_message(self, tx: Transaction, message: Any, *, where: str) -> None:
        if not self.secrets.may_contain_json(message.body):
            return  # one C search over the bytes instead of a walk over every string
        payload = message.payload
        if payload is None:
            text, changed = self.scan_value(tx, message.body.decode("utf-8", "replace"), where)
            if changed:
                message.set_body(text.encode())
        elif self.scan_value(tx, payload, where)[1]:
            message.mark_changed()

    def scan_value(self, tx: Transaction, value: Any, where: str) -> tuple[Any, bool]:
        """Check every string of a JSON value; block, or redact in place (→ changed)."""
        if self.action == "block":
            for string in iter_strings(value):
                if (match := self.secrets.search(string)) is not None:
                    self.found(tx, self.secrets.kind(match), where=where)
            return value, False
        kinds: list[str] = []

        def redact(text: str) -> str:
            new_text, found = self.secrets.redact(text)
            kinds.extend(found)
            return new_text

        value, changed = rewrite_strings(value, redact)
        for kind in kinds:
            self.found(tx, kind, where=where)
        return value, changed

    def stream_transform(self, tx: Transaction) -> StreamTransform:
        return _SecretStream(self, tx)


class _SecretStream(ChatTextStream):
    """Channels of text deltas scanned across chunks; other events scanned whole."""

    def __init__(self, policy: LeakedApiKeyDetection, tx: Transaction) -> None:
        super().__init__(lambda: SecretScanner(policy, tx))
        self._policy = policy
        self._tx = tx

    async def on_chunk(self, chunk: Any) -> list[Any]:
        data = chunk.data
        if not isinstance(data, dict):
            return [chunk]
        if isinstance(data.get("choices"), list) or data.get("type") in RESPONSES_DELTAS:
            return self.on_data(chunk, data)
        # Any other event (Responses API items and results, errors) is scanned whole,
        # after the text its deltas held back has been released.
        out = self.on_data(chunk, data)
        if self._policy.scan_value(self._tx, data, "response")[1]:
            chunk.mark_changed()
        return out
