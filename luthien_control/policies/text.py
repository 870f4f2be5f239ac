"""Text rewriting over requests, responses and streams, with bounded hold-back.

A ``TextRewriter`` sees one text channel as it grows (a choice's ``content``, a tool
call's ``arguments``, a content block's text), returns what may go out now and keeps
back only what a later piece could still change: the start of a secret, the digits of a
number. ``TextStream`` runs one rewriter per channel over a stream of any dialect: the
transaction's dialect says where each event's text is, which channel it continues, and
how held-back text goes out when its channel ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from luthien_control.dialects.base import ChannelKey, Dialect, Released
from luthien_control.sse import Chunk


class TextRewriter(Protocol):
    def feed(self, text: str) -> str:
        """Take the next piece of the channel; return the text that may go out now."""
        ...

    def flush(self) -> str:
        """The channel has ended: return what was held back (rewritten)."""
        ...


class TextStream:
    """A stream transform that runs a ``TextRewriter`` over every text channel.

    The dialect finds the channels (``Dialect.text_slots``) and puts held-back text out
    when a channel ends (``Dialect.release``) or when the stream does. An event left
    with nothing in it is dropped; every other event keeps its shape. ``kinds`` limits
    the rewrite to some kinds of text (``{"text"}``: the model's message only).
    """

    def __init__(
        self,
        make_rewriter: Callable[[], TextRewriter],
        dialect: Dialect,
        *,
        kinds: frozenset[str] | None = None,
    ) -> None:
        self._make = make_rewriter
        self._dialect = dialect
        self._kinds = kinds
        self._channels: dict[ChannelKey, tuple[TextRewriter, str]] = {}
        self._template: dict[str, Any] | None = None
        # Each channel's text as sent, for a dialect that repeats it whole later on.
        self._sent: dict[ChannelKey, list[str]] | None = {} if dialect.has_summaries else None

    async def on_chunk(self, chunk: Chunk) -> list[Chunk]:
        data = chunk.data
        if not isinstance(data, dict):
            return [chunk]
        return self.on_data(chunk, data)

    def on_data(self, chunk: Chunk, data: dict[str, Any]) -> list[Chunk]:
        """``on_chunk`` for a chunk whose JSON is an object (``data``)."""
        dialect = self._dialect
        if self._template is None:
            self._template = dialect.template(data)
        kinds = self._kinds
        sent = self._sent
        plain = dialect.plain_text(data) if sent is None else None
        if plain is not None:  # the usual event: one piece of message text, nothing more
            if kinds is not None and "text" not in kinds:
                return [chunk]
            holder, name, key = plain
            text = holder[name]
            out = self._rewriter(key, "text").feed(text)
            if out == text:
                return [chunk]
            holder[name] = out
            chunk.mark_changed()
            return [chunk] if out or "usage" in data else []
        changed = False
        for slot in dialect.text_slots(data):
            if kinds is not None and slot.kind not in kinds:
                continue
            text = slot.text
            out = self._rewriter(slot.key, slot.kind).feed(text)
            if out != text:
                slot.set(out)
                changed = True
            if sent is not None:
                sent.setdefault(slot.key, []).append(out)
        if sent:
            changed |= self._summaries(data)
        if self._channels:
            closing = dialect.closing(data)
            if closing:
                held = self._flush(closing)
                if held and sent is not None:
                    for piece in held:
                        sent.setdefault(piece.key, []).append(piece.text)
                    changed |= self._summaries(data)
                if held:
                    if changed:
                        chunk.mark_changed()
                    return dialect.release(chunk, data, held)
        if not changed:
            return [chunk]
        chunk.mark_changed()
        return [] if dialect.emptied(data) else [chunk]

    async def on_end(self) -> list[Chunk]:
        if not self._channels:
            return []
        held = self._flush(None)
        return self._dialect.release_at_end(held, self._template or {}) if held else []

    def _summaries(self, data: dict[str, Any]) -> bool:
        """Make the strings that repeat a channel whole say what was sent of it."""
        sent = self._sent
        assert sent is not None
        changed = False
        for slot in self._dialect.summary_slots(data):
            parts = sent.get(slot.key)
            if parts is None:
                continue
            text = "".join(parts)
            if slot.text != text:
                slot.set(text)
                changed = True
        return changed

    def new_rewriter(self, kind: str) -> TextRewriter:
        """The rewriter of a new channel of this ``kind`` (a subclass may pick by kind)."""
        return self._make()

    def _rewriter(self, key: ChannelKey, kind: str) -> TextRewriter:
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = (self.new_rewriter(kind), kind)
        return channel[0]

    def _flush(self, prefixes: list[ChannelKey] | None) -> list[Released]:
        """End the channels under ``prefixes`` (all when None): what they held back."""
        held: list[Released] = []
        for key in list(self._channels):
            if prefixes is None or any(key[: len(p)] == p for p in prefixes):
                rewriter, kind = self._channels.pop(key)
                rest = rewriter.flush()
                if rest:
                    held.append(Released(key, kind, rest))
        return held
