"""What the mock answers: reply text, its split into deltas, and OpenAI's wire objects.

Streamed events are built from a per-response byte template (``data: {"id":...,"choices":[{``
... ``}]}``) with only the changing part serialized, so every chunk of a response shares
id, created and model and costs one small ``orjson.dumps``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from luthien_control.mock_backend.scenario import DEFAULT_ARGUMENT_FRAGMENT, Scenario, ToolCall

GREETING = "Hello from the Luthien mock backend! You said: "
SYSTEM_FINGERPRINT = "fp_mock"
EMBEDDING_DIMENSIONS = 8
DONE_EVENT = b"data: [DONE]\n\n"

_WORD = re.compile(r"\s*\S+")


def message_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or the text parts of a list joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def last_user_text(messages: Sequence[Any]) -> str:
    """The text of the last ``user`` message, the default reply's echo."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def chat_ends_with_tool_result(messages: Sequence[Any]) -> bool:
    """Whether the last chat message is a tool's result (the answer to a tool call)."""
    last = messages[-1] if messages else None
    return isinstance(last, dict) and last.get("role") in ("tool", "function")


def count_words(texts: Iterable[str]) -> int:
    """Whitespace-separated words in ``texts``: the mock's token count."""
    return sum(len(text.split()) for text in texts)


def chat_prompt_tokens(messages: Sequence[Any]) -> int:
    """Prompt tokens of a chat request: the words of all message contents."""
    total = 0
    for message in messages:
        if isinstance(message, dict):
            content = message.get("content")
            total += len((content if isinstance(content, str) else message_text(content)).split())
    return total


def split_content(
    text: str, *, chunk_size: int | None = None, chunks: int | None = None
) -> list[str]:
    """Content deltas: ``chunk_size`` characters each, exactly ``chunks`` nearly equal
    pieces, or by default one word per delta with its leading whitespace."""
    if chunk_size is not None:
        return [text[i : i + chunk_size] for i in range(0, len(text), chunk_size)]
    if chunks is not None:
        size, extra = divmod(len(text), chunks)
        pieces = []
        start = 0
        for index in range(chunks):
            end = start + size + (index < extra)
            pieces.append(text[start:end])
            start = end
        return pieces
    pieces = _WORD.findall(text)
    if not pieces:
        return [text] if text else []
    consumed = sum(map(len, pieces))
    if consumed < len(text):  # trailing whitespace rides with the last word
        pieces[-1] += text[consumed:]
    return pieces


def split_arguments(arguments: str, size: int) -> list[str]:
    """Tool-call argument fragments of ``size`` characters."""
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


class Reply:
    """The planned answer to one request: content deltas and tool-call fragments
    (legacy completions have no tool calls).

    The non-streamed response is the joined stream, so both report the same usage.
    """

    __slots__ = ("content", "deltas", "fragments", "tool_calls")

    def __init__(
        self, content: str | None, scenario: Scenario, tool_calls: Sequence[ToolCall] = ()
    ) -> None:
        self.content = content
        self.deltas = (
            split_content(content, chunk_size=scenario.chunk_size, chunks=scenario.chunks)
            if content is not None
            else []
        )
        self.tool_calls = tuple(tool_calls)
        size = scenario.chunk_size or DEFAULT_ARGUMENT_FRAGMENT
        self.fragments = [split_arguments(call.arguments, size) for call in self.tool_calls]

    @classmethod
    def for_chat(cls, scenario: Scenario, messages: Sequence[Any]) -> Reply:
        if chat_ends_with_tool_result(messages):
            scenario = scenario.without_tool_calls()
        return cls.for_text(scenario, last_user_text, messages)

    @classmethod
    def for_text(cls, scenario: Scenario, echo: Callable[[Any], str], request_input: Any) -> Reply:
        """The scripted text (or the echo of ``echo(request_input)``, unless only tool calls
        were scripted) and the scripted tool calls."""
        if scenario.content is not None:
            content: str | None = scenario.content
        elif scenario.words is not None:
            content = words(scenario.words)
        elif scenario.tool_calls:
            content = None
        else:
            content = GREETING + echo(request_input)
        return cls(content, scenario, scenario.tool_calls)

    @classmethod
    def for_prompt(cls, scenario: Scenario, prompt: str) -> Reply:
        if scenario.content is not None:
            return cls(scenario.content, scenario)
        if scenario.words is not None:
            return cls(words(scenario.words), scenario)
        return cls(GREETING + prompt, scenario)

    @property
    def completion_tokens(self) -> int:
        return len(self.deltas) + sum(map(len, self.fragments))

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"

    @property
    def text(self) -> str:
        return self.content or ""


def words(n: int) -> str:
    """``n`` deterministic words: ``word0 word1 ...``."""
    return " ".join(f"word{i}" for i in range(n))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _tool_call_objects(tool_calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_mock_{index}",
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for index, call in enumerate(tool_calls)
    ]


def chat_completion(reply: Reply, model: str, prompt_tokens: int) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = _tool_call_objects(reply.tool_calls)
    message["refusal"] = None
    return {
        "id": new_id("chatcmpl-mock-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, reply.completion_tokens),
    }


def text_completion(reply: Reply, model: str, prompt_tokens: int) -> dict[str, Any]:
    """A non-streamed legacy ``text_completion`` object."""
    return {
        "id": new_id("cmpl-mock-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"text": reply.text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage(prompt_tokens, reply.completion_tokens),
    }


class _Frame:
    """The bytes every chunk of one streamed response shares."""

    __slots__ = ("head", "tail", "usage_head")

    def __init__(self, id_prefix: str, object_name: str, model: str, include_usage: bool) -> None:
        common = (
            b'data: {"id":'
            + orjson.dumps(new_id(id_prefix))
            + b',"object":"'
            + object_name.encode()
            + b'","created":'
            + str(int(time.time())).encode()
            + b',"model":'
            + orjson.dumps(model)
            + b',"system_fingerprint":"'
            + SYSTEM_FINGERPRINT.encode()
            + b'","choices":['
        )
        self.head = common + b"{"
        self.tail = b"}]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"
        self.usage_head = common + b'],"usage":'

    def usage_event(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self.usage_head + orjson.dumps(usage(prompt_tokens, completion_tokens)) + b"}\n\n"


def chat_stream(reply: Reply, model: str, prompt_tokens: int, include_usage: bool) -> list[bytes]:
    """Every event of a streamed ``chat.completion.chunk`` response, ``[DONE]`` included."""
    frame = _Frame("chatcmpl-mock-", "chat.completion.chunk", model, include_usage)
    open_delta = frame.head + b'"index":0,"delta":'
    pending = b',"logprobs":null,"finish_reason":null' + frame.tail

    role: dict[str, Any] = {
        "role": "assistant",
        "content": "" if reply.content is not None else None,
        "refusal": None,
    }
    events = [open_delta + orjson.dumps(role) + pending]
    events.extend(open_delta + orjson.dumps({"content": delta}) + pending for delta in reply.deltas)
    for index, (call, fragments) in enumerate(zip(reply.tool_calls, reply.fragments, strict=True)):
        start = {
            "index": index,
            "id": f"call_mock_{index}",
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        events.append(open_delta + orjson.dumps({"tool_calls": [start]}) + pending)
        events.extend(
            open_delta
            + orjson.dumps({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
            + pending
            for fragment in fragments
        )
    finish = b',"logprobs":null,"finish_reason":"' + reply.finish_reason.encode() + b'"'
    events.append(open_delta + b"{}" + finish + frame.tail)
    if include_usage:
        events.append(frame.usage_event(prompt_tokens, reply.completion_tokens))
    events.append(DONE_EVENT)
    return events


def text_stream(reply: Reply, model: str, prompt_tokens: int, include_usage: bool) -> list[bytes]:
    """Every event of a streamed legacy ``text_completion`` response, ``[DONE]`` included."""
    frame = _Frame("cmpl-mock-", "text_completion", model, include_usage)
    open_text = frame.head + b'"text":'
    pending = b',"index":0,"logprobs":null,"finish_reason":null' + frame.tail
    events = [open_text + orjson.dumps(delta) + pending for delta in reply.deltas]
    events.append(open_text + b'"","index":0,"logprobs":null,"finish_reason":"stop"' + frame.tail)
    if include_usage:
        events.append(frame.usage_event(prompt_tokens, reply.completion_tokens))
    events.append(DONE_EVENT)
    return events


def embedding_vector(text: str) -> tuple[float, ...]:
    """Eight deterministic float32 values in [-1, 1) derived from a hash of ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = struct.unpack("<8I", digest)
    return struct.unpack("<8f", struct.pack("<8f", *(value / 2**31 - 1.0 for value in raw)))


def embeddings(inputs: Sequence[str], model: str, *, as_base64: bool) -> dict[str, Any]:
    """An embeddings ``list``; ``as_base64`` packs each vector as little-endian float32."""
    data = []
    for index, text in enumerate(inputs):
        vector = embedding_vector(text)
        encoded: Any = (
            base64.b64encode(struct.pack(f"<{EMBEDDING_DIMENSIONS}f", *vector)).decode()
            if as_base64
            else list(vector)
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = count_words(inputs)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
