"""Server-sent events: split a byte stream into events, keep each event's bytes.

An event that nobody changes goes out as the exact bytes that came in. Its JSON is
parsed only when somebody asks for it (``Chunk.data``), once, with orjson; a changed
event is serialized again only when it is sent.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from luthien_control import jsontext

DONE_EVENT = b"data: [DONE]\n\n"
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_NOT_PARSED = object()


class Chunk:
    """One server-sent event. ``raw`` is what goes on the wire, ``data`` its parsed JSON."""

    __slots__ = ("_data", "_payload", "_raw", "changed")

    def __init__(self, raw: bytes, data: Any = _NOT_PARSED) -> None:
        self._raw = raw
        self._payload: bytes | None = None
        self._data = data  # given when the caller already knows it: no second parse
        self.changed = False

    @classmethod
    def from_data(cls, data: Any, *, event: str | None = None) -> Chunk:
        """A new event carrying ``data`` as JSON (and an ``event:`` name when given)."""
        prefix = b"event: " + event.encode() + b"\n" if event else b""
        return cls(prefix + b"data: " + orjson.dumps(data) + b"\n\n", data)

    @property
    def raw(self) -> bytes:
        if self.changed:
            self._raw = self._prefix() + b"data: " + jsontext.dumps(self._data) + b"\n\n"
            self._payload = None
            self.changed = False
        return self._raw

    @property
    def payload(self) -> bytes:
        """The event's data field: its ``data:`` lines joined, as bytes."""
        if self.changed:
            _ = self.raw  # serialize the changed data first
        if self._payload is None:
            raw = self._raw
            # One "data: " line: its only newlines are the two that end the event.
            if raw.startswith(b"data: ") and raw.find(b"\n") == len(raw) - 2 and raw[-1] == 10:
                self._payload = raw[6:-2]
            else:
                self._payload = _parse_data_field(raw)
        return self._payload

    @property
    def event(self) -> str | None:
        """The ``event:`` field, if the event has one (the Responses API names its events)."""
        if not self._raw.startswith(b"event:") and b"\nevent:" not in self._raw:
            return None
        for line in self._raw.splitlines():
            if line.startswith(b"event:"):
                return line[6:].strip().decode("utf-8", "replace")
        return None

    @property
    def is_done(self) -> bool:
        return self.payload == b"[DONE]"

    @property
    def data(self) -> Any:
        """The parsed JSON of the data field; ``None`` when it is not JSON (or empty)."""
        data = self._data
        if data is _NOT_PARSED:
            payload = self.payload
            try:
                data = orjson.loads(payload) if payload else None
            except orjson.JSONDecodeError:
                data = None
            self._data = data
        return data

    def set_parsed(self, data: Any) -> None:
        """The event's JSON, parsed by the caller from these very bytes (strictly)."""
        self._data = data

    def replace_raw(self, raw: bytes) -> None:
        """New bytes for the same event; ``data``, if parsed, must already match them."""
        self._raw = raw
        self._payload = None
        self.changed = False

    def set_data(self, data: Any) -> None:
        """Replace the event's JSON; it is serialized again when the event is sent."""
        self._data = data
        self.changed = True

    def mark_changed(self) -> None:
        """Say that ``data`` was changed in place, so ``raw`` must be rebuilt."""
        _ = self.data
        self.changed = True

    def _prefix(self) -> bytes:
        """Every non-data line of the original event (``event:``, ``id:``), kept as it was."""
        lines = [
            line + b"\n"
            for line in self._raw.splitlines()
            if line and not line.startswith(b"data:")
        ]
        return b"".join(lines)

    def __repr__(self) -> str:
        return f"Chunk({self.raw!r})"


def _parse_data_field(raw: bytes) -> bytes:
    parts = []
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts)


class SSEDecoder:
    """Cuts a byte stream into events at blank lines, whatever the network split."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Chunk]:
        if self._buffer:
            data = self._buffer + data
        events: list[Chunk] = []
        start = 0
        if b"\r" not in data:
            find = data.find
            while (end := find(b"\n\n", start)) >= 0:
                piece = data[start : end + 2]
                if piece[0] > 32 or piece.strip():  # not a blank line
                    events.append(Chunk(piece))
                start = end + 2
        else:
            for match in _BLANK_LINE.finditer(data):
                if match.end() == len(data) and data.endswith(b"\r"):
                    break  # a CR at the very end may be the first half of CRLF
                piece = data[start : match.end()]
                if piece.strip():
                    events.append(Chunk(piece))
                start = match.end()
        self._buffer = data[start:]
        return events

    def close(self) -> list[Chunk]:
        """The stream has ended: a last event whose blank line ends in a lone CR (held by
        ``feed`` as the possible first half of a CRLF) is complete after all."""
        data = self._buffer
        if not data.endswith(b"\r"):
            return []
        events: list[Chunk] = []
        start = 0
        for match in _BLANK_LINE.finditer(data):
            piece = data[start : match.end()]
            if piece.strip():
                events.append(Chunk(piece))
            start = match.end()
        self._buffer = data[start:]
        return events

    @property
    def pending(self) -> bytes:
        """Bytes received after the last complete event (an unfinished event)."""
        return self._buffer
