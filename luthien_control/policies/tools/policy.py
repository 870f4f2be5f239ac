"""``ToolCallPolicy``: its config, the check of one call, and the decision on a refusal."""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

import regex

from luthien_control.policies.base import BlockingConfig, Policy, RegexPattern
from luthien_control.policies.secrets import SecretPattern, default_secrets
from luthien_control.policies.tools import messages as anthropic
from luthien_control.policies.tools.call import ToolCall, argument_texts
from luthien_control.policies.tools.chat_messages import filter_choices, filter_history
from luthien_control.policies.tools.chat_stream import ChatCalls
from luthien_control.policies.tools.names import normalise_name
from luthien_control.policies.tools.responses_items import filter_input, filter_output
from luthien_control.policies.tools.responses_stream import ResponsesCalls
from luthien_control.sse import Chunk
from luthien_control.transaction import StreamTransform, Transaction


class ToolCallPolicy(Policy):
    """Blocks, or drops, tool calls whose name or arguments are not allowed."""

    type_name = "ToolCallPolicy"

    class Config(BlockingConfig):
        allowed_tools: list[str] | None = None
        denied_tools: list[str] = []
        argument_patterns: list[RegexPattern] = []
        action: Literal["block", "drop_call"] = "block"

    def __init__(self, config: Config, raw_config: dict[str, Any]) -> None:
        super().__init__(config, raw_config)
        # Names as compared: normalised (names.py), the configured ones and the calls'.
        allowed = config.allowed_tools
        self.allowed = None if allowed is None else frozenset(map(normalise_name, allowed))
        self.denied = frozenset(map(normalise_name, config.denied_tools))
        self.patterns = [regex.compile(p) for p in config.argument_patterns]
        self.action = config.action

    def check(self, call: ToolCall) -> str | None:
        """Why ``call`` may not pass, or ``None`` when it may. The reason is shown to the
        client, so it names the rule and never quotes the call: a hostile model can put
        a secret in a tool's name as well as in its arguments."""
        name = normalise_name(call.name)
        if name in self.denied:
            return "the tool is in denied_tools"
        if self.allowed is not None and name not in self.allowed:
            return "the tool is not in allowed_tools"
        if self.patterns:
            # Decoded too: a JSON escape (\u0072m) must not hide a match. Arguments that
            # are not strict JSON are refused only when a pattern matches (call.py).
            texts = argument_texts(call.arguments)
            for i, pattern in enumerate(self.patterns):
                if any(pattern.search(text) for text in texts):
                    return f"its arguments match argument_patterns[{i}]"
        return None

    def judge(self, tx: Transaction, call: ToolCall, *, where: str, block: bool = False) -> bool:
        """Whether ``call`` may pass; a violation is recorded, and raises ``PolicyBlocked``
        when the action is ``block`` (or ``block`` is forced)."""
        return self.decide(tx, call, self.check(call), where=where, block=block)

    def decide(
        self, tx: Transaction, call: ToolCall, reason: str | None, *, where: str, block: bool
    ) -> bool:
        """``judge`` once ``check`` has given its ``reason``. The client's message names
        the policy and the rule; the record's detail names the tool, redacted."""
        if reason is None:
            return True
        if block or self.action == "block":
            tx.record(self.name, "blocked", _detail(call))
            raise self.refuse(f"blocked by {self.name}: a tool call in the {where}: {reason}")
        tx.record(self.name, "dropped", _detail(call))
        return False

    async def on_request(self, tx: Transaction) -> None:
        payload = tx.request.payload
        if not isinstance(payload, dict):
            return
        messages = payload.get("messages")
        if tx.dialect.name == "messages":
            if isinstance(messages, list) and anthropic.filter_history(self, tx, messages):
                tx.request.mark_changed()
            return
        if isinstance(messages, list) and filter_history(self, tx, messages):
            tx.request.mark_changed()
        items = payload.get("input")  # the Responses API
        if isinstance(items, list) and filter_input(self, tx, items):
            tx.request.mark_changed()

    async def on_response(self, tx: Transaction) -> None:
        assert tx.response is not None
        payload = tx.response.payload
        if tx.dialect.name == "messages":
            if isinstance(payload, dict) and anthropic.filter_answer(self, tx, payload):
                tx.response.mark_changed()
            return
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list):
            output = payload.get("output") if isinstance(payload, dict) else None
            if isinstance(output, list) and filter_output(self, tx, output):
                tx.response.mark_changed()  # a Responses API response object
            return
        if filter_choices(self, tx, choices):
            tx.response.mark_changed()

    def stream_transform(self, tx: Transaction) -> StreamTransform:
        if tx.dialect.name == "messages":
            return _MessagesStream(anthropic.MessagesCalls(self, tx))
        return _ToolCallStream(self, tx)


_DETAIL_LIMIT = 200  # characters of a tool name kept in a decision's detail


@cache
def _secrets() -> SecretPattern:
    return default_secrets()


def _detail(call: ToolCall) -> str:
    """A decision's detail: the tool's name with any secret in it redacted, cut short."""
    name = _secrets().redact(call.name)[0]
    if len(name) > _DETAIL_LIMIT:
        name = name[:_DETAIL_LIMIT] + "..."
    return f"tool {name}"


class _ToolCallStream:
    """Hands each event to the holder of its dialect: chat chunks (``choices``) or
    Responses API events (``type``); any other event goes on as it is."""

    def __init__(self, policy: ToolCallPolicy, tx: Transaction) -> None:
        self._policy = policy
        self._tx = tx
        self._chat: ChatCalls | None = None
        self._responses: ResponsesCalls | None = None

    async def on_chunk(self, chunk: Chunk) -> list[Chunk]:
        data = chunk.data
        if not isinstance(data, dict):
            return [chunk]
        choices = data.get("choices")
        if isinstance(choices, list) and choices:
            if self._chat is None:
                self._chat = ChatCalls(self._policy, self._tx)
            return self._chat.on_event(chunk, data, choices)
        if isinstance(data.get("type"), str):
            if self._responses is None:
                self._responses = ResponsesCalls(self._policy, self._tx)
            return self._responses.on_event(chunk, data)
        return [chunk]

    async def on_end(self) -> list[Chunk]:
        out: list[Chunk] = []
        if self._chat is not None:
            out.extend(self._chat.on_end())
        if self._responses is not None:
            out.extend(self._responses.on_end())
        return out


class _MessagesStream:
    """Anthropic Messages events to their holder (``tools/messages.py``)."""

    def __init__(self, calls: anthropic.MessagesCalls) -> None:
        self._calls = calls

    async def on_chunk(self, chunk: Chunk) -> list[Chunk]:
        data = chunk.data
        return self._calls.on_event(chunk, data) if isinstance(data, dict) else [chunk]

    async def on_end(self) -> list[Chunk]:
        return self._calls.on_end()
