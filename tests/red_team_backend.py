"""A hostile backend for the red-team suite (``tests/test_red_team.py``).

``HostileBackend`` is a loopback ASGI app (served by uvicorn in a thread) that answers
each request with the canned bytes its ``x-red-case`` header names: any status, any
headers, a body that no honest API would send (escapes, repeated keys, gzip, a stream
cut into pieces at chosen byte offsets, CR framing...), or an answer computed from the
request (echoing the key it was sent). It keeps every request it got, as it got it, so
that a test can tell what reached it.

The builders below write the three dialects' answers (chat completions, Responses,
Anthropic Messages), buffered and streamed, well-formed by default, so that a case only
spells out what it makes hostile.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from tests.conftest import free_port

CASE_HEADER = "x-red-case"
CREATED = 1_700_000_000


def dumps(value: Any) -> bytes:
    """Compact JSON, non-ASCII as UTF-8 (as the APIs write it)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event; ``data`` as JSON unless it is already bytes."""
    payload = data if isinstance(data, bytes) else dumps(data)
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + payload + b"\n\n"


# --- what the backend answers -------------------------------------------------------------


@dataclass
class Canned:
    """A canned answer: ``pieces`` go out as separate network writes when ``pause`` is
    set (so that the proxy reads them apart), else as one body. ``cut``: the connection
    is closed without ending the body. ``hang``: nothing is ever sent."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    pieces: list[bytes] = field(default_factory=list)
    pause: float = 0.0
    cut: bool = False
    hang: bool = False


JSON_TYPE = ("content-type", "application/json")
SSE_TYPE = ("content-type", "text/event-stream")


def json_answer(body: Any, status: int = 200, *headers: tuple[str, str]) -> Canned:
    return Canned(status, [JSON_TYPE, *headers], [body if isinstance(body, bytes) else dumps(body)])


def stream_answer(events: list[bytes], *headers: tuple[str, str], pause: float = 0.0) -> Canned:
    return Canned(200, [SSE_TYPE, ("cache-control", "no-cache"), *headers], events, pause=pause)


def byte_pieces(data: bytes, size: int) -> list[bytes]:
    """``data`` cut every ``size`` bytes, whatever it cuts through (events, characters)."""
    return [data[i : i + size] for i in range(0, len(data), size)]


@dataclass
class Received:
    """One request as the backend read it."""

    method: str
    path: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[str, str]]  # names in lower case, in order
    body: bytes

    def text(self) -> str:
        lines = [f"{self.method} {self.raw_path.decode('latin-1')}?{self.query.decode('latin-1')}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        return "\n".join(lines) + "\n\n" + self.body.decode("utf-8", "replace")


Answerer = Callable[[Received], Canned]


class HostileBackend:
    """The ASGI app: ``answers`` maps a case id (the ``x-red-case`` header) to its
    ``Canned`` answer or to a function of the request; ``received`` keeps the requests."""

    def __init__(self, answers: dict[str, Canned | Answerer], default: Answerer) -> None:
        self.answers = answers
        self.default = default
        self.received: dict[str, list[Received]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        received = Received(
            scope["method"],
            scope["path"],
            scope.get("raw_path") or scope["path"].encode(),
            scope.get("query_string", b""),
            headers,
            body,
        )
        case = dict(headers).get(CASE_HEADER, "")
        self.received.setdefault(case, []).append(received)
        answer = self.answers.get(case, self.default)
        canned = answer if isinstance(answer, Canned) else answer(received)
        if canned.hang:
            await asyncio.sleep(10)  # the proxy gives up long before
            return
        pieces = canned.pieces
        headers_out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in canned.headers]
        if not canned.cut and (len(pieces) == 1 or not canned.pause):
            headers_out.append((b"content-length", str(sum(map(len, pieces))).encode()))
            pieces = [b"".join(pieces)]
        await send({"type": "http.response.start", "status": canned.status, "headers": headers_out})
        for number, piece in enumerate(pieces, 1):
            last = number == len(pieces) and not canned.cut
            await send({"type": "http.response.body", "body": piece, "more_body": not last})
            if canned.pause and not last:
                await asyncio.sleep(canned.pause)
        # cut: returning before the body ended closes the connection


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields its URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="critical", lifespan="off", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "backend did not start"
        time.sleep(0.01)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


# --- chat completions -----------------------------------------------------------------------


def chat_message(**message: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "refusal": None, **message}


def chat_body(
    message: dict[str, Any] | None = None,
    *,
    finish: str = "stop",
    choices: list[dict[str, Any]] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """A chat completion; ``message`` is the first choice's message (a whole message)."""
    if choices is None:
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        choices = [choice]
    body = {
        "id": "chatcmpl-red",
        "object": "chat.completion",
        "created": CREATED,
        "model": "gpt-red",
        "choices": choices,
        "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
    }
    body.update(top)
    return body


def chat_chunk(
    delta: dict[str, Any] | None = None, *, finish: str | None = None, index: int = 0, **extra: Any
) -> dict[str, Any]:
    """One chat chunk with one choice; ``extra`` goes into the choice (``logprobs``)."""
    choice = {"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
    choice.update(extra)
    return {
        "id": "chatcmpl-red",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "gpt-red",
        "choices": [choice],
    }


def chat_events(*middle: dict[str, Any] | bytes, finish: str = "stop") -> list[bytes]:
    """A chat stream: a role chunk, ``middle`` (deltas, whole chunks or raw events), a
    finishing chunk and ``[DONE]``."""
    events = [sse(chat_chunk({"role": "assistant", "content": ""}))]
    for item in middle:
        if isinstance(item, bytes):
            events.append(item)
        elif "choices" in item or "object" in item or "type" in item or "error" in item:
            events.append(sse(item))
        else:
            events.append(sse(chat_chunk(item)))
    events.append(sse(chat_chunk({}, finish=finish)))
    events.append(b"data: [DONE]\n\n")
    return events


def chat_call(name: Any, arguments: str, call_id: str = "call_red", **extra: Any) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
        **extra,
    }


def chat_call_deltas(
    name: str, arguments: str, *, index: int = 0, call_id: str = "call_red", pieces: int = 3
) -> list[dict[str, Any]]:
    """The deltas of one streamed call: id, type and name first, then the arguments in
    ``pieces`` parts."""
    size = max(1, -(-len(arguments) // pieces))
    parts = [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]
    first = {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    rest = [{"index": index, "function": {"arguments": part}} for part in parts]
    return [{"tool_calls": [call]} for call in (first, *rest)]


# --- Responses API --------------------------------------------------------------------------


def response_object(
    output: list[dict[str, Any]], status: str = "completed", **top: Any
) -> dict[str, Any]:
    body = {
        "id": "resp_red",
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "model": "gpt-red",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 5,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 10,
        },
    }
    body.update(top)
    return body


def text_part(text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": [], **extra}


def message_item(*parts: dict[str, Any], item_id: str = "msg_red") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": list(parts),
    }


def function_item(name: str, arguments: str, call_id: str = "call_red") -> dict[str, Any]:
    return {
        "id": "fc_red",
        "type": "function_call",
        "status": "completed",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


class ResponsesStream:
    """Writes a Responses API stream: numbered events, each output item from
    ``output_item.added`` to ``output_item.done``, and ``response.completed`` holding
    the items as their ``done`` events stated them (unless told otherwise)."""

    def __init__(self, **top: Any) -> None:
        self.events: list[bytes] = []
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.top = top
        self.emit("response.created", response=response_object([], "in_progress", **top))

    def emit(self, kind: str, **fields: Any) -> None:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        self.events.append(sse(data, kind))

    def raw(self, event: bytes) -> None:
        self.events.append(event)

    def message(self, *parts: list[str] | tuple[str, list[str]], item_id: str = "msg_red") -> None:
        """A message item; each part is its text deltas (an ``output_text`` part), or
        (``"refusal"``, deltas)."""
        index = len(self.output)
        start = {
            "id": item_id,
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self.emit("response.output_item.added", output_index=index, item=start)
        done_parts = []
        for content_index, spec in enumerate(parts):
            kind, deltas = spec if isinstance(spec, tuple) else ("output_text", spec)
            place = {"item_id": item_id, "output_index": index, "content_index": content_index}
            empty = text_part("") if kind == "output_text" else {"type": "refusal", "refusal": ""}
            self.emit("response.content_part.added", **place, part=empty)
            text = "".join(deltas)
            if kind == "output_text":
                for delta in deltas:
                    self.emit("response.output_text.delta", **place, delta=delta, logprobs=[])
                self.emit("response.output_text.done", **place, text=text, logprobs=[])
                part = text_part(text)
            else:
                for delta in deltas:
                    self.emit("response.refusal.delta", **place, delta=delta)
                self.emit("response.refusal.done", **place, refusal=text)
                part = {"type": "refusal", "refusal": text}
            self.emit("response.content_part.done", **place, part=part)
            done_parts.append(part)
        self.item_done(index, message_item(*done_parts, item_id=item_id))

    def function_call(self, name: str, deltas: list[str], call_id: str = "call_red") -> None:
        index = len(self.output)
        start = function_item(name, "", call_id) | {"status": "in_progress"}
        self.emit("response.output_item.added", output_index=index, item=start)
        place = {"item_id": "fc_red", "output_index": index}
        for delta in deltas:
            self.emit("response.function_call_arguments.delta", **place, delta=delta)
        self.emit("response.function_call_arguments.done", **place, arguments="".join(deltas))
        self.item_done(index, function_item(name, "".join(deltas), call_id))

    def item(self, item: dict[str, Any], *between: tuple[str, dict[str, Any]]) -> None:
        """Any item, added in progress and done as given, with events of its own between."""
        index = len(self.output)
        self.emit(
            "response.output_item.added", output_index=index, item={**item, "status": "in_progress"}
        )
        for kind, fields in between:
            self.emit(kind, output_index=index, item_id=item.get("id"), **fields)
        self.item_done(index, item)

    def item_done(self, index: int, item: dict[str, Any]) -> None:
        self.emit("response.output_item.done", output_index=index, item=item)
        self.output.append(item)

    def done(self, output: list[dict[str, Any]] | None = None, **top: Any) -> list[bytes]:
        final = self.output if output is None else output
        self.emit("response.completed", response=response_object(final, **{**self.top, **top}))
        return self.events


# --- Anthropic Messages ---------------------------------------------------------------------


def anthropic_message(
    content: list[dict[str, Any]], stop_reason: str = "end_turn", **top: Any
) -> dict[str, Any]:
    body = {
        "id": "msg_red",
        "type": "message",
        "role": "assistant",
        "model": "claude-red",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 5},
    }
    body.update(top)
    return body


class MessagesStream:
    """Writes an Anthropic Messages stream, block by block, with ``event:`` lines."""

    def __init__(self, **top: Any) -> None:
        self.events: list[bytes] = []
        self.index = 0
        start = anthropic_message([], stop_reason=None, **top)  # type: ignore[arg-type]
        start["usage"] = {"input_tokens": 5, "output_tokens": 1}
        self.emit({"type": "message_start", "message": start})

    def emit(self, data: dict[str, Any], event: str | None = None) -> None:
        self.events.append(sse(data, event or data["type"]))

    def raw(self, event: bytes) -> None:
        self.events.append(event)

    def block(self, start: dict[str, Any], deltas: list[dict[str, Any]]) -> None:
        index = self.index
        self.index += 1
        self.emit({"type": "content_block_start", "index": index, "content_block": start})
        for delta in deltas:
            self.emit({"type": "content_block_delta", "index": index, "delta": delta})
        self.emit({"type": "content_block_stop", "index": index})

    def text(self, *deltas: str) -> None:
        self.block(
            {"type": "text", "text": ""}, [{"type": "text_delta", "text": d} for d in deltas]
        )

    def thinking(self, *deltas: str) -> None:
        self.block(
            {"type": "thinking", "thinking": "", "signature": ""},
            [{"type": "thinking_delta", "thinking": d} for d in deltas]
            + [{"type": "signature_delta", "signature": "c2lnbmF0dXJl"}],
        )

    def tool_use(
        self, name: str, *partial_json: str, kind: str = "tool_use", input: Any = None
    ) -> None:
        start = {
            "type": kind,
            "id": "toolu_red",
            "name": name,
            "input": {} if input is None else input,
        }
        self.block(start, [{"type": "input_json_delta", "partial_json": p} for p in partial_json])

    def done(self, stop_reason: str = "end_turn") -> list[bytes]:
        self.emit(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": 5},
            }
        )
        self.emit({"type": "message_stop"})
        return self.events


# --- legacy completions ---------------------------------------------------------------------


def completion_body(text: str, **choice: Any) -> dict[str, Any]:
    return {
        "id": "cmpl-red",
        "object": "text_completion",
        "created": CREATED,
        "model": "gpt-red",
        "choices": [
            {"text": text, "index": 0, "logprobs": None, "finish_reason": "stop", **choice}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
    }


def completion_chunk(text: str, finish: str | None = None, **choice: Any) -> dict[str, Any]:
    return {
        "id": "cmpl-red",
        "object": "text_completion",
        "created": CREATED,
        "model": "gpt-red",
        "choices": [
            {"text": text, "index": 0, "logprobs": None, "finish_reason": finish, **choice}
        ],
    }


def completion_events(*middle: str | dict[str, Any] | bytes) -> list[bytes]:
    """A legacy completions stream: one chunk per text (or chunk, or raw event), a
    finishing chunk and ``[DONE]``."""
    events = []
    for item in middle:
        if isinstance(item, bytes):
            events.append(item)
        else:
            events.append(sse(completion_chunk(item) if isinstance(item, str) else item))
    events.append(sse(completion_chunk("", "stop")))
    events.append(b"data: [DONE]\n\n")
    return events


def embeddings_body() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
        "model": "embed-red",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
