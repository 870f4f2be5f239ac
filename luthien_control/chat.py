"""The OpenAI chat-completions format: request validation and stream reassembly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from luthien_control.exceptions import MalformedRequest


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


RESPONSES_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})


@dataclass(slots=True)
class ToolCall:
    """One tool call, reassembled from its deltas."""

    index: int
    id: str | None = None
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class ChoiceState:
    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, ToolCall] = field(default_factory=dict)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.content)


@dataclass(slots=True)
class StreamAssembler:
    """Folds chat-completion chunks into the message they spell out."""

    choices: dict[int, ChoiceState] = field(default_factory=dict)
    chunks: int = 0
    usage: dict[str, Any] | None = None
    # The Responses API: the latest response object, sequence number and terminal event.
    response: dict[str, Any] | None = None
    sequence_number: int = -1
    terminal: str | None = None

    def copy(self) -> StreamAssembler:
        """An independent copy (the relay's "as sent" assembler, split from "as received"
        at the first chunk a policy changes)."""
        return StreamAssembler(
            choices={
                index: ChoiceState(
                    list(state.content),
                    {
                        key: ToolCall(call.index, call.id, call.name, call.arguments)
                        for key, call in state.tool_calls.items()
                    },
                    state.finish_reason,
                )
                for index, state in self.choices.items()
            },
            chunks=self.chunks,
            usage=self.usage,
            response=self.response,
            sequence_number=self.sequence_number,
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
        if not choices:
            kind = data.get("type")
            if isinstance(kind, str) and kind.startswith("response."):
                self._feed_response_event(kind, data)
            return
        for choice in choices:  # once per chunk of every stream: kept lean
            if type(choice) is not dict:
                continue
            index = choice.get("index", 0)
            state = self.choices.get(index)
            if state is None:
                state = self.choices[index] = ChoiceState()
            delta = choice.get("delta")
            if delta and type(delta) is dict:
                content = delta.get("content")
                if content is not None and type(content) is str:
                    state.content.append(content)
                calls = delta.get("tool_calls")
                if calls:
                    self._feed_tool_calls(state, calls)
            finish_reason = choice.get("finish_reason")
            if finish_reason:
                state.finish_reason = finish_reason

    @staticmethod
    def _feed_tool_calls(state: ChoiceState, calls: Any) -> None:
        for call in calls:
            if type(call) is not dict:
                continue
            index = call.get("index", 0)
            tool = state.tool_calls.setdefault(index, ToolCall(index))
            tool.id = call.get("id") or tool.id
            function = call.get("function")
            if type(function) is not dict:
                continue
            tool.name += function.get("name") or ""
            tool.arguments += function.get("arguments") or ""

    def _feed_response_event(self, kind: str, data: dict[str, Any]) -> None:
        if isinstance(data.get("sequence_number"), int):
            self.sequence_number = data["sequence_number"]
        response = data.get("response")
        if isinstance(response, dict):
            self.response = response
            if isinstance(response.get("usage"), dict):
                self.usage = response["usage"]
        if kind in RESPONSES_TERMINAL:
            self.terminal = kind
            state = self.choices.setdefault(0, ChoiceState())
            state.finish_reason = response.get("status") if isinstance(response, dict) else kind
        elif kind == "response.output_text.delta" and isinstance(data.get("delta"), str):
            self.choices.setdefault(0, ChoiceState()).content.append(data["delta"])

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
