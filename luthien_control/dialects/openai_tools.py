"""Tool calls on OpenAI routes: chat completions' shapes (``chat_tools``) and the
Responses API's (``responses_tools``), each looked for wherever the payload has it.

Every dialect but Anthropic's takes its tool calls from here (``Dialect``'s default):
chat completions and the Responses API, the legacy completions and embeddings, and any
other path. A request's ``messages`` and its ``input`` are both searched, an answer's
``choices`` and its ``output``, and each stream event by its shape (``choices``: a chat
chunk; a string ``type``: a Responses event; both: both). A call put where the other API
keeps it is checked too: a lenient backend or client may read it there, and a shape of
the other API beside a call must not hide it (a Responses answer with a ``choices`` list
is still read by its SDK from its ``output``).
"""

from __future__ import annotations

from typing import Any

from luthien_control.dialects import chat_tools, responses_tools
from luthien_control.dialects.chat_tool_stream import ChatCalls
from luthien_control.dialects.responses_tool_stream import ResponsesCalls
from luthien_control.dialects.tool_calls import NO_CALLS, ToolCalls
from luthien_control.policies.tools.hold import CallJudge
from luthien_control.sse import Chunk


def request_calls(payload: Any) -> ToolCalls:
    """A request's calls: its chat ``messages``, then its Responses ``input`` items."""
    if not isinstance(payload, dict):
        return NO_CALLS
    parts: list[ToolCalls] = []
    messages = payload.get("messages")
    if isinstance(messages, list) and (calls := chat_tools.history_calls(messages)):
        parts.append(calls)
    items = payload.get("input")
    if isinstance(items, list) and (calls := responses_tools.input_calls(items)):
        parts.append(calls)
    return ToolCalls.joined(parts) if parts else NO_CALLS


def answer_calls(payload: Any) -> ToolCalls:
    """A buffered answer's calls: its ``choices``, then its Responses ``output``. Both are
    searched: a Responses answer that also has a ``choices`` list is read by its SDK from
    its ``output`` all the same."""
    if not isinstance(payload, dict):
        return NO_CALLS
    parts: list[ToolCalls] = []
    choices = payload.get("choices")
    if isinstance(choices, list) and (calls := chat_tools.answer_calls(choices)):
        parts.append(calls)
    output = payload.get("output")
    if isinstance(output, list) and (calls := responses_tools.output_calls(output)):
        parts.append(calls)
    return ToolCalls.joined(parts) if parts else NO_CALLS


class OpenAICalls:
    """Hands each event to the holder of its shape: chat chunks (``choices``) and
    Responses API events (``type``); any other event goes on as it is. An event of both
    shapes goes through both, the chat holder first: each client reads its own."""

    __slots__ = ("_chat", "_judge", "_responses")

    def __init__(self, judge: CallJudge) -> None:
        self._judge = judge
        self._chat: ChatCalls | None = None
        self._responses: ResponsesCalls | None = None

    async def on_chunk(self, chunk: Chunk) -> list[Chunk]:
        data = chunk.data
        if not isinstance(data, dict):
            return [chunk]
        choices = data.get("choices")
        if isinstance(choices, list) and choices:
            if self._chat is None:
                self._chat = ChatCalls(self._judge)
            return self._responses_of(self._chat.on_event(chunk, data, choices))
        return self._responses_of([chunk])

    async def on_end(self) -> list[Chunk]:
        out: list[Chunk] = []
        if self._chat is not None:
            out.extend(self._responses_of(self._chat.on_end()))
        if self._responses is not None:
            out.extend(self._responses.on_end())
        return out

    def _responses_of(self, chunks: list[Chunk]) -> list[Chunk]:
        """``chunks`` through the Responses holder, those that are Responses events."""
        out: list[Chunk] = []
        for chunk in chunks:
            data = chunk.data
            if isinstance(data, dict) and isinstance(data.get("type"), str):
                if self._responses is None:
                    self._responses = ResponsesCalls(self._judge)
                out.extend(self._responses.on_event(chunk, data))
            else:
                out.append(chunk)
        return out
