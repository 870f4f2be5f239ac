"""Demonstration rewrites of the model's text."""

from __future__ import annotations

import re

from luthien_control.dialects import TextSlot
from luthien_control.policies.base import Policy
from luthien_control.policies.text import TextStream
from luthien_control.transaction import StreamTransform, Transaction

_MESSAGE_TEXT = frozenset({"text"})  # the message, not tool calls or reasoning
_INTEGER = re.compile(r"-?\d+")
_UNFINISHED = re.compile(r"-?\d*\Z")


def _increment(text: str) -> str:
    return _INTEGER.sub(lambda m: str(int(m.group()) + 1), text)


class _IntegerRewriter:
    """Holds back a trailing run of digits until the number is complete."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        text = self._held + text
        cut = _UNFINISHED.search(text).start()  # type: ignore[union-attr]  # always matches
        self._held = text[cut:]
        return _increment(text[:cut])

    def flush(self) -> str:
        held, self._held = self._held, ""
        return _increment(held)


def _increment_slots(slots: list[TextSlot]) -> bool:
    """Increment integers in the message text among ``slots``; True when any changed."""
    changed = False
    for slot in slots:
        if slot.kind in _MESSAGE_TEXT:
            text = slot.text
            new = _increment(text)
            if new != text:
                slot.set(new)
                changed = True
    return changed


class IncrementIntegers(Policy):
    """Adds 1 to every integer in the message text, right across chunk boundaries."""

    type_name = "IncrementIntegers"

    async def on_request(self, tx: Transaction) -> None:
        if _increment_slots(tx.dialect.request_slots(tx.request.payload)):
            tx.request.mark_changed()
            tx.record(self.name, "changed", "request")

    async def on_response(self, tx: Transaction) -> None:
        assert tx.response is not None
        if tx.response.status < 400 and _increment_slots(
            tx.dialect.answer_slots(tx.response.payload)
        ):
            tx.response.mark_changed()
            tx.record(self.name, "changed", "response")

    def stream_transform(self, tx: Transaction) -> StreamTransform:
        return TextStream(_IntegerRewriter, tx.dialect, kinds=_MESSAGE_TEXT)
