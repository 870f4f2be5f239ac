"""The interface every API dialect implements, and what the dialect-neutral view is made of.

The proxy speaks several APIs (OpenAI chat completions, OpenAI Responses, Anthropic
Messages, the legacy completions and embeddings). Each has its own JSON shapes; a dialect
module is the only place that knows them. Policies and the recorder ask the transaction's
dialect (``tx.dialect``) instead:

- ``text_slots(data)``: where the text is in a stream event, a request or a buffered
  answer, as ``TextSlot``s. A slot's ``key`` names its *channel*: the pieces of one
  channel are concatenated by the client across events (a choice's content, a tool
  call's arguments, a content block's text), so a rewriter sees the channel as it grows.
- ``closing(data)``: which channels end with a stream event, and ``release()`` /
  ``release_at_end()``: how text a policy held back goes out before they end.
- ``request_tool_calls(payload)`` / ``answer_tool_calls(payload)`` /
  ``tool_call_holder(judge)``: the tool calls of a request, a buffered answer and a
  stream, in the neutral view of ``tool_calls.py`` (each dialect's shapes in its
  ``*_tools.py`` module).
- ``new_assembler()``: folds a stream into the message it spells out, for the record.
- ``error_body()`` / ``error_event()`` / ``stream_complete()``: how the dialect reports
  an error and how a stream ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import orjson

from luthien_control.dialects import reading
from luthien_control.responses import error_status_and_body

if TYPE_CHECKING:
    from luthien_control.dialects.tool_calls import ToolCalls
    from luthien_control.policies.tools.hold import CallJudge
    from luthien_control.sse import Chunk
    from luthien_control.transaction import StreamTransform, Transaction, Usage

ChannelKey = tuple[Any, ...]


@dataclass(slots=True)
class TextSlot:
    """One string the client will show or use: ``holder[field]``.

    ``key`` is its channel (strings of one channel are joined by the client across
    events); ``kind`` says what the text is: ``text`` (the model's message), ``refusal``,
    ``reasoning``, ``arguments`` (a tool call's input), ``name`` (a tool's name),
    ``audio`` (a transcript). ``joins`` names the text it is a piece of when the client
    (or the model) reads several strings as one, in order: the parts of a message, the
    text blocks of an answer, the ``output_text`` of a Responses answer (the SDKs join
    them); ``None``: it is read alone.
    """

    key: ChannelKey
    holder: Any  # a dict, or a list for a string inside an array
    field: Any  # the key in a dict, or the index in a list
    kind: str
    joins: ChannelKey | None = None

    @property
    def text(self) -> str:
        value: str = self.holder[self.field]
        return value

    def set(self, text: str) -> None:
        self.holder[self.field] = text


@dataclass(slots=True)
class Released:
    """Text a rewriter held back on a channel, going out as the channel ends."""

    key: ChannelKey
    kind: str
    text: str


class StreamRules(Protocol):
    """The order a dialect's stream must keep, checked event by event while a policy
    reads the content: an event the client would fold where the policies did not look
    (text after its channel ended, a block out of place) is ``BackendBroken``."""

    def check(self, data: Any, chunk: Chunk) -> None:
        """``data``: the event's JSON; ``chunk``: the event (its ``event:`` name)."""


class UsageBook(Protocol):
    """Sees each stream event that holds ``"usage"`` (or a ``\\u`` escape that may
    spell it) before the policies do."""

    def see(self, chunk: Chunk, raw: bytes) -> Chunk | None:
        """The event to pass on (``None``: dropped, it was only the proxy's question)."""
        ...


class StreamAssembler(Protocol):
    """Folds a stream's events into what they spell out, for the record and the logs."""

    chunks: int
    usage: dict[str, Any] | None
    terminal: str | None

    def feed(self, data: Any) -> None: ...

    def copy(self) -> StreamAssembler: ...

    def summary(self) -> dict[str, Any]:
        """The assembled answer, as the record stores it."""
        ...


class Dialect:
    """One API's shapes. The base is a raw OpenAI-style route: no text, no channels."""

    name: ClassVar[str] = "raw"
    vendor: ClassVar[str] = "openai"  # whose API: the backend key's header follows it

    # --- requests ---------------------------------------------------------------------

    def validate_request(self, payload: Any) -> None:
        """Raise ``MalformedRequest`` unless the request is well-formed for this API.
        Only what the backend itself would refuse: clients send more than the docs say."""

    def request_slots(self, payload: Any) -> list[TextSlot]:
        """The texts of a request's conversation (messages, instructions, inputs)."""
        return []

    def answer_slots(self, payload: Any) -> list[TextSlot]:
        """The texts of a buffered answer."""
        return []

    def request_text(self, payload: Any) -> str:
        """The conversation as a reader (a judge) sees it: ``role: text`` paragraphs."""
        return reading.request_text(payload)

    def answer_text(self, payload: Any) -> str:
        """A buffered answer as a reader sees it: text, then ``[tool call] name: args``."""
        return reading.answer_text(payload)

    def stream_text(self, data: dict[str, Any], state: dict[Any, Any]) -> list[tuple[int, str]]:
        """The text one stream event adds for a reader, per choice; ``state`` is the
        caller's, one per stream."""
        return reading.stream_text(data, state)

    def usage(self, raw: dict[str, Any]) -> Usage:
        from luthien_control.transaction import Usage

        return Usage(
            prompt_tokens=_int(raw.get("prompt_tokens", raw.get("input_tokens"))),
            completion_tokens=_int(raw.get("completion_tokens", raw.get("output_tokens"))),
            total_tokens=_int(raw.get("total_tokens")),
            raw=raw,
        )

    def answer_usage(self, payload: Any) -> dict[str, Any] | None:
        usage = payload.get("usage") if isinstance(payload, dict) else None
        return usage if isinstance(usage, dict) else None

    # --- streams ----------------------------------------------------------------------

    def new_assembler(self) -> StreamAssembler:
        return RawAssembler()

    def ask_for_usage(self, payload: Any) -> bool:
        """Make a stream request ask for its token usage if the client did not; True when
        the proxy asked (its usage book then hides the answer again)."""
        return False

    def usage_book(self, tx: Transaction) -> UsageBook | None:
        """What takes a stream's usage events (and hides what the proxy asked for)."""
        return None

    def stream_rules(self) -> StreamRules | None:
        """A checker of this stream's order, or None when the dialect has none."""
        return None

    def text_slots(self, data: dict[str, Any]) -> list[TextSlot]:
        """The channel texts of one stream event."""
        return []

    def joins(self, key: ChannelKey) -> ChannelKey | None:
        """The text a stream channel is a piece of, when the client reads several
        channels as one, in order (the parts of a message, the text blocks of an answer:
        the SDK joins them); ``None``: the channel is read alone."""
        return None

    def event_answer(self, data: dict[str, Any]) -> Any:
        """The answer (or part of one) that a stream event repeats whole, in the shape
        ``answer_slots`` reads (the Responses API's response object), or None."""
        return None

    def assembled_slots(self, summary: dict[str, Any]) -> list[TextSlot]:
        """The texts of a stream's assembled answer (``StreamAssembler.summary()``), as
        ``answer_slots`` finds them in a buffered answer."""
        return self.answer_slots(summary)

    # The stream repeats a channel's whole text in later events (the Responses API's
    # ``*.done``, ``output_item.done``, ``response.completed``): ``summary_slots`` finds
    # those, and a rewriter makes them say what the channel's deltas said as sent.
    has_summaries: ClassVar[bool] = False

    def summary_slots(self, data: dict[str, Any]) -> list[TextSlot]:
        """Strings of one event that repeat a channel whole (``key``: that channel)."""
        return []

    def plain_text(self, data: dict[str, Any]) -> tuple[Any, str, ChannelKey] | None:
        """The usual event, cheaply: when it carries one piece of message text and
        nothing else a rewriter or a closing channel cares about, (holder, field,
        channel); else None, and ``text_slots`` and ``closing`` are asked. Emptied, such
        an event is dropped (unless it carries usage)."""
        return None

    def closing(self, data: dict[str, Any]) -> list[ChannelKey]:
        """Key prefixes of the channels that end with this event."""
        return []

    def release(self, chunk: Chunk, data: dict[str, Any], held: list[Released]) -> list[Chunk]:
        """Put ``held`` text out as its channels end at ``chunk``; returns the events to send."""
        return [chunk]

    def release_at_end(self, held: list[Released], template: dict[str, Any]) -> list[Chunk]:
        """Held text of channels still open when the stream ended."""
        return []

    def emptied(self, data: dict[str, Any]) -> bool:
        """After a rewrite, the event carries nothing the client needs (all text held)."""
        return False

    def template(self, data: dict[str, Any]) -> dict[str, Any]:
        """What a new event of this stream copies from its first event (id, model...)."""
        return {}

    def stream_complete(self, received: StreamAssembler, *, done: bool, pending: bytes) -> bool:
        """The backend's stream ended as a complete answer (not cut short)."""
        return not pending.strip()

    # --- tool calls (tool_calls.py) -----------------------------------------------------
    # The base, and so every OpenAI route, looks for both OpenAI shapes (openai_tools.py);
    # the modules are loaded on first use, since they build on policies/tools.

    def request_tool_calls(self, payload: Any) -> ToolCalls:
        """The tool calls of a request's history, in order, each to keep or ``drop()``;
        ``commit()`` removes the dropped ones with their results."""
        from luthien_control.dialects import openai_tools

        return openai_tools.request_calls(payload)

    def answer_tool_calls(self, payload: Any) -> ToolCalls:
        """The tool calls of a buffered answer, as ``request_tool_calls``; ``commit()``
        keeps the finish or stop reason consistent."""
        from luthien_control.dialects import openai_tools

        return openai_tools.answer_calls(payload)

    def tool_call_holder(self, judge: CallJudge) -> StreamTransform:
        """A stream transform holding each streamed tool call until it is complete; then
        ``judge`` settles it and its events go out as they came, or never (the events
        after it renumbered, the stop reason made consistent)."""
        from luthien_control.dialects.openai_tools import OpenAICalls

        return OpenAICalls(judge)

    # --- errors -----------------------------------------------------------------------

    def error_body(
        self, exc: BaseException, transaction_id: str, *, dev: bool
    ) -> tuple[int, dict[str, Any]]:
        """The HTTP status and this API's error body for ``exc``."""
        return error_status_and_body(exc, transaction_id, dev=dev)

    def error_event(
        self, exc: BaseException, tx: Transaction, sent: StreamAssembler, *, dev: bool
    ) -> bytes:
        """The last event of a stream that failed after it began."""
        _, payload = self.error_body(exc, tx.id, dev=dev)
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    # --- a block as the model's reply (``block_with: message``) ------------------------
    # A complete, normal answer whose text is ``notice`` (what was blocked and why): the
    # client, an agent above all, takes it as the model's reply instead of retrying an
    # error. ``None``: this dialect has no such answer (the block is an error then).

    def blocked_answer(self, notice: str, tx: Transaction) -> bytes | None:
        """A buffered answer (JSON) saying ``notice``."""
        return None

    def blocked_stream(self, notice: str, tx: Transaction) -> bytes | None:
        """A whole stream, from its first event to its end, saying ``notice``."""
        return None

    def blocked_ending(self, notice: str, tx: Transaction, sent: StreamAssembler) -> bytes | None:
        """How a stream already begun ends as a complete answer: whatever is open is
        closed, ``notice`` added as the last text, the stop reason a normal one (no tool
        call left pending). ``sent``: the stream as the client got it."""
        return None


def request_model(tx: Transaction) -> str:
    """The model the client asked for (what a made-up answer names)."""
    payload = tx.request.payload
    model = payload.get("model") if isinstance(payload, dict) else None
    return model if isinstance(model, str) else "unknown"


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class RawAssembler:
    """Counts the events of a stream on a route whose shapes the proxy does not know."""

    __slots__ = ("chunks", "terminal", "usage")

    def __init__(self) -> None:
        self.chunks = 0
        self.usage: dict[str, Any] | None = None
        self.terminal: str | None = None

    def feed(self, data: Any) -> None:
        self.chunks += 1

    def copy(self) -> RawAssembler:
        other = RawAssembler()
        other.chunks = self.chunks
        return other

    def summary(self) -> dict[str, Any]:
        return {"chunks": self.chunks}


def joined_slots(slots: list[TextSlot]) -> list[list[TextSlot]]:
    """The slots that are read as one text (``TextSlot.joins``), grouped, in order; only
    groups of two strings or more."""
    groups: dict[ChannelKey, list[TextSlot]] = {}
    for slot in slots:
        if slot.joins is not None:
            groups.setdefault(slot.joins, []).append(slot)
    return [group for group in groups.values() if len(group) > 1]


def string_slots(value: Any, key: ChannelKey, kind: str) -> list[TextSlot]:
    """Every string inside a JSON value as a slot of its own (``key`` + its position)."""
    out: list[TextSlot] = []
    stack: list[tuple[Any, ChannelKey]] = [(value, key)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            for name, child in item.items():
                if isinstance(child, str):
                    out.append(TextSlot((*where, name), item, name, kind))
                elif isinstance(child, dict | list):
                    stack.append((child, (*where, name)))
        elif isinstance(item, list):
            for index, child in enumerate(item):
                if isinstance(child, str):
                    out.append(TextSlot((*where, index), item, index, kind))
                elif isinstance(child, dict | list):
                    stack.append((child, (*where, index)))
    return out
