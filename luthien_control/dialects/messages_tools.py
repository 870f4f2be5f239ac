"""Where Anthropic's Messages API keeps tool calls: ``tool_use`` blocks (and the
``server_tool_use`` and ``mcp_tool_use`` blocks of the tools Anthropic runs) in a
request's history, in a buffered answer, and in a stream.

A streamed ``tool_use`` block is held from its ``content_block_start`` to its
``content_block_stop`` (id, name and the ``input_json_delta`` pieces joined and parsed)
and so is every event after it until it is decided: blocks are sent one after another,
so nothing overtakes it. A dropped block's events are never sent; the blocks after it
are renumbered (``index``), and ``stop_reason`` ``tool_use`` becomes ``end_turn`` when
no ``tool_use`` block is left.
"""

from __future__ import annotations

from typing import Any

import orjson

from luthien_control.dialects.tool_calls import NO_CALLS, FoundCall, ToolCalls
from luthien_control.exceptions import BackendBroken
from luthien_control.policies.tools.call import ToolCall, text_of, versions
from luthien_control.policies.tools.hold import CallJudge, Held
from luthien_control.sse import Chunk

# The blocks that call a tool: the client's (tool_use), and those Anthropic runs itself
# (server_tool_use; mcp_tool_use, a tool of an MCP server of the request's mcp_servers).
CALL_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
# What stands in a history message left empty by a dropped call and its result.
REMOVED = {"type": "text", "text": "[a tool call was removed by the proxy's policy]"}


def _block_calls(block: dict[str, Any]) -> list[ToolCall]:
    call_id = block.get("id")
    arguments = orjson.dumps(block.get("input", {})).decode()
    return versions(
        call_id if isinstance(call_id, str) else None, [text_of(block.get("name"))], [arguments]
    )


def _found_blocks(content: list[Any]) -> list[FoundCall]:
    return [
        FoundCall(_block_calls(block), block)
        for block in content
        if isinstance(block, dict) and block.get("type") in CALL_BLOCKS
    ]


def _remove_blocks(content: list[Any], found: list[FoundCall]) -> list[str | None]:
    """Take the dropped ``tool_use`` blocks out of a content list; returns their ids."""
    dropped: list[str | None] = []
    gone: set[int] = set()
    for call in found:
        if call.dropped:
            gone.add(id(call.at))
            call_id = call.at.get("id")
            dropped.append(call_id if isinstance(call_id, str) else None)
    if gone:
        content[:] = [block for block in content if id(block) not in gone]
    return dropped


def answer_calls(payload: Any) -> ToolCalls:
    """The ``tool_use`` blocks of a buffered message. Committed: the dropped blocks
    removed, ``stop_reason`` kept consistent."""
    content = payload.get("content") if isinstance(payload, dict) else None
    if not isinstance(content, list):
        return NO_CALLS
    found = _found_blocks(content)
    if not found:
        return NO_CALLS

    def commit() -> bool:
        if not _remove_blocks(content, found):
            return False
        if payload.get("stop_reason") == "tool_use" and not any(
            isinstance(block, dict) and block.get("type") in CALL_BLOCKS for block in content
        ):
            payload["stop_reason"] = "end_turn"
        return True

    return ToolCalls(found, commit)


def history_calls(payload: Any) -> ToolCalls:
    """The ``tool_use`` blocks of a request's assistant messages. Committed: the dropped
    blocks removed with their ``tool_result`` blocks (Anthropic refuses a result without
    its call), a message left empty given a text saying why (and an empty one)."""
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(messages, list):
        return NO_CALLS
    groups: list[tuple[list[Any], list[FoundCall]]] = []
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "assistant":
            content = message.get("content")
            if isinstance(content, list) and (found := _found_blocks(content)):
                groups.append((content, found))
    if not groups:
        return NO_CALLS

    def commit() -> bool:
        dropped: set[str | None] = set()
        filled = [m for m in messages if isinstance(m, dict) and m.get("content")]
        for blocks, found in groups:
            dropped.update(_remove_blocks(blocks, found))
        if not dropped:
            return False
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                content[:] = [
                    block
                    for block in content
                    if not (
                        isinstance(block, dict)
                        and _is_result(block.get("type"))
                        and block.get("tool_use_id") in dropped
                    )
                ]
        for message in filled:  # Anthropic refuses an empty message
            if message.get("content") == []:
                message["content"].append(dict(REMOVED))
        return True

    return ToolCalls([call for _, found in groups for call in found], commit)


def _block_type(data: dict[str, Any]) -> Any:
    block = data.get("content_block")
    return block.get("type") if isinstance(block, dict) else None


def _named_as_read(chunk: Chunk, kind: Any) -> None:
    """An event of a tool call must be named (``event:``) as its data's ``type``: the
    anthropic SDK reads an event by its name, leaving out one named ``ping`` or not
    named at all whatever its data says, so that the call it folds would not be the
    one checked. ``BackendBroken`` otherwise."""
    if chunk.event != kind:
        raise BackendBroken("the backend's stream named a tool call's event otherwise")


def _is_result(kind: Any) -> bool:
    """Whether blocks of type ``kind`` answer a call: ``tool_result``, and the results of
    the tools Anthropic runs (``mcp_tool_result``, ``web_search_tool_result``, ...)."""
    return isinstance(kind, str) and kind.endswith("tool_result")


class MessagesCalls:
    """Holds each streamed ``tool_use`` block until it is complete, then lets it go or
    drops it (renumbering the blocks after it)."""

    def __init__(self, judge: CallJudge) -> None:
        self._judge = judge
        self._open: Held[Chunk] | None = None  # the tool_use block being held
        self._index = -1
        self._block: dict[str, Any] = {}
        self._pieces: list[str] = []
        self._queue: list[Chunk] = []  # events after the held block, in order
        self._dropped = 0  # blocks dropped so far: later indexes move down by this
        self._kept_calls = 0

    async def on_chunk(self, chunk: Chunk) -> list[Chunk]:
        data = chunk.data
        return self.on_event(chunk, data) if isinstance(data, dict) else [chunk]

    async def on_end(self) -> list[Chunk]:
        """A block still open when the stream ended is decided as far as it got."""
        return self._settle() if self._open is not None else []

    def on_event(self, chunk: Chunk, data: dict[str, Any]) -> list[Chunk]:
        kind = data.get("type")
        if self._open is not None or (
            kind == "content_block_start" and _block_type(data) in CALL_BLOCKS
        ):
            _named_as_read(chunk, kind)
        if self._open is not None:
            if data.get("index") != self._index:
                self._queue.append(chunk)
                return []
            self._open.held.append(chunk)
            delta = data.get("delta")
            if kind == "content_block_delta" and isinstance(delta, dict):
                if isinstance(delta.get("partial_json"), str):
                    self._pieces.append(delta["partial_json"])
            elif kind == "content_block_stop":
                return self._settle()
            return []
        if kind == "content_block_start":
            block = data.get("content_block")
            if isinstance(block, dict) and block.get("type") in CALL_BLOCKS:
                self._open = Held(held=[chunk])
                self._index = data.get("index")  # type: ignore[assignment]
                self._block = block
                self._pieces = []
                return []
        return [self._renumbered(chunk, data)]

    def _settle(self) -> list[Chunk]:
        held = self._open
        assert held is not None
        self._open = None
        block = self._block
        call_id = block.get("id")
        initial = orjson.dumps(block.get("input", {})).decode()
        # The SDK parses the deltas only once they spell something: empty ones (or none)
        # leave the input the block's start gave.
        streamed = "".join(self._pieces)
        texts = [streamed] if streamed else [initial]
        calls = versions(
            call_id if isinstance(call_id, str) else None, [text_of(block.get("name"))], texts
        )
        out: list[Chunk] = []
        if self._judge.settle(held, calls):
            self._kept_calls += 1
            out.extend(self._renumbered(event, event.data) for event in held.take())
        else:
            held.take()
            self._dropped += 1
        queued, self._queue = self._queue, []
        for event in queued:
            data = event.data
            out.extend(self.on_event(event, data) if isinstance(data, dict) else [event])
        return out

    def _renumbered(self, chunk: Chunk, data: Any) -> Chunk:
        if not self._dropped or not isinstance(data, dict):
            return chunk
        index = data.get("index")
        if isinstance(index, int) and data.get("type", "").startswith("content_block_"):
            data["index"] = index - self._dropped
            chunk.mark_changed()
        elif data.get("type") == "message_delta":
            delta = data.get("delta")
            if (
                isinstance(delta, dict)
                and delta.get("stop_reason") == "tool_use"
                and not self._kept_calls
            ):
                delta["stop_reason"] = "end_turn"
                chunk.mark_changed()
        return chunk
