"""Sending one ``/v1`` response: pacing, injected failures and disconnect detection.

Every wait (first byte, generation, between chunks, a hang) races the client's
``http.disconnect``, so the request record says ``cancelled`` the moment the client goes
away and nothing more is produced for it. The dialect decides the shape of errors
(``anthropic``) and the error and garbage events a stream carries.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import anyio
from starlette.types import Receive, Send

from luthien_control.mock_backend import errors
from luthien_control.mock_backend.records import Outcome, Record, finish
from luthien_control.mock_backend.scenario import Scenario

GARBAGE_EVENT: Final = b"data: this is not json\n\n"
GARBAGE_BODY: Final = b"this is not json"
JSON_TYPE: Final = b"application/json"
SSE_TYPE: Final = b"text/event-stream; charset=utf-8"


class ConnectionDropped(Exception):
    """Raised on purpose (``x-mock-fail: drop:N``) after the response has started, so the
    server aborts the connection and the client sees an incomplete body."""


class Exchange:
    """One request's response side: the ASGI channels, its record and its scenario.

    ``anthropic`` gives every error Anthropic's shape (the Messages API's routes).
    """

    __slots__ = ("_id_header", "anthropic", "receive", "record", "scenario", "send")

    def __init__(
        self,
        receive: Receive,
        send: Send,
        record: Record,
        scenario: Scenario,
        *,
        anthropic: bool = False,
    ) -> None:
        self.receive = receive
        self.send = send
        self.record = record
        self.scenario = scenario
        self.anthropic = anthropic
        self._id_header = (b"x-mock-request-id", record["id"].encode("latin-1"))

    async def wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; True if the client disconnected before they were up."""
        with anyio.move_on_after(seconds):
            while (await self.receive())["type"] != "http.disconnect":
                pass
            return True
        return False

    async def error(self, error: errors.ErrorResponse) -> None:
        if self.anthropic:
            error = error.as_anthropic()
        await self._send_whole(error.status, error.body(), JSON_TYPE, error.headers)
        self._finish("error_response")

    async def json(self, payload: bytes, *, generation_steps: int = 0) -> None:
        """A successful non-streamed response, unless the scenario injects a failure.

        ``generation_steps`` delays pace it like the stream it could have been.
        """
        scenario = self.scenario
        if (
            scenario.delay
            and generation_steps
            and await self.wait(scenario.delay * generation_steps)
        ):
            self._finish("cancelled")
            return
        failure = scenario.failure
        if failure is None:
            await self._send_whole(200, payload, JSON_TYPE)
            self._finish("completed")
        elif failure.kind == "status":
            await self.error(self._injected(failure.n))
        elif failure.kind == "error":
            await self.error(self._injected(self._overloaded))
        elif failure.kind == "hang":
            await self._hang(JSON_TYPE)
        elif failure.kind == "garbage":
            await self._send_whole(200, GARBAGE_BODY, JSON_TYPE)
            self._finish("completed")
        else:  # drop: promise the whole body, send half of it
            await self._start(200, JSON_TYPE, (b"content-length", str(len(payload)).encode()))
            await self.send(
                {
                    "type": "http.response.body",
                    "body": payload[: len(payload) // 2],
                    "more_body": True,
                }
            )
            self._finish("dropped")
            raise ConnectionDropped("x-mock-fail: drop")

    async def stream(
        self,
        events: list[bytes],
        *,
        error_event: Callable[[int], bytes] = errors.chat_error_event,
        garbage: bytes = GARBAGE_EVENT,
    ) -> None:
        """A server-sent-events response, one ASGI message per event, racing a disconnect.

        ``error_event(index)`` is the dialect's error event, sent in place of event
        ``index`` by ``x-mock-fail: error:N``; ``garbage`` the event of ``garbage:N``.
        """
        scenario = self.scenario
        failure = scenario.failure
        drop_at = garbage_at = error_at = -1
        if failure is not None:
            if failure.kind == "status":
                await self.error(self._injected(failure.n))
                return
            if failure.kind == "hang":
                await self._hang(SSE_TYPE, (b"cache-control", b"no-cache"))
                return
            # Counted after the role chunk; never past the last event before [DONE].
            at = min(failure.n + 1, len(events) - 1)
            if failure.kind == "drop":
                drop_at = at
            elif failure.kind == "garbage":
                garbage_at = at
            else:
                error_at = at

        await self._start(200, SSE_TYPE, (b"cache-control", b"no-cache"))
        record, send, delay = self.record, self.send, scenario.delay
        finished = dropped = failed = False

        async def produce() -> None:
            nonlocal finished, dropped, failed
            for index, event in enumerate(events):
                if delay and index:
                    await anyio.sleep(delay)
                if index == drop_at:
                    dropped = True
                    return
                if index == error_at:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": error_event(index),
                            "more_body": True,
                        }
                    )
                    record["chunks_sent"] += 1
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    failed = True
                    return
                if index == garbage_at:
                    await send({"type": "http.response.body", "body": garbage, "more_body": True})
                    record["chunks_sent"] += 1
                await send({"type": "http.response.body", "body": event, "more_body": True})
                record["chunks_sent"] += 1
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            finished = True

        await self._race_disconnect(produce)
        if dropped:
            self._finish("dropped")
            raise ConnectionDropped(f"x-mock-fail: drop after {record['chunks_sent']} events")
        self._finish("error_event" if failed else "completed" if finished else "cancelled")

    @property
    def _overloaded(self) -> int:
        return errors.ANTHROPIC_OVERLOADED if self.anthropic else errors.OPENAI_OVERLOADED

    def _injected(self, status: int) -> errors.ErrorResponse:
        return errors.injected(
            status, self.record["model"], self.scenario.retry_after, anthropic=self.anthropic
        )

    async def _race_disconnect(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` until it returns or the client disconnects, whichever comes first."""
        receive = self.receive
        async with anyio.create_task_group() as task_group:

            async def listen() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                task_group.cancel_scope.cancel()

            task_group.start_soon(listen)
            await work()
            task_group.cancel_scope.cancel()

    async def _hang(self, content_type: bytes, *headers: tuple[bytes, bytes]) -> None:
        await self._start(200, content_type, *headers)
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self._finish("cancelled")

    async def _start(self, status: int, content_type: bytes, *headers: tuple[bytes, bytes]) -> None:
        self.record["status"] = status
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), self._id_header, *headers],
            }
        )

    async def _send_whole(
        self,
        status: int,
        body: bytes,
        content_type: bytes,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        await self._start(
            status, content_type, (b"content-length", str(len(body)).encode()), *headers
        )
        await self.send({"type": "http.response.body", "body": body})

    def _finish(self, outcome: Outcome) -> None:
        finish(self.record, outcome)
