"""``collect_sse_events``: read a streamed response as the seed describes it.

It reads both dialects' streams: chat completions' ``data:`` lines ending in
``data: [DONE]``, and the Messages API's ``event:`` plus ``data:`` lines (the event names
are kept in ``names``); ``tests/e2e/dialects.py`` knows which ending makes a stream
complete in each.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SSEResult:
    events: list[dict[str, Any]] = field(default_factory=list)  # parsed JSON data, in order
    names: list[str] = field(default_factory=list)  # each event's ``event:`` field, or ""
    done: bool = False  # the stream ended with ``data: [DONE]``
    malformed: list[str] = field(default_factory=list)  # data that was not JSON
    raw: bytes = b""  # every byte received, as received
    after_done: int = 0  # events that came after [DONE] (there must be none)

    @property
    def content(self) -> str:
        """The assistant text of choice 0, assembled from the deltas."""
        return "".join(
            choice["delta"].get("content") or ""
            for event in self.events
            for choice in event.get("choices", [])
            if choice.get("index", 0) == 0 and "delta" in choice
        )

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [event["error"] for event in self.events if "error" in event]


class _Parser:
    """Handles partial chunks: bytes are buffered until a blank line ends an event."""

    def __init__(self) -> None:
        self.result = SSEResult()
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        self.result.raw += data
        self._buffer += data.replace(b"\r\n", b"\n")
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            self._event(event)

    def _event(self, event: bytes) -> None:
        fields = event.split(b"\n")
        lines = [line[5:].lstrip(b" ") for line in fields if line.startswith(b"data:")]
        names = [line[6:].strip() for line in fields if line.startswith(b"event:")]
        if not lines:
            return  # comments and keep-alives
        data = b"\n".join(lines).decode("utf-8", "replace")
        result = self.result
        if result.done:
            result.after_done += 1
        if data == "[DONE]":
            result.done = True
            return
        try:
            parsed = json.loads(data)
        except json.JSONDecodeError:
            result.malformed.append(data)  # malformed data is kept, not fatal
            return
        if isinstance(parsed, dict):
            result.events.append(parsed)
            result.names.append(names[-1].decode("utf-8", "replace") if names else "")
        else:
            result.malformed.append(data)


def collect_sse_events(chunks: Iterable[bytes]) -> SSEResult:
    """Parse a stream of byte chunks (``response.iter_bytes()``), however they are split."""
    parser = _Parser()
    for data in chunks:
        parser.feed(data)
    return parser.result


async def acollect_sse_events(chunks: AsyncIterator[bytes]) -> SSEResult:
    """The same for ``response.aiter_bytes()``."""
    parser = _Parser()
    async for data in chunks:
        parser.feed(data)
    return parser.result
