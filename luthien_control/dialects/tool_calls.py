"""The dialect-neutral view of tool calls: what a dialect hands a policy.

A request's history and a buffered answer: ``Dialect.request_tool_calls(payload)`` and
``Dialect.answer_tool_calls(payload)`` give a ``ToolCalls``, the calls found in order.
Each ``FoundCall`` has its ``versions`` (every ``ToolCall`` a client could take it as,
when the backend spelled it more than one way: all must pass) and ``drop()``.
``ToolCalls.commit()`` then takes the dropped calls out, and the dialect repairs what
is left the way its API needs it: the results of dropped calls removed, messages left
empty removed or filled, a finish or stop reason that named tool calls made a normal
one. Whether the payload changed is what ``commit()`` returns.

A stream: ``Dialect.tool_call_holder(judge)`` is a stream transform that holds each call
from its first piece until it is complete, asks ``judge`` (``policies/tools/hold.py``)
and then sends its events as they came, or never, renumbering what follows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from luthien_control.policies.tools.call import ToolCall


@dataclass(slots=True, eq=False)
class FoundCall:
    """One tool call of a request or a buffered answer. ``at`` is the dialect's: where
    the call sits (policies leave it alone)."""

    versions: list[ToolCall]
    at: Any = None
    dropped: bool = False

    def drop(self) -> None:
        """Remove the call when the ``ToolCalls`` it came from is committed."""
        self.dropped = True


class ToolCalls:
    """The tool calls found in one request or buffered answer, in order."""

    __slots__ = ("_commit", "calls")

    def __init__(self, calls: list[FoundCall], commit: Callable[[], bool]) -> None:
        self.calls = calls
        self._commit = commit

    def __iter__(self) -> Iterator[FoundCall]:
        return iter(self.calls)

    def __len__(self) -> int:
        return len(self.calls)

    def commit(self) -> bool:
        """Take the dropped calls out of the payload, in place, and repair what is left;
        whether anything changed (the caller marks the payload changed)."""
        if not any(call.dropped for call in self.calls):
            return False
        return self._commit()

    @classmethod
    def joined(cls, parts: list[ToolCalls]) -> ToolCalls:
        """Several places of one payload as one: calls in order, each part committed."""
        if len(parts) == 1:
            return parts[0]

        def commit() -> bool:
            changed = False
            for part in parts:
                changed = part.commit() or changed
            return changed

        return cls([call for part in parts for call in part.calls], commit)


def _unchanged() -> bool:
    return False


NO_CALLS = ToolCalls([], _unchanged)
