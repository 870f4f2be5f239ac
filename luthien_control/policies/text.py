"""Text rewriting over requests, responses and streams, with bounded hold-back.

A ``TextRewriter`` sees one text channel as it grows (a choice's ``content``, a tool
call's ``arguments``, a content block's text), returns what may go out now and keeps
back only what a later piece could still change: the start of a secret, the digits of a
number. ``TextStream`` runs one rewriter per channel over a stream of any dialect: the
transaction's dialect says where each event's text is, which channel it continues, and
how held-back text goes out when its channel ends.

Some channels are pieces of one text the client reads whole (``Dialect.joins``: the
parts of a Responses answer's output text, the text blocks of a Messages answer). A
``TextStream`` made ``joined`` runs one rewriter over all of them, in order, so that
what it holds back at the end of one part carries over to the next: a part that ends
with text held back is closed only once the next part begins (the held text then goes
out at its start) or once nothing more can join it (the held text then ends the part,
as usual). Meanwhile the events in between wait, a few at most (``CARRY_EVENTS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from luthien_control.dialects.base import ChannelKey, Dialect, Released, TextSlot
from luthien_control.sse import Chunk


class TextRewriter(Protocol):
    def feed(self, text: str) -> str:
        """Take the next piece of the channel; return the text that may go out now."""
        ...

    def flush(self) -> str:
        """The channel has ended: return what was held back (rewritten)."""
        ...


# Events a part's end may wait for the next part of the same text (its own end events,
# the end of its item, the start of the next item and part): past this, it ends as usual.
CARRY_EVENTS = 8


def _holding(rewriter: TextRewriter) -> bool:
    """Whether ``rewriter`` holds text back (one that cannot say is taken to)."""
    return bool(getattr(rewriter, "holding", True))


@dataclass(slots=True)
class _Carry:
    """A part that ended while its text's rewriter held text back: its end event (and
    the events before it that are ready) and the events after it, waiting."""

    key: ChannelKey
    kind: str
    group: ChannelKey
    rewriter: TextRewriter
    ready: list[Chunk]  # events that go out before the end event (released text)
    closing: Chunk
    data: dict[str, Any]
    after: list[Chunk] = field(default_factory=list)


class TextStream:
    """A stream transform that runs a ``TextRewriter`` over every text channel.

    The dialect finds the channels (``Dialect.text_slots``) and puts held-back text out
    when a channel ends (``Dialect.release``) or when the stream does. An event left
    with nothing in it is dropped; every other event keeps its shape. ``kinds`` limits
    the rewrite to some kinds of text (``{"text"}``: the model's message only).
    ``joined``: channels that are parts of one text (``Dialect.joins``) share one
    rewriter, which reads them as the client does, as one text.
    """

    def __init__(
        self,
        make_rewriter: Callable[[], TextRewriter],
        dialect: Dialect,
        *,
        kinds: frozenset[str] | None = None,
        joined: bool = False,
    ) -> None:
        self._make = make_rewriter
        self._dialect = dialect
        self._kinds = kinds
        self._joined = joined
        # channel → (its rewriter, its kind, the text it is a part of)
        self._channels: dict[ChannelKey, tuple[TextRewriter, str, ChannelKey | None]] = {}
        self._groups: dict[ChannelKey, TextRewriter] = {}  # joined text → its rewriter
        self._carry: _Carry | None = None
        self._template: dict[str, Any] | None = None
        # Each channel's text as sent, for a dialect that repeats it whole later on.
        self._sent: dict[ChannelKey, list[str]] | None = {} if dialect.has_summaries else None

    async def on_chunk(self, chunk: Chunk) -> list[Chunk]:
        data = chunk.data
        if not isinstance(data, dict):
            return [chunk]
        return self.on_data(chunk, data)

    def _carried(self, carry: _Carry, chunk: Chunk, data: dict[str, Any]) -> list[Chunk]:
        """``on_data`` while a part's end waits for the next part of its text."""
        groups = self._groups_of(data)
        if carry.group in groups:  # the next part of the same text: the held text goes there
            before = self._end_carry(resume=True)
        elif (
            not groups
            and len(carry.after) < CARRY_EVENTS
            and not self._has_text(data)
            and not self._closes_channel(data)
        ):  # an event with no text, that ends none: it waits with the part's end
            carry.after.append(chunk)
            return []
        else:
            before = self._end_carry(resume=False)
        return before + self.on_data(chunk, data)

    def _groups_of(self, data: dict[str, Any]) -> set[ChannelKey]:
        """The joined texts an event adds to."""
        dialect = self._dialect
        plain = dialect.plain_text(data) if self._sent is None else None
        keys = [plain[2]] if plain is not None else [slot.key for slot in self._slots(data)]
        return {group for key in keys if (group := dialect.joins(key)) is not None}

    def _closes_channel(self, data: dict[str, Any]) -> bool:
        prefixes = self._dialect.closing(data) if self._channels else ()
        return any(key[: len(p)] == p for key in self._channels for p in prefixes)

    def _has_text(self, data: dict[str, Any]) -> bool:
        return bool(self._slots(data)) or self._dialect.plain_text(data) is not None

    def _slots(self, data: dict[str, Any]) -> list[TextSlot]:
        kinds = self._kinds
        slots = self._dialect.text_slots(data)
        return slots if kinds is None else [slot for slot in slots if slot.kind in kinds]

    def _end_carry(self, *, resume: bool) -> list[Chunk]:
        """The waiting events, out: the held text goes on into the next part
        (``resume``), or it ends the part it was held in."""
        carry = self._carry
        assert carry is not None
        self._carry = None
        closing: list[Chunk] = [carry.closing]
        if not resume:
            rest = carry.rewriter.flush()
            if rest:
                if self._sent is not None:
                    self._sent.setdefault(carry.key, []).append(rest)
                carry.closing.mark_changed()
                piece = Released(carry.key, carry.kind, rest)
                closing = self._dialect.release(carry.closing, carry.data, [piece])
        if self._sent:  # the end events say what was sent of the part, now it is known
            for event in (carry.closing, *carry.after):
                if isinstance(event.data, dict) and self._summaries(event.data):
                    event.mark_changed()
        return [*carry.ready, *closing, *carry.after]

    def on_data(self, chunk: Chunk, data: dict[str, Any]) -> list[Chunk]:
        """``on_chunk`` for a chunk whose JSON is an object (``data``)."""
        if self._carry is not None:
            return self._carried(self._carry, chunk, data)
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
                held, carried = self._flush(closing)
                if held and sent is not None:
                    for piece in held:
                        sent.setdefault(piece.key, []).append(piece.text)
                    changed |= self._summaries(data)
                if changed:
                    chunk.mark_changed()
                events = dialect.release(chunk, data, held) if held else [chunk]
                if carried is not None:  # the part's end waits for the next part
                    key, kind, group, rewriter = carried
                    ready = [event for event in events if event is not chunk]
                    self._carry = _Carry(key, kind, group, rewriter, ready, chunk, data)
                    return []
                if held:
                    return events
        if not changed:
            return [chunk]
        chunk.mark_changed()
        return [] if dialect.emptied(data) else [chunk]

    async def on_end(self) -> list[Chunk]:
        out = self._end_carry(resume=False) if self._carry is not None else []
        if not self._channels:
            return out
        held, _ = self._flush(None)
        return out + self._dialect.release_at_end(held, self._template or {}) if held else out

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
            group = self._dialect.joins(key) if self._joined else None
            if group is None:
                rewriter = self.new_rewriter(kind)
            elif (rewriter := self._groups.get(group)) is None:  # type: ignore[assignment]
                rewriter = self._groups[group] = self.new_rewriter(kind)
            channel = self._channels[key] = (rewriter, kind, group)
        return channel[0]

    def _flush(
        self, prefixes: list[ChannelKey] | None
    ) -> tuple[list[Released], tuple[ChannelKey, str, ChannelKey, TextRewriter] | None]:
        """End the channels under ``prefixes`` (all when None): what they held back. A
        part of a joined text keeps its rewriter's held text for the next part: that
        part is returned second (the caller makes its end wait)."""
        held: list[Released] = []
        carried = None
        for key in list(self._channels):
            if prefixes is None or any(key[: len(p)] == p for p in prefixes):
                rewriter, kind, group = self._channels.pop(key)
                if group is not None and prefixes is not None:
                    if _holding(rewriter):
                        carried = (key, kind, group, rewriter)
                    continue
                rest = rewriter.flush()
                if rest:
                    held.append(Released(key, kind, rest))
        return held, carried
