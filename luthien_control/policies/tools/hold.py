"""Holding streamed tool calls: the part every dialect's stream holder shares.

A dialect's holder (``Dialect.tool_call_holder``: ``dialects/chat_tool_stream.py``,
``responses_tool_stream.py``, ``messages_tools.py``) knows where a call's pieces sit in
its events. It keeps each call's events in a ``Held`` from the first piece on and, once
the call is complete, asks ``CallJudge.settle``: ``True`` releases the events as they
came, ``False`` drops them, ``PolicyBlocked`` ends the stream. The judge asks the
policy's ``decide(call, released)``, which records the decision. A call that receives
more events after its release is reopened: it is checked again when complete, and a
refusal then blocks, since it cannot be taken back from the client any more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

from luthien_control.exceptions import PolicyBlocked
from luthien_control.policies.tools.call import ToolCall

if TYPE_CHECKING:
    from luthien_control.transaction import StreamTransform, Transaction

Event = TypeVar("Event")
Status = Literal["open", "kept", "dropped"]


@dataclass(slots=True, eq=False, kw_only=True)
class Held(Generic[Event]):
    """One streamed tool call being held: its events, and what was decided about it."""

    held: list[Event] = field(default_factory=list)
    status: Status = "open"
    reopened: bool = False  # more events after it was released: it cannot be dropped now
    passed: set[tuple[str, str]] = field(default_factory=set)  # (name, arguments) checked

    def reopen(self) -> None:
        """More events for a call already released: hold them, and check it again."""
        if self.status == "kept":
            self.status = "open"
            self.reopened = True

    def take(self) -> list[Event]:
        """The held events, no longer held."""
        held, self.held = self.held, []
        return held


# Whether a complete streamed call may pass: ``True`` keeps it, ``False`` drops it (the
# refusal recorded), ``PolicyBlocked`` ends the stream. ``released``: the call went out
# already (it was reopened), so a refusal must block.
Decide = Callable[[ToolCall, bool], bool]


class CallJudge:
    """The policy's decisions on the calls of one stream."""

    __slots__ = ("_decide",)

    def __init__(self, decide: Decide) -> None:
        self._decide = decide

    def settle(
        self,
        held: Held[Event],
        versions: list[ToolCall],
        *,
        on_block: Callable[[], None] | None = None,
    ) -> bool:
        """Decide a complete call from every version of it the client could take: keep
        it (``True``) when all pass, drop it (``False``), or raise ``PolicyBlocked``."""
        for call in versions:
            if not self.passes(call, held, released=held.reopened, on_block=on_block):
                held.status = "dropped"
                return False
        held.status = "kept"
        return True

    def passes(
        self,
        call: ToolCall,
        held: Held[Event] | None,
        *,
        released: bool,
        on_block: Callable[[], None] | None = None,
    ) -> bool:
        """Whether one version of a call may pass. A refusal is recorded, and blocks when
        the call was ``released`` already; ``on_block`` runs before ``PolicyBlocked``
        goes up."""
        key = (call.name, call.arguments)
        if held is not None and key in held.passed:
            return True
        try:
            passed = self._decide(call, released)
        except PolicyBlocked:
            if on_block is not None:
                on_block()
            raise
        if passed and held is not None:
            held.passed.add(key)
        return passed


def hold_tool_calls(tx: Transaction, decide: Decide) -> StreamTransform:
    """A stream transform that holds each tool call of ``tx``'s stream until it is
    complete and asks ``decide`` about it, in the dialect's shapes."""
    return tx.dialect.tool_call_holder(CallJudge(decide))
