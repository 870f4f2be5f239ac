"""OpenAI's chat completions (``/chat/completions``): the only module that knows its shapes.

Requests: ``messages`` (content a string or a list of parts), ``tools``; buffered
answers: ``choices[].message``; streams: ``choices[].delta`` chunks whose strings the SDK
concatenates per choice (content, refusal, reasoning, each tool call's name and
arguments), ended by ``data: [DONE]``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from luthien_control.dialects.base import (
    ChannelKey,
    Dialect,
    Released,
    StreamRules,
    TextSlot,
    UsageBook,
    request_model,
    sse,
)
from luthien_control.exceptions import BackendBroken, MalformedRequest
from luthien_control.sse import DONE_EVENT, Chunk

if TYPE_CHECKING:
    from luthien_control.transaction import Transaction


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Message(_Strict):
    role: str
    content: str | list[dict[str, Any]] | None = None


class _StreamOptions(_Strict):
    include_usage: bool | None = None


class _ChatRequest(_Strict):
    model: str
    messages: list[_Message]
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _param(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "content", "str")`` → ``messages[0].content`` (union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part):
            break
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _scalar_type(annotation: Any) -> type | None:
    """``X | None`` → ``X`` when X is a plain scalar (bool, int, float), else None."""
    kinds = [kind for kind in get_args(annotation) if kind is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (bool, int, float) else None


# Optional scalar fields of the model and the one type each may have (``None`` aside),
# read from the model itself; a field the quick check does not know sends the request
# to pydantic, so a field added to the model is never let through unchecked.
_PLAIN_FIELDS: dict[str, type] = {
    name: kind
    for name, field in _ChatRequest.model_fields.items()
    if (kind := _scalar_type(field.annotation)) is not None
}
_UNKNOWN_TO_QUICK_CHECK = tuple(
    set(_ChatRequest.model_fields)
    - set(_PLAIN_FIELDS)
    - {"model", "messages", "stream_options", "tools"}
)


def _plainly_valid(payload: dict[str, Any]) -> bool:
    """True only for a request whose every known field has the plainest valid shape
    (exact types: a bool is no int here, an int no float), which ``_ChatRequest``
    accepts; anything else goes to pydantic, which also words the errors. Most requests
    are plain, and pydantic's validation cost ~50 µs of CPU on a cold request path."""
    if type(payload.get("model")) is not str:
        return False
    if any(name in payload for name in _UNKNOWN_TO_QUICK_CHECK):
        return False
    messages = payload.get("messages")
    if type(messages) is not list:
        return False
    for message in messages:
        if type(message) is not dict or type(message.get("role")) is not str:
            return False
        content = message.get("content")
        if content is not None and type(content) is not str:
            return False
    for name, kind in _PLAIN_FIELDS.items():
        value = payload.get(name)
        if value is not None and type(value) is not kind:
            return False
    options = payload.get("stream_options")
    if options is not None:
        if type(options) is not dict:
            return False
        include_usage = options.get("include_usage")
        if include_usage is not None and type(include_usage) is not bool:
            return False
    tools = payload.get("tools")
    return tools is None or (type(tools) is list and all(type(tool) is dict for tool in tools))


def validate_chat_request(payload: Any) -> None:
    """Raise ``MalformedRequest`` (400, naming the parameter) unless ``payload`` is a
    well-typed chat completion request. Unknown fields are the backend's business."""
    if not isinstance(payload, dict):
        raise MalformedRequest("the request body must be a JSON object")
    if _plainly_valid(payload):
        return
    try:
        _ChatRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(first["loc"])
        raise MalformedRequest(f"invalid value for '{param}': {first['msg']}", param=param) from exc


def client_wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


# Delta fields the SDK concatenates across chunks, and what their text is.
_DELTA_KINDS = {
    "content": "text",
    "refusal": "refusal",
    "reasoning": "reasoning",
    "reasoning_content": "reasoning",
}
_TEMPLATE_FIELDS = ("id", "object", "created", "model")


@dataclass(slots=True)
class ToolCall:
    """One tool call, reassembled from its deltas (kept in pieces, joined when read:
    appending to a growing string would copy it at every delta)."""

    index: int
    id: str | None = None
    name_parts: list[str] = field(default_factory=list)
    argument_parts: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "".join(self.name_parts)

    @property
    def arguments(self) -> str:
        return "".join(self.argument_parts)


@dataclass(slots=True)
class ChoiceState:
    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, ToolCall] = field(default_factory=dict)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.content)


@dataclass(slots=True)
class ChatAssembler:
    """Folds chat-completion chunks into the message each choice spells out."""

    choices: dict[int, ChoiceState] = field(default_factory=dict)
    chunks: int = 0
    usage: dict[str, Any] | None = None
    terminal: str | None = None

    def copy(self) -> ChatAssembler:
        """An independent copy (the relay's "as sent" assembler, split from "as received"
        at the first chunk a policy changes)."""
        return ChatAssembler(
            choices={
                index: ChoiceState(
                    list(state.content),
                    {
                        key: ToolCall(
                            call.index, call.id, list(call.name_parts), list(call.argument_parts)
                        )
                        for key, call in state.tool_calls.items()
                    },
                    state.finish_reason,
                )
                for index, state in self.choices.items()
            },
            chunks=self.chunks,
            usage=self.usage,
            terminal=self.terminal,
        )

    def feed(self, data: Any) -> None:
        self.chunks += 1
        if type(data) is not dict:
            return
        usage = data.get("usage")
        if usage is not None and type(usage) is dict:
            self.usage = usage
        choices = data.get("choices")
        if not choices or type(choices) is not list:
            return
        for choice in choices:  # once per chunk of every stream: kept lean
            if type(choice) is not dict:
                continue
            index = choice.get("index", 0)
            if type(index) is not int:
                index = -1  # the record keeps it apart; a content policy refuses it
            state = self.choices.get(index)
            if state is None:
                state = self.choices[index] = ChoiceState()
            delta = choice.get("delta")
            if delta and type(delta) is dict:
                content = delta.get("content")
                if content is not None and type(content) is str:
                    state.content.append(content)
                elif type(content) is list:  # content as parts (some providers): one text
                    state.content.extend(_part_texts(content))
                calls = delta.get("tool_calls")
                if calls:
                    self._feed_tool_calls(state, calls)
            elif type(choice.get("text")) is str:  # legacy completions
                state.content.append(choice["text"])
            finish_reason = choice.get("finish_reason")
            if finish_reason:
                state.finish_reason = finish_reason

    @staticmethod
    def _feed_tool_calls(state: ChoiceState, calls: Any) -> None:
        if type(calls) is not list:
            return
        for call in calls:
            if type(call) is not dict:
                continue
            index = call.get("index", 0)
            if type(index) is not int:
                index = -1
            tool = state.tool_calls.setdefault(index, ToolCall(index))
            tool.id = call.get("id") or tool.id
            function = call.get("function")
            if type(function) is not dict:
                continue
            name, arguments = function.get("name"), function.get("arguments")
            if isinstance(name, str):
                tool.name_parts.append(name)
            if isinstance(arguments, str):
                tool.argument_parts.append(arguments)

    def message(self, index: int = 0) -> dict[str, Any]:
        """The assembled message of one choice, in the non-streamed response's shape."""
        state = self.choices.get(index, ChoiceState())
        message: dict[str, Any] = {"role": "assistant", "content": state.text or None}
        if state.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for _, call in sorted(state.tool_calls.items())
            ]
        return message

    def summary(self) -> dict[str, Any]:
        choices = []
        for index, state in sorted(self.choices.items()):
            message = self.message(index)
            for call in message.get("tool_calls", ()):
                parsed = _json_or_none(call["function"]["arguments"])
                if parsed is not None:
                    call["function"]["parsed_arguments"] = parsed
            choices.append(
                {"index": index, "message": message, "finish_reason": state.finish_reason}
            )
        return {"chunks": self.chunks, "choices": choices}


def _json_or_none(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _emptied_choice(choice: Any) -> bool:
    """A choice with nothing left in it (its text was all held back)."""
    if not isinstance(choice, dict) or choice.get("finish_reason"):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return all(_empty(value) for value in delta.values())
    return choice.get("text") == ""


def _empty(value: Any) -> bool:
    if value == "" or value is None or value == []:
        return True
    if isinstance(value, dict):  # a tool call or audio part whose strings are all held
        return all(_empty(item) for key, item in value.items() if key not in ("index", "type"))
    if isinstance(value, list):
        return all(_empty(item) for item in value)
    return False


def _message_slots(message: Any, key: ChannelKey) -> list[TextSlot]:
    """The texts of one message: content (string or parts), refusal, tool calls."""
    slots: list[TextSlot] = []
    if not isinstance(message, dict):
        return slots
    content = message.get("content")
    if isinstance(content, str):
        slots.append(TextSlot((*key, "content"), message, "content", "text"))
    elif isinstance(content, list):  # parts: their texts are read as one text
        joined = (*key, "content")
        for position, part in enumerate(content):
            if isinstance(part, dict):
                for name in ("text", "refusal"):
                    if isinstance(part.get(name), str):
                        kind = "text" if name == "text" else "refusal"
                        joins = joined if name == "text" else None
                        slots.append(TextSlot((*joined, position), part, name, kind, joins))
    for name, kind in (("refusal", "refusal"), ("reasoning_content", "reasoning")):
        if isinstance(message.get(name), str):
            slots.append(TextSlot((*key, name), message, name, kind))
    calls = message.get("tool_calls")
    for position, call in enumerate(calls if isinstance(calls, list) else ()):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            for name, kind in (("name", "name"), ("arguments", "arguments")):
                if isinstance(function.get(name), str):
                    slots.append(TextSlot((*key, "tool_calls", position), function, name, kind))
    return slots


_INJECTED_USAGE = b',"usage":null'


class ChatUsageBook:
    """Takes the backend's usage figures, and hides what the client did not ask for.

    The proxy asks every chat stream for ``include_usage`` (``ChatDialect.ask_for_usage``);
    when the client did not, the usage-only chunk is dropped and the ``"usage": null`` the
    backend then adds to every chunk is removed again, so the client sees exactly the
    stream it asked for.
    """

    __slots__ = ("hide", "tx")

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self.hide = tx.usage_injected

    def see(self, chunk: Chunk, raw: bytes) -> Chunk | None:
        """``raw``: the chunk's bytes, which the caller found to hold ``"usage"`` or a
        ``\\u`` escape that may spell it (then only the parsed data tells)."""
        if self.hide:
            stripped = raw.replace(_INJECTED_USAGE, b"")
            if len(stripped) != len(raw):
                data = chunk.data  # parsed from the bytes as they came
                if type(data) is dict and data.get("usage", 0) is None:
                    # A copy: the caller's parse stays the event as it came (its record).
                    chunk.set_parsed({k: v for k, v in data.items() if k != "usage"})
                chunk.replace_raw(stripped)  # the same event, as the client asked for it
                if b'"usage"' not in stripped:
                    return chunk
        data = chunk.data
        if not isinstance(data, dict) or "usage" not in data:
            return chunk
        usage = data["usage"]
        if isinstance(usage, dict):
            self.tx.usage = self.tx.dialect.usage(usage)
        if self.hide:
            if isinstance(usage, dict) and not data.get("choices"):
                return None
            del data["usage"]
            chunk.mark_changed()
        return chunk


class ChatDialect(Dialect):
    """``POST /chat/completions``."""

    name = "chat"

    def ask_for_usage(self, payload: Any) -> bool:
        if not isinstance(payload, dict) or client_wants_usage(payload):
            return False
        # Usage is recorded for every stream; the usage book hides it again.
        options = payload.get("stream_options")
        payload["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
        return True

    def usage_book(self, tx: Transaction) -> UsageBook | None:
        return ChatUsageBook(tx)

    def validate_request(self, payload: Any) -> None:
        validate_chat_request(payload)

    def request_slots(self, payload: Any) -> list[TextSlot]:
        messages = payload.get("messages") if isinstance(payload, dict) else None
        slots: list[TextSlot] = []
        for index, message in enumerate(messages if isinstance(messages, list) else ()):
            slots.extend(_message_slots(message, ("messages", index)))
        return slots

    def answer_slots(self, payload: Any) -> list[TextSlot]:
        choices = payload.get("choices") if isinstance(payload, dict) else None
        slots: list[TextSlot] = []
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict):
                slots.extend(_message_slots(choice.get("message"), (choice.get("index", 0),)))
        return slots

    def new_assembler(self) -> ChatAssembler:
        return ChatAssembler()

    def text_slots(self, data: dict[str, Any]) -> list[TextSlot]:
        choices = data.get("choices")
        if not choices or not isinstance(choices, list):
            return []
        slots: list[TextSlot] = []
        for choice in choices:
            # isinstance, not type(): a subclass an earlier policy put there is still
            # text that goes out (orjson writes it as a plain object or string).
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                _delta_slots(choice.get("index", 0), delta, slots)
        return slots

    def plain_text(self, data: dict[str, Any]) -> tuple[Any, str, ChannelKey] | None:
        choices = data.get("choices")
        if type(choices) is not list or len(choices) != 1:
            return None
        choice = choices[0]
        if type(choice) is not dict or choice.get("finish_reason"):
            return None
        delta = choice.get("delta")
        if type(delta) is not dict or len(delta) != 1 or type(delta.get("content")) is not str:
            return None
        return delta, "content", (choice.get("index", 0), "content", None)

    def closing(self, data: dict[str, Any]) -> list[ChannelKey]:
        choices = data.get("choices")
        if not choices or not isinstance(choices, list):
            return []
        return [
            (choice.get("index", 0),)
            for choice in choices
            if isinstance(choice, dict) and choice.get("finish_reason")
        ]

    def release(self, chunk: Chunk, data: dict[str, Any], held: list[Released]) -> list[Chunk]:
        """Held text goes into the chunk that finishes its choice."""
        by_index = {
            choice.get("index", 0): choice
            for choice in data.get("choices") or ()
            if isinstance(choice, dict)
        }
        for piece in held:
            choice = by_index.get(piece.key[0])
            if choice is not None:
                _put_back(choice.setdefault("delta", {}), piece)
        chunk.mark_changed()
        return [chunk]

    def release_at_end(self, held: list[Released], template: dict[str, Any]) -> list[Chunk]:
        choices: dict[int, dict[str, Any]] = {}
        for piece in held:
            index = piece.key[0]
            choice = choices.setdefault(index, {"index": index, "delta": {}})
            _put_back(choice["delta"], piece)
        return [Chunk.from_data({**template, "choices": [choices[i] for i in sorted(choices)]})]

    def emptied(self, data: dict[str, Any]) -> bool:
        choices = data.get("choices")
        return "usage" not in data and all(_emptied_choice(choice) for choice in choices or ())

    def template(self, data: dict[str, Any]) -> dict[str, Any]:
        return {k: data[k] for k in _TEMPLATE_FIELDS if k in data}

    def stream_complete(self, received: Any, *, done: bool, pending: bytes) -> bool:
        return done

    def stream_rules(self) -> StreamRules:
        return _ChatRules()

    def blocked_answer(self, notice: str, tx: Transaction) -> bytes | None:
        message = {"role": "assistant", "content": notice, "refusal": None}
        return orjson.dumps(
            {
                **_made_up(tx, "chat.completion"),
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }
        )

    def blocked_stream(self, notice: str, tx: Transaction) -> bytes | None:
        base = _made_up(tx, "chat.completion.chunk")
        start = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return (
            sse({**base, "choices": [start]}) + self._closing_chunk(base, [0], notice) + DONE_EVENT
        )

    def blocked_ending(self, notice: str, tx: Transaction, sent: Any) -> bytes | None:
        if any(s.tool_calls and not s.finish_reason for s in sent.choices.values()):
            return None  # a tool call may be cut half-way: it cannot be taken back
        base = _made_up(tx, "chat.completion.chunk")
        indexes = sorted(sent.choices) or [0]
        return self._closing_chunk(base, indexes, "\n\n" + notice) + DONE_EVENT

    @staticmethod
    def _closing_chunk(base: dict[str, Any], indexes: list[int], text: str) -> bytes:
        choices = [
            {"index": index, "delta": {"content": text}, "finish_reason": "stop"}
            for index in indexes
        ]
        return sse({**base, "choices": choices})


class _ChatRules:
    """Nothing more for a choice once it has finished: the SDK would append it. A new
    choice takes the next index (0, 1, 2, ...): the SDK finds a choice by its index as a
    position in its list (``choices[index]``), so a choice that skipped one, or a
    negative index, would merge into another choice than the one the proxy reads."""

    __slots__ = ("_finished", "_seen")

    def __init__(self) -> None:
        self._finished: set[Any] = set()
        self._seen: set[int] = set()

    def check(self, data: Any, chunk: Chunk) -> None:
        choices = data.get("choices") if type(data) is dict else None
        if not choices or type(choices) is not list:
            return
        for choice in choices:
            if type(choice) is not dict:
                continue
            index = choice.get("index", 0)
            if not isinstance(index, int):
                raise BackendBroken("the backend's stream has a choice without an index")
            if index not in self._seen:
                if index != len(self._seen):
                    raise BackendBroken(
                        "the backend's stream has a choice whose index does not follow "
                        "the ones before it"
                    )
                self._seen.add(index)
            delta = choice.get("delta")
            calls = delta.get("tool_calls") if type(delta) is dict else None
            if calls and any(
                type(call) is dict and type(call.get("index", 0)) is not int for call in calls
            ):
                raise BackendBroken("the backend's stream has a tool call without an index")
            if index in self._finished and not _empty(delta):
                raise BackendBroken("the backend's stream went on with a finished choice")
            if choice.get("finish_reason"):
                self._finished.add(index)


def _made_up(tx: Transaction, kind: str) -> dict[str, Any]:
    """The head of an answer the proxy writes itself."""
    return {
        "id": f"chatcmpl-{tx.id}",
        "object": kind,
        "created": int(time.time()),
        "model": request_model(tx),
    }


class _Parts:
    """A delta whose ``content`` is a list of parts, seen as the one text they spell.
    Rewritten, it is written back as a string: the API's own shape (the SDK's delta
    holds a string), the text the client would have read."""

    __slots__ = ("delta",)

    def __init__(self, delta: dict[str, Any]) -> None:
        self.delta = delta

    def __getitem__(self, name: str) -> str:
        return "".join(_part_texts(self.delta[name]))

    def __setitem__(self, name: str, text: str) -> None:
        self.delta[name] = text


def _part_texts(parts: list[Any]) -> list[str]:
    return [part["text"] for part in parts if type(part) is dict and type(part.get("text")) is str]


def _delta_slots(index: int, delta: dict[str, Any], slots: list[TextSlot]) -> None:
    for field_name, value in delta.items():
        if isinstance(value, str):  # the role too: the SDK joins it like the rest
            kind = _DELTA_KINDS.get(field_name, "other")
            slots.append(TextSlot((index, field_name, None), delta, field_name, kind))
        elif field_name == "content" and isinstance(value, list):
            # Content as a list of parts (some providers): the text they spell continues
            # the choice's content channel, as the client reads it.
            slots.append(TextSlot((index, "content", None), _Parts(delta), "content", "text"))
        elif field_name == "tool_calls" and isinstance(value, list):
            for call in value:
                if not isinstance(call, dict):
                    continue
                call_index = call.get("index", 0)
                function = call.get("function")
                if isinstance(function, dict):
                    _function_slots(index, call_index, function, slots)
                # The call's other strings (its id, a custom tool's name and input):
                # the SDK joins them across chunks too.
                rest = {k: v for k, v in call.items() if k != "function"}
                _nested_slots(index, ("tool_calls", call_index), call, rest, slots)
        elif field_name == "function_call" and isinstance(value, dict):  # the legacy call
            _function_slots(index, "function_call", value, slots)
        elif field_name == "audio" and isinstance(value, dict):
            if isinstance(value.get("transcript"), str):
                slots.append(TextSlot((index, "audio", None), value, "transcript", "audio"))
            rest = {k: v for k, v in value.items() if k != "transcript"}
            _nested_slots(index, ("audio",), value, rest, slots)
        elif isinstance(value, dict | list):
            _nested_slots(index, (field_name,), delta, {field_name: value}, slots, top=True)


# Keys the SDK's ``accumulate_delta`` replaces instead of joining.
_REPLACED = frozenset({"index", "type"})


def _nested_slots(
    index: int,
    path: tuple[Any, ...],
    holder: dict[str, Any],
    fields: dict[str, Any],
    slots: list[TextSlot],
    *,
    top: bool = False,
) -> None:
    """Every other string of a delta, at any depth, as a channel of its own: the OpenAI
    SDK folds a chunk's delta into the message with ``accumulate_delta``, which joins
    *every* string it meets again (a tool call's ``id``, ``audio.id``, a field no API
    documents), dicts by key and lists of objects by their ``index``; so a key split
    across such strings is read whole by the client. A channel's key is
    ``(choice, "path", path)``: the keys and list ``index`` values that lead to it."""
    stack: list[tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]] = [
        ((() if top else path), holder, fields)
    ]
    while stack:
        where, parent, items = stack.pop()
        for name, value in items.items():
            if name in _REPLACED:
                continue
            if isinstance(value, str):
                slots.append(TextSlot((index, "path", (*where, name)), parent, name, "other"))
            elif isinstance(value, dict):
                stack.append(((*where, name), value, value))
            elif isinstance(value, list):
                for entry in value:  # the SDK merges objects by their index
                    if isinstance(entry, dict) and isinstance(entry.get("index"), int):
                        stack.append(((*where, name, entry["index"]), entry, entry))


def _function_slots(
    index: int, call_index: int | str, function: dict[str, Any], slots: list[TextSlot]
) -> None:
    for name in ("name", "arguments"):
        if isinstance(function.get(name), str):
            slots.append(TextSlot((index, name, call_index), function, name, name))


def _put_back(delta: dict[str, Any], piece: Released) -> None:
    """Append held text to its field in a choice's ``delta``. The key's last part says
    where: ``None`` a field of the delta, ``"function_call"`` the legacy call, an int
    the ``tool_calls`` entry of that index."""
    _, field_name, call = piece.key
    if field_name == "path":  # a string at any depth (``_nested_slots``)
        _put_back_at(delta, call, piece.text)
        return
    if call is None:
        if field_name == "audio":
            audio = delta.setdefault("audio", {})
            audio["transcript"] = (audio.get("transcript") or "") + piece.text
        elif isinstance(delta.get(field_name), list):  # content as parts: one more part
            delta[field_name].append({"type": "text", "text": piece.text})
        else:
            delta[field_name] = (delta.get(field_name) or "") + piece.text
        return
    if call == "function_call":
        function = delta.setdefault("function_call", {})
    else:
        calls = delta.setdefault("tool_calls", [])
        entry = next((c for c in calls if c.get("index", 0) == call), None)
        if entry is None:
            entry = {"index": call, "function": {}}
            calls.append(entry)
        function = entry.setdefault("function", {})
    function[field_name] = (function.get(field_name) or "") + piece.text


def _put_back_at(delta: dict[str, Any], path: tuple[Any, ...], text: str) -> None:
    """Append ``text`` to the string at ``path`` in ``delta`` (made as needed): keys of
    objects, and for a list the ``index`` of its entry, as the SDK folds them. A tool
    call's entry made here carries a ``function`` (the SDK asserts one in every delta
    of a function call), unless the text is a custom tool's."""
    holder: Any = delta
    for step, following in itertools.pairwise(path):
        if isinstance(holder, list):
            entries = (e for e in holder if isinstance(e, dict) and e.get("index") == step)
            entry = next(entries, None)
            if entry is None:
                entry = {"index": step}
                if path[0] == "tool_calls" and following != "custom":
                    entry["function"] = {}
                holder.append(entry)
            holder = entry
            continue
        default: Any = [] if isinstance(following, int) else {}
        child = holder.get(step)
        if not isinstance(child, dict | list):
            child = holder[step] = default
        holder = child
    name = path[-1]
    holder[name] = (holder.get(name) or "") + text
