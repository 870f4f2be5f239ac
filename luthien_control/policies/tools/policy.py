"""``ToolCallPolicy``: its config, the check of one call, and the decision on a refusal."""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

import regex

from luthien_control.dialects.tool_calls import ToolCalls
from luthien_control.policies.base import BlockingConfig, Policy, RegexPattern
from luthien_control.policies.secrets import SecretPattern, default_secrets
from luthien_control.policies.tools.call import ToolCall, argument_texts
from luthien_control.policies.tools.hold import hold_tool_calls
from luthien_control.policies.tools.names import normalise_name
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
        if self._filter(tx, tx.dialect.request_tool_calls(tx.request.payload), "request"):
            tx.request.mark_changed()

    async def on_response(self, tx: Transaction) -> None:
        assert tx.response is not None
        if self._filter(tx, tx.dialect.answer_tool_calls(tx.response.payload), "response"):
            tx.response.mark_changed()

    def stream_transform(self, tx: Transaction) -> StreamTransform:
        def decide(call: ToolCall, released: bool) -> bool:
            return self.decide(tx, call, self.check(call), where="response", block=released)

        return hold_tool_calls(tx, decide)

    def _filter(self, tx: Transaction, calls: ToolCalls, where: str) -> bool:
        """Judge each call found in a request or a buffered answer (every version of it
        must pass) and drop the refused ones; whether the payload changed."""
        for found in calls:
            if not all(self.judge(tx, call, where=where) for call in found.versions):
                found.drop()
        return calls.commit()


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
