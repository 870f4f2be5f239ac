"""The API dialects the seed's tests run on: how to ask, and how to read the answer.

``ChatCompletions`` is OpenAI's ``/chat/completions`` (``data:`` lines, ``data: [DONE]``
ends a complete stream); ``Messages`` is Anthropic's ``/messages`` (``event:`` plus
``data:`` lines, ``event: message_stop`` ends a complete stream). Both read the stream
through ``collect_sse_events()``; the adapter only knows where the text is and what a
complete answer looks like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tests.e2e.sse import SSEResult

DEFAULT_PROMPT = "Say hello."


@dataclass(frozen=True)
class Dialect:
    """One API dialect, bound to the model its requests name."""

    model: str

    name: ClassVar[str]
    path: ClassVar[str]  # under the proxy's /v1
    final_event: ClassVar[bytes]  # how the last event of a complete stream begins
    framing_events: ClassVar[int]  # the mock's events around the text deltas of a stream

    def body(
        self, content: str = DEFAULT_PROMPT, *, stream: bool = True, model: str | None = None
    ) -> dict[str, Any]:
        raise NotImplementedError

    def auth(self, key: str) -> dict[str, str]:
        """The header that carries the client key, as this dialect's SDK sends it."""
        raise NotImplementedError

    def pieces(self, result: SSEResult) -> list[str]:
        """The non-empty text deltas of the answer, in order."""
        raise NotImplementedError

    def text(self, result: SSEResult) -> str:
        """The answer's text, assembled as the client assembles it."""
        return "".join(self.pieces(result))

    def complete(self, result: SSEResult) -> bool:
        """Whether the stream ended as a complete answer ends, with nothing after it."""
        raise NotImplementedError

    def check_stream(self, result: SSEResult) -> None:
        """Assert the shape of a complete stream that answered with text only."""
        raise NotImplementedError

    def answer_text(self, body: dict[str, Any]) -> str:
        """Assert the shape of a non-streamed text answer; its text."""
        raise NotImplementedError

    def check_not_found(self, body: dict[str, Any], model: str) -> None:
        """Assert the body of the backend's 404 for an unknown ``model``."""
        raise NotImplementedError


class ChatCompletions(Dialect):
    name = "chat"
    path = "/chat/completions"
    final_event = b"data: [DONE]"
    framing_events = 2  # the role chunk and the finish chunk

    def body(
        self, content: str = DEFAULT_PROMPT, *, stream: bool = True, model: str | None = None
    ) -> dict[str, Any]:
        return {
            "model": model or self.model,
            "messages": [{"role": "user", "content": content}],
            "stream": stream,
        }

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def pieces(self, result: SSEResult) -> list[str]:
        return [
            choice["delta"]["content"]
            for event in result.events
            for choice in event.get("choices", [])
            if choice.get("index", 0) == 0 and choice.get("delta", {}).get("content")
        ]

    def complete(self, result: SSEResult) -> bool:
        return result.done and result.after_done == 0

    def check_stream(self, result: SSEResult) -> None:
        assert result.raw.endswith(b"data: [DONE]\n\n")
        assert all(event["object"] == "chat.completion.chunk" for event in result.events)
        assert result.events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert result.events[-1]["choices"][0]["finish_reason"] == "stop"
        # The client did not ask for usage: no usage chunk and no "usage" key anywhere.
        assert all("usage" not in event for event in result.events)

    def answer_text(self, body: dict[str, Any]) -> str:
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["finish_reason"] == "stop"
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        text: str = body["choices"][0]["message"]["content"]
        return text

    def check_not_found(self, body: dict[str, Any], model: str) -> None:
        error = body["error"]
        assert set(error) >= {"message", "type", "param", "code"}
        assert error["code"] == "model_not_found"
        assert model in error["message"]


class Messages(Dialect):
    name = "messages"
    path = "/messages"
    final_event = b"event: message_stop\n"
    # message_start, content_block_start, ping, content_block_stop, message_delta, message_stop
    framing_events = 6
    # The mock counts every delta as a token: the large response needs some 7,500.
    max_tokens = 32_000

    def body(
        self, content: str = DEFAULT_PROMPT, *, stream: bool = True, model: str | None = None
    ) -> dict[str, Any]:
        return {
            "model": model or self.model,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": content}],
            "stream": stream,
        }

    def auth(self, key: str) -> dict[str, str]:
        return {"x-api-key": key}

    def pieces(self, result: SSEResult) -> list[str]:
        return [
            event["delta"]["text"]
            for event in result.events
            if event.get("type") == "content_block_delta"
            and event["delta"].get("type") == "text_delta"
            and event["delta"]["text"]
        ]

    def complete(self, result: SSEResult) -> bool:
        return (
            not result.done
            and result.names.count("message_stop") == 1
            and result.names[-1:] == ["message_stop"]
        )

    def check_stream(self, result: SSEResult) -> None:
        last = result.raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert last.startswith(self.final_event) and result.raw.endswith(b"\n\n")
        # Every event names its type twice, on the event line and in the data.
        assert [event["type"] for event in result.events] == result.names
        names = result.names
        assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
        assert result.events[0]["message"]["role"] == "assistant"
        assert result.events[0]["message"]["content"] == []
        assert set(names) <= {
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "ping",
            "message_delta",
            "message_stop",
        }
        starts = [e for e in result.events if e["type"] == "content_block_start"]
        assert [start["content_block"]["type"] for start in starts] == ["text"]
        message_delta = result.events[-2]
        assert message_delta["delta"]["stop_reason"] == "end_turn"
        assert message_delta["usage"]["output_tokens"] > 0

    def answer_text(self, body: dict[str, Any]) -> str:
        assert body["type"] == "message" and body["role"] == "assistant"
        assert body["stop_reason"] == "end_turn"
        assert body["usage"]["input_tokens"] > 0 and body["usage"]["output_tokens"] > 0
        assert [block["type"] for block in body["content"]] == ["text"]
        text: str = body["content"][0]["text"]
        return text

    def check_not_found(self, body: dict[str, Any], model: str) -> None:
        assert body["type"] == "error"
        assert set(body["error"]) == {"type", "message"}
        assert body["error"]["type"] == "not_found_error"
        assert model in body["error"]["message"]


DIALECTS: dict[str, type[Dialect]] = {
    dialect.name: dialect for dialect in (ChatCompletions, Messages)
}
