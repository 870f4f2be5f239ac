"""Tool calls on OpenAI routes: chat completions' shapes (``chat_tools``) and the
Responses API's (``responses_tools``), each looked for wherever the payload has it.

Every dialect but Anthropic's takes its tool calls from here (``Dialect``'s default):
chat completions and the Responses API, the legacy completions and embeddings, and any
other path. A request's ``messages`` and its ``input`` are both searched, an answer's
``choices`` (else its ``output``), and each stream event by its shape (``choices``: a
chat chunk; a string ``type``: a Responses event). A call put where the other API keeps
it is checked too: a lenient backend or client may read it there.
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
    """A buffered answer's calls: its ``choices``, else a Responses ``output``."""
    if not isinstance(payload, dict):
        return NO_CALLS
    choices = payload.get("choices")
    if isinstance(choices, list):
        return chat_tools.answer_calls(choices)
    output = payload.get("output")
    if isinstance(output, list):
        return responses_tools.output_calls(output)
    return NO_CALLS


class OpenAICalls:
    """Hands each event to the holder of its shape: chat chunks (``choices``) or
    Responses API events (``type``); any other event goes on as it is."""

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
            return self._chat.on_event(chunk, data, choices)
        if isinstance(data.get("type"), str):
            if self._responses is None:
                self._responses = ResponsesCalls(self._judge)
            return self._responses.on_event(chunk, data)
        return [chunk]

    async def on_end(self) -> list[Chunk]:
        out: list[Chunk] = []
        if self._chat is not None:
            out.extend(self._chat.on_end())
        if self._responses is not None:
            out.extend(self._responses.on_end())
        return out
