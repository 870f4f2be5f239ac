"""The audit trail: every finished transaction becomes one record, written off the
request path.

The proxy calls ``Recorder.record(tx)`` once per transaction, after the client has its
answer. ``DatabaseRecorder`` turns the transaction into its row there and then (redacting
every secret) and queues the row; a background task inserts queued rows in batches. The
queue holds rows, never transactions: a transaction (its parsed bodies, its stream's
assemblers, the backend stream it read from) is freed as soon as its request ends, and
the work of building its row is done at the pace requests end, so that a busy proxy
cannot run ahead of its audit trail. While the database is unreachable the queue holds
the rows (up to ``RECORDER_BACKLOG`` rows and ``RECORDER_BACKLOG_BYTES`` of them) and the
writer retries; an insert is idempotent (the transaction id is the key), so a retry after
an ambiguous failure never writes a record twice. On shutdown the queue is flushed
(the write in progress is let finish, never cancelled), and what the database still does
not take within the grace goes to the dead-letter file.

Nothing is lost on the way: a record that cannot be built is replaced by a summary row
(``summary_row``), any JSON value nested deeper than ``RECORD_MAX_DEPTH`` is stored as its
JSON text, and a row the database refuses goes to the dead-letter file, a summary row
taking its place in the table. A locked or unreachable database only delays the writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import os
import re
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from luthien_control import jsontext, metrics
from luthien_control.db.engine import SerializedJSON
from luthien_control.db.models import ENDPOINT_LENGTH, NAME_LENGTH
from luthien_control.db.search import SEARCH_TEXT, search_text
from luthien_control.dialects import Dialect, StreamAssembler, TextSlot
from luthien_control.dialects.base import joined_slots
from luthien_control.exceptions import StorageError, StorageRefused
from luthien_control.memory import IDLE_RELEASE_AFTER, release_free_memory
from luthien_control.policies.audit_log import redacted_headers
from luthien_control.policies.backend import client_keys, redact_keys, sent_keys
from luthien_control.policies.secrets import (
    DEFAULT_PATTERNS,
    SecretPattern,
    default_secrets,
    field_forms,
    joined_secrets,
    rewrite_json,
)
from luthien_control.settings import DEFAULT_RECORDER_BACKLOG, DEFAULT_RECORDER_BACKLOG_BYTES
from luthien_control.sse import Chunk
from luthien_control.transaction import UNREAD, Transaction
from luthien_control.upstream.client import REDACTED, display_url

logger = logging.getLogger("luthien_control.transactions")


BATCH_SIZE = 100  # rows per insert (one database transaction)
BATCH_WAIT = 0.2  # seconds to wait for a batch to fill once the first record is in
RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0)  # after a failed write; then every 5 s
# A worker takes new requests at the pace its records are written: with more rows than
# this queued (or bytes), a new request waits for the writer (``DatabaseRecorder.pace``),
# at most PACE_WAIT seconds, until the backlog is half that. Never during an outage: then
# the backlog is what rides it out (RECORDER_BACKLOG). Without it, a saturated worker ran
# ahead of its writer (whose every step waits its turn on the busy event loop) by
# thousands of rows, tens of MB that stayed fragmented once written (docs/operations.md).
PACE_ROWS = 5 * BATCH_SIZE
PACE_BYTES = 16 * 1024 * 1024
PACE_WAIT = 1.0
# A JSON value of a record nested deeper than this is stored as its JSON text (a string)
# at this level: readers (orjson: 254 levels written, 1024 read) can always take it back.
RECORD_MAX_DEPTH = 128
# The records the database refuses: next to a SQLite file (luthien_control.db-dead-letter.jsonl),
# otherwise in the working directory (unless RECORDER_DEAD_LETTER says where).
DEAD_LETTER_SUFFIX = "-dead-letter.jsonl"
DEAD_LETTER_FILE = "luthien_control-dead-letter.jsonl"
_INT4 = 2**31  # PostgreSQL's integer columns
# What a queued row holds beyond its text columns (the dict, datetimes, small values),
# measured near 1.5 KB on CPython 3.11; counted towards RECORDER_BACKLOG_BYTES.
ROW_OVERHEAD = 2048


class Recorder(Protocol):
    def record(self, tx: Transaction) -> None: ...


class Redactor:
    """Removes secrets from everything that is stored or logged: known patterns, and the
    patterns of every ``LeakedApiKeyDetection`` in the policy in force.

    It works on decoded values, never on serialized text: every string and every object
    key of a document, each also percent-decoded (a URL, a query), so that no escape
    (JSON's ``\\u0073k-...``, ``\\n`` before a key, a URL's ``%73k-...``) can hide a key."""

    def __init__(self, extra_patterns: list[str] | None = None) -> None:
        if not extra_patterns:
            self._secrets = default_secrets()
            return
        patterns = dict(DEFAULT_PATTERNS)
        for index, pattern in enumerate(extra_patterns):
            patterns[f"policy pattern {index}"] = pattern
        self._secrets = SecretPattern(patterns)

    def with_literals(self, literals: list[str]) -> Redactor:
        """This redactor, also redacting ``literals`` (the keys the proxy sent the backend
        in one transaction: ``sent_keys``) as the patterns are redacted."""
        if not literals:
            return self
        other = copy.copy(self)
        other._secrets = self._secrets.with_literals(literals)
        return other

    def joined(self, slots: list[TextSlot]) -> bool:
        """Redact, in place, the secrets that strings read as one text spell together
        (``TextSlot.joins``: the parts of a message), before each is redacted alone.
        True when there was one."""
        found = False
        for group in joined_slots(slots):
            found = bool(joined_secrets(self._secrets, group, redact=True)) or found
        return found

    def may_hold(self, serialized: bytes) -> bool:
        """False only when no string of the JSON text ``serialized``, its escapes undone,
        can spell a secret (``SecretPattern.may_contain_json``)."""
        return bool(
            self._secrets.may_contain_json(serialized) or _PERCENT_ESCAPE.search(serialized)
        )

    def text(self, value: str) -> str:
        """``value`` with every secret replaced, in every form a reader may decode it to.

        ``SecretPattern.scrub`` returns the first decoded form (percent escapes undone
        once or twice, JSON escapes undone) that holds a key, redacted: a second key one
        decoding deeper (``%73k-...`` beside ``%2573k-...``) stayed in it. So it is run
        again on what it returns until nothing changes (each round that changes the text
        shortens it: a key becomes ``[REDACTED]``, or escapes are undone), and then the
        JSON escapes that a string of JSON text inside JSON text leaves (tool-call
        arguments escaped twice) are undone as far as ``_spells_secret`` undoes them in
        a stream: a key found so, the text is stored in that decoded form, redacted."""
        scrub = self._secrets.scrub
        if "\x00" in value or ("00" in value and ("%" in value or "\\" in value)):
            value = self._without_nul(value)
        for _ in range(_MAX_SCRUBS):
            cleaned = scrub(value)
            if cleaned == value:
                cleaned = self._deeper(value)
                if cleaned == value:
                    return value
            value = cleaned
        return REDACTED  # still changing: nothing of it is kept

    def _without_nul(self, value: str) -> str:
        """``value``, or, when one of its forms (``field_forms``: as it is, percent- or
        JSON-decoded) spells a secret once its NUL characters are gone, that form without
        them, redacted. The proxy drops NUL from what it stores as text (the columns, the
        search text: PostgreSQL refuses it), and so does an HTML parser: a key with a NUL
        inside is a key to them."""
        for form in field_forms(value):
            if "\x00" not in form:
                continue
            joined = form.replace("\x00", "")
            cleaned = self._secrets.scrub(joined)
            if cleaned != joined:
                return cleaned
        return value

    def _deeper(self, value: str) -> str:
        """``value`` with its JSON escapes undone round after round (beyond the one
        ``scrub`` undoes), redacted, from the first round that spells a secret; else
        ``value`` itself."""
        text = value
        for _ in range(_UNESCAPE_ROUNDS):
            if "\\" not in text:
                return value
            unescaped = _ESCAPES.sub(_unescape, text)
            if unescaped == text:
                return value
            text = unescaped
            cleaned = self._secrets.scrub(text)
            if cleaned != text:
                return cleaned
        return value

    def document(
        self, value: Any, *, keys: list[str] | None = None, verified: bytes = b""
    ) -> SerializedJSON:
        """``value`` as JSON text with every secret redacted (``value`` is redacted in
        place), every array or object deeper than ``RECORD_MAX_DEPTH`` as its JSON text.
        Serialized once when it is clean and shallow: a key can be in a decoded string
        only if one of the literals, a ``\\u`` escape or a percent escape is in the text.
        ``verified``: the bytes of an ``orjson.Fragment`` in ``value`` that its maker has
        read already (shallow, no secret, no client key), not read again."""
        serialized = jsontext.dumps_within(value, RECORD_MAX_DEPTH)
        unread = serialized if serialized is None else _unread(serialized, verified)
        # A percent escape may hide a key of either kind: looked for once.
        percent = unread is not None and _PERCENT_ESCAPE.search(unread) is not None
        if keys and unread is not None and (percent or _may_spell_keys(unread, keys)):
            # The client's own key, copied where no credential header is (a header of
            # another name, the query): it is no pattern, it is known; found in every
            # form a reader may decode a string to (``without_client_keys``).
            rewrite_json(value, lambda text: without_client_keys(text, keys))
            serialized = jsontext.dumps_within(value, RECORD_MAX_DEPTH)
            unread = serialized if serialized is None else _unread(serialized, verified)
            percent = unread is not None and _PERCENT_ESCAPE.search(unread) is not None
        if serialized is None or unread is None:  # deeper than RECORD_MAX_DEPTH (or an
            # integer beyond 64 bits)
            rewrite_json(value, self.text)  # every decoded string, at any depth
            flat = jsontext.flatten(value, RECORD_MAX_DEPTH)
            return SerializedJSON(jsontext.dumps(flat).decode())
        may_hold = percent or self._secrets.may_contain_json(unread)  # ``may_hold``
        if may_hold and rewrite_json(value, self.text)[1]:
            serialized = jsontext.dumps(value)
        return SerializedJSON(serialized.decode())


def _may_spell_keys(serialized: bytes, keys: list[str]) -> bool:
    """Whether a string of the JSON text ``serialized`` may spell one of ``keys``, a
    percent escape aside: one is in it as written, or an escape that may hide one (a
    ``\\u`` escape, an escaped backslash)."""
    return (
        any(key.encode() in serialized for key in keys)
        or b"\\u" in serialized
        or b"\\\\" in serialized
    )


def without_client_keys(text: str, keys: list[str]) -> str:
    """``text`` with each of ``keys`` (the client's own) replaced by ``[REDACTED]``, in
    the form of ``text`` that spells one (``field_forms``: percent-decoded, JSON escapes
    undone, NUL characters dropped), taken to the end as ``Redactor.text`` takes the
    patterns."""
    for _ in range(_MAX_SCRUBS):
        for form in field_forms(text):
            form = form.replace("\x00", "")  # dropped by the columns (``Redactor.text``)
            if any(key in form for key in keys):
                text = redact_keys(form, keys)
                break
        else:
            return text
    return REDACTED


def _unread(serialized: bytes, verified: bytes) -> bytes:
    """``serialized`` but the ``verified`` bytes in it (read already), to be read."""
    at = serialized.find(verified) if verified else -1
    if at < 0:
        return serialized
    return serialized[:at] + b"null" + serialized[at + len(verified) :]


_PERCENT_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")
# Rounds of ``SecretPattern.scrub`` over one string before it is given up (every round
# that changes it takes a key or an escape out: a real text needs two or three).
_MAX_SCRUBS = 32


class _Bodies:
    """Bodies as stored: their JSON when they are JSON, else their text. Redaction comes
    later, over the decoded strings of the whole document (``Redactor.document``), so
    escapes the client wrote (\\u0073k-...) cannot hide a key. The same bytes object is
    parsed once (the body the backend got is most often the client's, unchanged)."""

    __slots__ = ("_parsed",)

    def __init__(self, known: tuple[bytes, Any] | None = None) -> None:
        self._parsed: dict[int, tuple[bytes, Any]] = {}
        if known is not None and known[1] is not None:
            self._parsed[id(known[0])] = known

    def value(self, body: bytes | None) -> Any:
        if body is None:
            return None
        if not body:
            return ""
        seen = self._parsed.get(id(body))
        if seen is not None and seen[0] is body:
            return seen[1]
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = body.decode("utf-8", "replace")  # not JSON: stored as text
        self._parsed[id(body)] = (body, parsed)
        return parsed


def _at(tx: Transaction, moment: float | None) -> datetime | None:
    if moment is None:
        return None
    timings = tx.timings
    return datetime.fromtimestamp(timings.received_at + (moment - timings.start), UTC)


def _stream(assembler: StreamAssembler | None) -> dict[str, Any] | None:
    """A stream as its dialect assembles it: the message, tool calls, usage."""
    return None if assembler is None else assembler.summary()


def _received_events(
    dialect: Dialect,
    raws: list[bytes],
    redactor: Redactor,
    keys: list[str],
    parsed: list[Any] | None = None,
) -> list[Any] | bytes | None:
    """A stream's events as the backend sent them, with the secrets their channels spell
    together redacted; ``None`` (the record keeps the assembled answer only) when, read
    together again as the client reads them, they would still spell one: a secret hidden
    in a way only the assembled answer's redaction undoes (an argument escaped twice, say)
    is never stored in pieces. Events with nothing to redact are their JSON array as it
    came (bytes), read here and not written again (``Redactor.document``'s ``verified``).
    ``parsed``: the relay's parse of each event (``Trail.events_parsed``), not done again
    where it lines up and is not ``UNREAD``."""
    chunks = [Chunk(raw) for raw in raws]
    if parsed is None or len(parsed) != len(raws):
        events = [chunk.data for chunk in chunks]
    else:
        events = [
            chunk.data if value is UNREAD else value
            for chunk, value in zip(chunks, parsed, strict=True)
        ]
    slots = _event_slots(dialect, events)
    redacted = redactor.joined(slots)
    groups: dict[Any, list[str]] = {}
    for slot in slots:
        groups.setdefault(slot.joins, []).append(slot.text)
    if any(_spells_secret(redactor, "".join(texts)) for texts in groups.values()):
        return None
    if redacted:
        # The pieces redacted, the answer that the client would assemble from the stored
        # events must spell nothing either. (Nothing redacted: it is the answer as
        # received, its channels the groups just read and the rest read below.)
        again = dialect.new_assembler()
        for data in events:
            again.feed(orjson.loads(jsontext.dumps(data)))  # a copy: assemblers keep parts
        summary = again.summary()
        before = orjson.dumps(summary, default=str)
        redactor.joined(dialect.assembled_slots(summary))
        if redactor.document(summary) != before.decode():
            return None
        # Escapes inside strings inside strings (arguments escaped twice): undone as far
        # as a reader might, the stored text must still spell no secret.
        if _spells_secret(redactor, orjson.dumps(events, default=str).decode()):
            return None
        return events
    payloads = [chunk.payload for chunk in chunks]
    stored = b"[" + b",".join(payloads) + b"]"
    if redactor.may_hold(stored) and _spells_secret(redactor, stored.decode()):
        return None
    deep = any(p.count(b"{") + p.count(b"[") > _EVENT_DEPTH for p in payloads)
    if deep or b'"bytes"' in stored or any(key.encode() in stored for key in keys):
        # The document flattens them, reads the text that byte values spell (logprobs'
        # "bytes", however spaced), or takes the client's key out.
        return events
    return stored


# How deep an event's JSON may nest to be stored as it came (its brackets counted, inside
# strings too): the record's own levels above it, and it stays within RECORD_MAX_DEPTH.
_EVENT_DEPTH = RECORD_MAX_DEPTH - 4


def _spells_secret(redactor: Redactor, text: str) -> bool:
    """Whether ``text`` spells a secret, its escapes (and the escapes those leave)
    undone as far as a reader might."""
    for _ in range(_UNESCAPE_ROUNDS):
        if redactor.text(text) != text:
            return True
        if "\\" not in text:  # no escape left to undo
            return False
        unescaped = _ESCAPES.sub(_unescape, text)
        if unescaped == text:
            return False
        text = unescaped
    return redactor.text(text) != text


_UNESCAPE_ROUNDS = 4
_ESCAPES = re.compile(r"\\\\|\\u[0-9a-fA-F]{4}|\\[\"/bfnrt]")


def _unescape(match: re.Match[str]) -> str:
    escape = match.group()
    if escape.startswith("\\u"):
        return chr(int(escape[2:], 16))
    return {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}.get(escape[1], escape[1])


def _event_slots(dialect: Dialect, events: list[Any]) -> list[TextSlot]:
    """The channel texts of a stream's events, each channel (and the channels the client
    reads as one text) joined across events as the client joins them, and the texts that
    later events repeat whole (a Responses API ``*.done``, ``response.completed``) joined
    the same way among themselves: a secret split across events or parts is redacted in
    the strings that hold its pieces."""
    slots: list[TextSlot] = []
    # The usual event (one piece of message text, nothing else: ``Dialect.plain_text``)
    # is its one text slot, when the dialect's events never repeat text whole.
    plain = (
        type(dialect).summary_slots is Dialect.summary_slots
        and type(dialect).event_answer is Dialect.event_answer
    )
    for index, data in enumerate(events):
        if not isinstance(data, dict):
            continue
        if plain and (text := dialect.plain_text(data)) is not None:
            holder, field, key = text
            joined = ("delta", dialect.joins(key) or key)
            slots.append(TextSlot(key, holder, field, "text", joined))
            continue
        for slot in dialect.text_slots(data):
            joined = ("delta", dialect.joins(slot.key) or slot.key)
            slots.append(TextSlot(slot.key, slot.holder, slot.field, slot.kind, joined))
        for slot in dialect.summary_slots(data):
            joined = ("whole", dialect.joins(slot.key) or slot.key)
            slots.append(TextSlot(slot.key, slot.holder, slot.field, slot.kind, joined))
        answer = dialect.event_answer(data)
        if answer is not None:  # an answer repeated whole: its parts read as one
            for slot in dialect.answer_slots(answer):
                if slot.joins is not None:
                    group = ("answer", index, slot.joins)
                    slots.append(TextSlot(slot.key, slot.holder, slot.field, slot.kind, group))
    return slots


def _column(value: str | None, size: int) -> str | None:
    """Fit a value to its column: at most ``size`` characters, no NUL (PostgreSQL refuses it)."""
    if value is None:
        return None
    return value.replace("\x00", "")[:size]


def _integer(value: int | None) -> int | None:
    """An integer column's value: None when the column cannot hold it (a backend's
    usage figures are its own; the whole usage stays in the response document)."""
    return value if value is None or -_INT4 <= value < _INT4 else None


def _headers_sent(headers: list[tuple[bytes, bytes]] | None) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers or ()}


def build_record(tx: Transaction, redactor: Redactor) -> dict[str, Any]:
    """The row of one finished transaction: plain values, and the JSON columns as
    redacted JSON text (``SerializedJSON``), serialized and scanned once each."""
    trail = tx.trail
    bodies = _Bodies()
    request = tx.request
    keys = client_keys(request.headers)
    redactor = redactor.with_literals(sent_keys(tx))  # the backend key, whatever its shape
    payload = request.payload if isinstance(request.payload, dict) else {}
    model = payload.get("model") if isinstance(payload.get("model"), str) else None
    timings = tx.timings
    backend_request = trail.backend_request
    streamed = trail.stream_sent is not None
    usage = tx.usage
    received_stream = _stream(trail.stream_received)
    # One assembler for both sides when no policy changed the stream (relay.py).
    sent_stream = (
        received_stream
        if trail.stream_sent is trail.stream_received
        else _stream(trail.stream_sent)
    )
    # A key split across the parts of a message is redacted in the parts that hold it
    # (each body once: the backend most often got the client's, unchanged).
    dialect = tx.dialect
    seen: set[int] = set()
    for slots, body in (
        (dialect.request_slots, trail.request_body),
        (dialect.request_slots, backend_request and backend_request["body"]),
        (dialect.answer_slots, trail.backend_body),
        (dialect.answer_slots, trail.client_body),
    ):
        value = bodies.value(body or None)
        if isinstance(value, dict) and id(value) not in seen:
            seen.add(id(value))
            redactor.joined(slots(value))
    # The events before the assembled answer: the answer may hold parts of the relay's
    # parsed events (a Responses API answer's output items), which its redaction changes.
    events: list[Any] | bytes | orjson.Fragment | None = None
    if received_stream is not None and trail.events_received and not trail.events_cut:
        events = _received_events(
            dialect, trail.events_received, redactor, keys, trail.events_parsed
        )
    for assembled in (received_stream, sent_stream):
        if assembled is not None and id(assembled) not in seen:
            seen.add(id(assembled))
            redactor.joined(dialect.assembled_slots(assembled))
    verified = b""
    if isinstance(events, bytes):  # their JSON as it came, read: written as it is
        verified, events = events, orjson.Fragment(events)
    request_value = {
        "received": {
            "headers": redacted_headers(request.headers),
            "query": request.query.decode("latin-1"),
            "body": bodies.value(trail.request_body),
        },
        "sent": None
        if backend_request is None
        else {
            "method": backend_request["method"],
            "url": display_url(backend_request["url"]),  # no userinfo, no query key
            # What the policies added carries the backend key, whatever its name.
            "headers": redacted_headers(
                {
                    **backend_request["headers"],
                    **dict.fromkeys(tx.backend_headers, REDACTED),
                }
            ),
            "body": bodies.value(backend_request["body"]),
        },
    }
    request_json = redactor.document(request_value, keys=keys)
    response_value = {
        "received": None
        if trail.backend_status is None
        else {
            "status": trail.backend_status,
            "headers": redacted_headers(trail.backend_headers or {}),
            "body": bodies.value(trail.backend_body),
            "stream": received_stream,
            # Each event as it came (for a replay), while there were not too many.
            "events": events,
            "events_named": trail.events_named,
            "events_done": trail.events_done,
        },
        "sent": {
            "status": tx.status,
            "headers": redacted_headers(_headers_sent(trail.client_headers)),
            "body": bodies.value(trail.client_body),
            "stream": sent_stream,
        },
    }
    response_json = redactor.document(response_value, keys=keys, verified=verified)

    def column_text(value: str) -> str:
        # The columns hold the client's text too (the model it named, its path): its own
        # key in them is redacted as in the documents.
        return without_client_keys(redactor.text(value), keys) if keys else redactor.text(value)

    endpoint = _column(column_text(request.path), ENDPOINT_LENGTH)
    return {
        "id": tx.id,
        "received_at": datetime.fromtimestamp(timings.received_at, UTC),
        "backend_first_byte_at": _at(tx, timings.backend_first_byte),
        "client_first_byte_at": _at(tx, timings.client_first_byte),
        "ended_at": _at(tx, timings.end),
        "duration_ms": ((timings.end or timings.start) - timings.start) * 1000,
        "client_key_name": tx.client_key_name,
        "policy_name": _column(tx.policy_name, NAME_LENGTH),
        "method": _column(request.method, 16),
        "endpoint": endpoint,
        "model": _column(column_text(model) if model is not None else None, NAME_LENGTH),
        "streamed": streamed or request.wants_stream,
        "status": _integer(tx.status),
        "outcome": tx.outcome,
        "error": _error(tx, redactor, keys),
        "prompt_tokens": _integer(usage.prompt_tokens) if usage else None,
        "completion_tokens": _integer(usage.completion_tokens) if usage else None,
        "total_tokens": _integer(usage.total_tokens) if usage else None,
        # A stream cut short: whatever usage the backend reported covers only part of it.
        "usage_partial": streamed and tx.outcome in ("client_disconnected", "cut_by_shutdown"),
        "chunks_sent": tx.chunks_sent,
        "request": request_json,
        "response": response_json,
        "decisions": redactor.document(
            [{"policy": d.policy, "action": d.action, "detail": d.detail} for d in tx.decisions]
        ),
        "flagged": tx.flagged,
        # Read from the documents as redacted (in place) above, not parsed back.
        SEARCH_TEXT: _search_text(endpoint or "", request_value, response_value),
    }


def _search_text(endpoint: str, request: Any, response: Any) -> str:
    """The record's search text; empty (found by no search) when it cannot be read (a
    bug), the record stored all the same."""
    try:
        return search_text(endpoint, request, response)
    except Exception:
        logger.exception("cannot read the search text of a record of %s", endpoint)
        return ""


def _error(tx: Transaction, redactor: Redactor, keys: list[str] | None = None) -> str | None:
    if tx.error is None:
        return None
    message = redactor.text(getattr(tx.error, "message", None) or repr(tx.error))
    if keys:
        message = without_client_keys(message, keys)
    return message.replace("\x00", "")  # PostgreSQL's text refuses NUL


def summary_row(tx: Transaction, redactor: Redactor, error: str) -> dict[str, Any]:
    """The row of a transaction whose record could not be built: what identifies it and
    how it ended, and ``error`` saying why the rest is missing. Made of plain values
    only, so that it cannot fail in its turn."""
    timings = tx.timings
    return {
        "id": tx.id,
        "received_at": datetime.fromtimestamp(timings.received_at, UTC),
        "backend_first_byte_at": None,
        "client_first_byte_at": None,
        "ended_at": _at(tx, timings.end),
        "duration_ms": ((timings.end or timings.start) - timings.start) * 1000,
        "client_key_name": None,
        "policy_name": None,
        "method": _column(str(tx.request.method), 16),
        "endpoint": _endpoint(tx, redactor),
        "model": None,
        "streamed": tx.trail.stream_sent is not None,
        "status": _integer(tx.status),
        "outcome": _column(str(tx.outcome), 32),
        "error": _column(error, 10_000),
        "prompt_tokens": None,
        "completion_tokens": None,
        "total_tokens": None,
        "usage_partial": False,
        "chunks_sent": _integer(tx.chunks_sent) or 0,
        "request": _NOTHING_RECORDED,
        "response": _NOTHING_RECORDED,
        "decisions": SerializedJSON("[]"),
        "flagged": tx.flagged,
    }


_NOTHING_RECORDED = SerializedJSON('{"received":null,"sent":null}')


def _endpoint(tx: Transaction, redactor: Redactor) -> str:
    try:
        return _column(redactor.text(tx.request.path), ENDPOINT_LENGTH) or ""
    except Exception:  # the path may hold a secret: nothing rather than unredacted
        return ""


def _summary_of_row(row: dict[str, Any], error: str) -> dict[str, Any]:
    """The summary row of a built row the database refused (``summary_row``'s columns)."""
    return {
        **row,
        "backend_first_byte_at": None,
        "client_first_byte_at": None,
        "client_key_name": None,
        "policy_name": None,
        "model": None,
        "error": _column(error, 10_000),
        "prompt_tokens": None,
        "completion_tokens": None,
        "total_tokens": None,
        "request": _NOTHING_RECORDED,
        "response": _NOTHING_RECORDED,
        "decisions": SerializedJSON("[]"),
    }


@functools.cache
def _default_redactor() -> Redactor:
    return Redactor()


class LogRecorder:
    """Writes one summary line per transaction to the ``luthien_control.transactions`` log,
    at DEBUG (``LOG_LEVEL=DEBUG``): the database holds the full record. The path is
    redacted as records are (``redactor``: the recorder's own, else the built-in one;
    the client's own key too)."""

    def record(self, tx: Transaction, redactor: Redactor | None = None) -> None:
        if not logger.isEnabledFor(logging.DEBUG):
            return
        timings = tx.timings
        total_ms = ((timings.end or timings.start) - timings.start) * 1000
        usage = tx.usage
        path = (redactor or _default_redactor()).text(tx.request.path)
        keys = client_keys(tx.request.headers)
        if keys:  # the client's own key, in the path it wrote
            path = without_client_keys(path, keys)
        logger.debug(
            "tx=%s %s %s outcome=%s status=%s key=%s chunks=%d tokens=%s ms=%.1f%s",
            tx.id,
            tx.request.method,
            path,
            tx.outcome,
            tx.status or "-",
            tx.client_key_name or "-",
            tx.chunks_sent,
            usage.total_tokens if usage is not None else "-",
            total_ms,
            "".join(f" {d.policy}:{d.action}" for d in tx.decisions),
        )


def default_dead_letter(database_url: Any) -> Path:
    """Where refused records go unless ``RECORDER_DEAD_LETTER`` says: next to a SQLite
    file (``luthien_control.db-dead-letter.jsonl``), else in the working directory."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    database = url.database
    in_a_file = database and database != ":memory:" and not database.startswith("file:")
    if url.get_backend_name() == "sqlite" and in_a_file:
        return Path(f"{database}{DEAD_LETTER_SUFFIX}").absolute()
    return Path(DEAD_LETTER_FILE).absolute()


def _append_line(path: Path, *lines: bytes) -> None:
    """Append lines and make them durable; the file is created readable by its owner only
    (records hold prompts and answers). One write per line: lines of several workers do
    not interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        for line in lines:
            os.write(descriptor, line)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def dead_letter_line(row: dict[str, Any], reason: str) -> bytes:
    """A row the database did not store (it refused the row, or was away until the
    shutdown) as one JSON line: ``{"refused_at", "reason", "row"}``, each column as it
    was to be stored (the JSON columns as JSON)."""
    columns = {
        key: orjson.Fragment(str(value)) if type(value) is SerializedJSON else value
        for key, value in row.items()
        if key != SEARCH_TEXT
    }
    entry = {"refused_at": datetime.now(UTC), "reason": reason, "row": columns}
    return orjson.dumps(entry, default=repr, option=orjson.OPT_APPEND_NEWLINE)


def row_size(row: dict[str, Any]) -> int:
    """The memory a queued row holds, near enough: its text columns (the JSON documents,
    which carry the bodies) plus ``ROW_OVERHEAD``."""
    return ROW_OVERHEAD + sum(len(value) for value in row.values() if isinstance(value, str))


class DatabaseRecorder:
    """Builds the row of each finished transaction at once and writes the rows in
    batches, in the background.

    A failed write is either an outage (``StorageError``: locked, busy, unreachable),
    after which the rows stay queued and are tried again, or a refusal
    (``StorageRefused``), after which the rows are tried one by one and each one the
    database refuses goes to the dead-letter file, a summary row taking its place."""

    def __init__(
        self,
        engine: Any,
        redactor: Redactor,
        *,
        backlog: int = DEFAULT_RECORDER_BACKLOG,
        backlog_bytes: int = DEFAULT_RECORDER_BACKLOG_BYTES,
        dead_letter: Path | None = None,
    ) -> None:
        self._engine = engine
        self.redactor = redactor
        self._queue: deque[tuple[dict[str, Any], int]] = deque()  # (row, row_size)
        self._queued_bytes = 0
        self._backlog = backlog
        self._backlog_bytes = backlog_bytes
        self._wakeup = asyncio.Event()
        # Set while the writer keeps pace: new requests go straight through.
        self.paced = asyncio.Event()
        self.paced.set()
        self._task: asyncio.Task[None] | None = None
        # The write in progress, run as a task of its own: stopping the writer never
        # cancels it (see ``stop``).
        self._writing: asyncio.Task[bool] | None = None
        self._log = LogRecorder()
        self._overflowed = 0
        self._failing = False
        self._bug: str | None = None
        self._last_outage: str | None = None
        self.dead_letter = dead_letter or default_dead_letter(engine.url)

    def record(self, tx: Transaction) -> None:
        """Build the transaction's row (redacted with the patterns in force now) and queue
        it; never raises. Beyond the backlog's bounds the record is dropped, counted and
        logged: only a database away for long lets the queue fill up."""
        self._log.record(tx, self.redactor)
        if len(self._queue) >= self._backlog or self._queued_bytes >= self._backlog_bytes:
            self._overflowed += 1
            metrics.RECORDER_OVERFLOW.inc()
            if self._overflowed == 1 or self._overflowed % 1000 == 0:
                logger.error(
                    "recorder backlog full (%d records, %d bytes): %d record(s) dropped so far",
                    len(self._queue),
                    self._queued_bytes,
                    self._overflowed,
                )
            return
        row = self._row(tx, self.redactor)
        size = row_size(row)
        self._queue.append((row, size))
        self._queued_bytes += size
        self._wakeup.set()  # the writer updates the backlog gauge, once per batch
        if (len(self._queue) > PACE_ROWS or self._queued_bytes > PACE_BYTES) and not self._failing:
            self.paced.clear()

    async def pace(self) -> None:
        """Wait while the writer is behind (``PACE_ROWS``), at most ``PACE_WAIT``."""
        if not self.paced.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.paced.wait(), PACE_WAIT)

    @staticmethod
    def _row(tx: Transaction, redactor: Redactor) -> dict[str, Any]:
        try:
            return build_record(tx, redactor)
        except Exception as exc:  # a bug: the transaction is still recorded, in short
            logger.exception("cannot build the record of transaction %s", tx.id)
            return summary_row(tx, redactor, f"record could not be built: {exc!r}")

    @property
    def backlog(self) -> int:
        """Rows waiting to be written."""
        return len(self._queue)

    @property
    def backlog_bytes(self) -> int:
        """What the waiting rows hold in memory (``row_size``), together."""
        return self._queued_bytes

    def _written(self) -> None:
        """The row at the head of the queue is in the database (or dead-lettered)."""
        _, size = self._queue.popleft()
        self._queued_bytes -= size
        if (
            not self.paced.is_set()
            and len(self._queue) <= PACE_ROWS // 2
            and self._queued_bytes <= PACE_BYTES // 2
        ):
            self.paced.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="luthien-recorder")

    async def stop(self, grace: float = 30.0) -> None:
        """Write everything still queued (retrying for ``grace`` seconds), then stop; what
        the database would still not take by then goes to the dead-letter file.

        The writer is stopped between two writes, never in one: a database call
        cancelled half-way can leave its connection holding the database's lock (on
        SQLite, an insert cancelled while it waited for the lock left its connection
        open, its write transaction begun, for the life of the process: every later
        write found the file locked)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._writing is not None:
            await asyncio.wait([self._writing], timeout=grace)
            if not self._writing.done():  # the database holds it beyond the grace
                logger.error(
                    "shutting down with %d unwritten record(s): a write still waits for "
                    "the database",
                    len(self._queue),
                )
                return
            self._writing = None
        while self._queue:
            if not await self._attempt():
                if loop.time() >= deadline:
                    await self._dead_letter_unwritten()
                    return
                await asyncio.sleep(0.5)

    async def _dead_letter_unwritten(self) -> None:
        """At shutdown, the rows the database would not take within the grace: each to
        the dead-letter file (whole), or lost if that cannot be written either."""
        reason = f"not written before shutdown: {self._last_outage or 'database unreachable'}"
        rows = [row for row, _ in self._queue]
        try:
            lines = [dead_letter_line(row, reason) for row in rows]
            await asyncio.to_thread(_append_line, self.dead_letter, *lines)
        except OSError as exc:
            metrics.RECORDER_LOST.inc(len(rows))
            logger.error(
                "shutting down with %d unwritten record(s), lost: database unreachable, "
                "and cannot write the dead-letter file %s: %s",
                len(rows),
                self.dead_letter,
                exc,
            )
        else:
            logger.error(
                "shutting down with %d unwritten record(s): database unreachable; "
                "written to the dead-letter file %s",
                len(rows),
                self.dead_letter,
            )
        self._queue.clear()
        self._queued_bytes = 0

    async def _run(self) -> None:
        attempt = 0
        busy = False  # records came since the memory was last released
        while True:
            if not self._queue:
                self._wakeup.clear()
                if busy:
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), IDLE_RELEASE_AFTER)
                    except TimeoutError:
                        # Nothing finished for a while: the rush is over, give back what
                        # it took (memory.py).
                        release_free_memory()
                        busy = False
                        continue
                else:
                    await self._wakeup.wait()
            busy = True
            if len(self._queue) < BATCH_SIZE:
                # Not a full batch: let it fill. Writing whatever came in during the
                # last write made batches of a few rows under load, each paying for a
                # whole database transaction.
                await asyncio.sleep(BATCH_WAIT)
            # Its own task: cancelling the writer (``stop``) does not cancel the write.
            self._writing = asyncio.create_task(self._attempt(), name="luthien-recorder-write")
            if await asyncio.shield(self._writing):
                attempt = 0
            else:
                await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
                attempt += 1

    async def _attempt(self) -> bool:
        """``_write_batch``, which nothing may end the writer with: an unexpected error
        (a bug) is logged in one line, once until a write succeeds, and the records are
        kept, to be tried again."""
        try:
            return await self._write_batch()
        except Exception as exc:
            self.paced.set()  # as in an outage: requests go on
            if repr(exc) != self._bug:  # once per bug, not once per retry
                self._bug = repr(exc)
                logger.error("cannot write transaction records (a bug), will retry: %s", self._bug)
            return False

    async def _write_batch(self) -> bool:
        """Write up to ``BATCH_SIZE`` queued records; False (records kept) if the database
        cannot be written to."""
        from luthien_control.db.transactions import insert_records

        metrics.RECORDER_BACKLOG.set(len(self._queue))
        rows = [self._queue[i][0] for i in range(min(BATCH_SIZE, len(self._queue)))]
        if not rows:
            return True
        try:
            await insert_records(self._engine, rows)
        except StorageRefused:
            if not await self._insert_one_by_one(rows):
                return False
        except StorageError as exc:
            self._outage(exc)
            return False
        else:
            for _ in rows:
                self._written()
        if self._failing or self._bug is not None:
            logger.info("transaction records are being written again")
            self._failing, self._bug = False, None
        metrics.RECORDER_BACKLOG.set(len(self._queue))
        return True

    def _outage(self, exc: StorageError) -> None:
        self._last_outage = exc.message
        self.paced.set()  # requests go on; the backlog rides the outage out
        if not self._failing:
            logger.error("cannot write transaction records, will retry: %s", exc.message)
        self._failing = True

    async def _insert_one_by_one(self, rows: list[dict[str, Any]]) -> bool:
        """After the database refused a batch: write its rows singly, each leaving the
        queue once written or, refused, dead-lettered. False when the database stops
        answering meanwhile (the rest stays queued)."""
        from luthien_control.db.transactions import insert_records

        for row in rows:
            try:
                await insert_records(self._engine, [row])
            except StorageRefused as exc:
                await self._refused(row, exc.message)
            except StorageError as exc:
                self._outage(exc)
                return False
            self._written()
        return True

    async def _refused(self, row: dict[str, Any], reason: str) -> None:
        """A row the database refused: whole in the dead-letter file, and a summary row
        in the table in its place."""
        from luthien_control.db.transactions import insert_records

        metrics.RECORDER_REFUSED.inc()
        try:
            await asyncio.to_thread(_append_line, self.dead_letter, dead_letter_line(row, reason))
        except OSError as exc:
            metrics.RECORDER_LOST.inc()
            logger.error(
                "record of transaction %s refused by the database (%s) and lost: "
                "cannot write the dead-letter file %s: %s",
                row["id"],
                reason,
                self.dead_letter,
                exc,
            )
            where = "lost (the dead-letter file could not be written)"
        else:
            logger.error(
                "record of transaction %s refused by the database, written to the "
                "dead-letter file %s: %s",
                row["id"],
                self.dead_letter,
                reason,
            )
            where = f"in the dead-letter file {self.dead_letter}"
        summary = _summary_of_row(row, f"record refused by the database: {reason}; whole {where}")
        try:
            await insert_records(self._engine, [summary])
        except StorageError as exc:
            logger.error(
                "summary row of transaction %s not written either: %s", row["id"], exc.message
            )
