"""Demonstration rewrites of the model's text."""

from __future__ import annotations

import re
from typing import Any

from luthien_control.policies.base import Policy
from luthien_control.policies.text import ChatTextStream
from luthien_control.transaction import StreamTransform, Transaction

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


def _increment_content(message: Any) -> bool:
    """Increment integers in a message's ``content`` (a string or text parts)."""
    if not isinstance(message, dict):
        return False
    content = message.get("content")
    if isinstance(content, str):
        new = _increment(content)
        message["content"] = new
        return new != content
    changed = False
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                new = _increment(part["text"])
                changed |= new != part["text"]
                part["text"] = new
    return changed


class IncrementIntegers(Policy):
    """Adds 1 to every integer in the message text, right across chunk boundaries."""

    type_name = "IncrementIntegers"

    async def on_request(self, tx: Transaction) -> None:
        payload = tx.request.payload
        if isinstance(payload, dict) and isinstance(payload.get("messages"), list):
            changed = False
            for message in payload["messages"]:
                changed |= _increment_content(message)
            if changed:
                tx.request.mark_changed()
                tx.record(self.name, "changed", "request")

    async def on_response(self, tx: Transaction) -> None:
        assert tx.response is not None
        payload = tx.response.payload
        if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
            return
        changed = False
        for choice in payload["choices"]:
            if isinstance(choice, dict):
                changed |= _increment_content(choice.get("message"))
                if isinstance(choice.get("text"), str):
                    new = _increment(choice["text"])
                    changed |= new != choice["text"]
                    choice["text"] = new
        if changed:
            tx.response.mark_changed()
            tx.record(self.name, "changed", "response")

    def stream_transform(self, tx: Transaction) -> StreamTransform:
        return ChatTextStream(_IntegerRewriter, fields=frozenset({"content", "text"}))
