"""The mock backend's ASGI application: routing, request validation and the request log.

Pure ASGI with a hand-written router: the benchmark's hot path is a dict of headers, one
``orjson.loads``, one record and one ``orjson.dumps``.

Routes: OpenAI's ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/v1/responses`` and ``/v1/models``; Anthropic's ``/v1/messages`` and
``/v1/messages/count_tokens`` (``messages``), whose errors have Anthropic's shape; ``GET``
and ``HEAD`` on ``/`` and ``/health``; the request log at ``/_mock/requests``.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from luthien_control import jsontext
from luthien_control.mock_backend import content, errors, messages, responses
from luthien_control.mock_backend.exchange import JSON_TYPE, Exchange
from luthien_control.mock_backend.models import is_known_model, model_list, model_object
from luthien_control.mock_backend.records import DEFAULT_MAX_RECORDS, RequestLog, finish
from luthien_control.mock_backend.scenario import (
    DEFAULT_SCENARIO,
    DirectiveError,
    Scenario,
    parse_scenario,
)

HEALTH_BODY = b'{"status":"ok"}'
REQUESTS_PATH = "/_mock/requests"
MODELS_PATH = "/v1/models"
MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"


class MockBackend:
    """An OpenAI- and Anthropic-compatible backend whose every answer is scripted by
    ``x-mock-*`` headers, or by ``scenario`` for requests that bring none.

    ``api_key``, when given, must arrive as ``Authorization: Bearer <key>`` (on the
    Messages API ``x-api-key: <key>`` too). ``requests`` holds what was asked and how each
    response ended, for tests to inspect.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        max_records: int = DEFAULT_MAX_RECORDS,
        scenario: Scenario = DEFAULT_SCENARIO,
    ):
        self.api_key = api_key
        self.scenario = scenario
        self.requests = RequestLog(max_records)
        self._authorization = f"Bearer {api_key}" if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith("/v1/"):
                await self._api(scope, receive, send)
            else:
                await self._control(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    async def _api(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope["headers"]
        }
        try:
            scenario = parse_scenario(headers, self.scenario)
            directive_error = None
        except DirectiveError as exc:
            scenario, directive_error = Scenario(request_id=headers.get("x-mock-request-id")), exc
        method: str = scope["method"]
        path: str = scope["path"]
        record = self.requests.start(
            scenario.request_id or os.urandom(16).hex(),
            method,
            path,
            scope.get("query_string", b"").decode("latin-1"),
            headers,
        )
        anthropic = path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")
        exchange = Exchange(receive, send, record, scenario, anthropic=anthropic)

        raw = await _read_body(receive)
        if raw is None:
            finish(record, "cancelled")
            return
        body = _parse_body(raw)
        record["body"] = body
        if isinstance(body, dict):
            model = body.get("model")
            if isinstance(model, str):
                record["model"] = model
            record["stream"] = body.get("stream") is True

        if directive_error is not None:
            await exchange.error(errors.bad_directive(str(directive_error)))
            return
        if scenario.first_byte_delay and await exchange.wait(scenario.first_byte_delay):
            finish(record, "cancelled")
            return
        if self._authorization is not None:
            authorization = headers.get("authorization")
            if anthropic:
                api_key = headers.get("x-api-key")
                if authorization != self._authorization and api_key != self.api_key:
                    await exchange.error(_anthropic_auth_error(api_key, authorization))
                    return
            elif authorization != self._authorization:
                await exchange.error(_auth_error(authorization))
                return

        if method == "POST":
            if path == MESSAGES_PATH:
                await _messages(exchange, body)
                return
            if path == COUNT_TOKENS_PATH:
                await _count_tokens(exchange, body)
                return
            if path == "/v1/chat/completions":
                await _chat_completions(exchange, body)
                return
            if path == "/v1/completions":
                await _completions(exchange, body)
                return
            if path == "/v1/embeddings":
                await _embeddings(exchange, body)
                return
            if path == "/v1/responses":
                await _responses(exchange, body)
                return
        elif method == "GET":
            if path == MODELS_PATH:
                await exchange.json(orjson.dumps(model_list()))
                return
            if path.startswith(MODELS_PATH + "/"):
                model = path[len(MODELS_PATH) + 1 :]
                if is_known_model(model):
                    await exchange.json(orjson.dumps(model_object(model)))
                else:
                    await exchange.error(errors.model_not_found(model))
                return
        await exchange.error(errors.not_found(method, path))

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``/``, ``/health`` and the ``/_mock/requests`` log; never recorded themselves."""
        method: str = scope["method"]
        path: str = scope["path"]
        if path in ("/", "/health") and method in ("GET", "HEAD"):
            # Claude Code sends HEAD / before its first request.
            await _send_json(send, 200, HEALTH_BODY, head=method == "HEAD")
        elif path == REQUESTS_PATH and method == "GET":
            await _send_json(send, 200, _dump_log(self.requests.all()))
        elif path == REQUESTS_PATH and method == "DELETE":
            self.requests.clear()
            await _send_json(send, 200, b'{"deleted":true}')
        elif path.startswith(REQUESTS_PATH + "/") and method == "GET":
            request_id = path[len(REQUESTS_PATH) + 1 :]
            record = self.requests.get(request_id)
            if record is None:
                error = errors.request_not_found(request_id)
                await _send_json(send, error.status, error.body())
            else:
                await _send_json(send, 200, _dump_log(record))
        else:
            error = errors.not_found(method, path)
            await _send_json(send, error.status, error.body())


async def _chat_completions(exchange: Exchange, body: Any) -> None:
    problem = _check_request(body, "messages", "an array", list)
    if problem is None:
        for index, message in enumerate(body["messages"]):
            if not isinstance(message, dict):
                problem = errors.invalid_type(f"messages[{index}]", "an object", message)
                break
    if problem is None:
        problem = _check_stream(body)
    if problem is not None:
        await exchange.error(problem)
        return
    model, chat, stream = body["model"], body["messages"], body.get("stream")
    reply = content.Reply.for_chat(exchange.scenario, chat)
    prompt_tokens = content.chat_prompt_tokens(chat)
    if stream:
        await exchange.stream(content.chat_stream(reply, model, prompt_tokens, _usage_asked(body)))
    else:
        payload = orjson.dumps(content.chat_completion(reply, model, prompt_tokens))
        await exchange.json(payload, generation_steps=reply.completion_tokens)


async def _completions(exchange: Exchange, body: Any) -> None:
    problem = _check_request(body, "prompt", "a string or an array", (str, list))
    if problem is None:
        problem = _check_stream(body)
    if problem is not None:
        await exchange.error(problem)
        return
    model, prompt, stream = body["model"], body["prompt"], body.get("stream")
    prompts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
    reply = content.Reply.for_prompt(exchange.scenario, prompts[-1] if prompts else "")
    prompt_tokens = content.count_words(prompts)
    if stream:
        await exchange.stream(content.text_stream(reply, model, prompt_tokens, _usage_asked(body)))
    else:
        payload = orjson.dumps(content.text_completion(reply, model, prompt_tokens))
        await exchange.json(payload, generation_steps=reply.completion_tokens)


async def _responses(exchange: Exchange, body: Any) -> None:
    problem = _check_request(body, "input", "a string or an array", (str, list))
    if problem is None:
        problem = _check_stream(body)
    if problem is not None:
        await exchange.error(problem)
        return
    model, text = body["model"], responses.input_text(body["input"])
    reply = responses.reply_for(exchange.scenario, body["input"])
    input_tokens = content.count_words([text])
    if body.get("stream"):
        await exchange.stream(
            responses.response_stream(reply, model, input_tokens),
            error_event=errors.responses_error_event,
        )
    else:
        payload = orjson.dumps(responses.response_json(reply, model, input_tokens))
        await exchange.json(payload, generation_steps=reply.completion_tokens)


async def _messages(exchange: Exchange, body: Any) -> None:
    problem = messages.check_request(body)
    if problem is not None:
        await exchange.error(problem)
        return
    try:
        answer = messages.plan(exchange.scenario, body)
    except DirectiveError as exc:
        await exchange.error(errors.bad_directive(str(exc)))
        return
    if body.get("stream"):
        await exchange.stream(
            messages.message_stream(answer, body["model"]),
            error_event=errors.messages_error_event,
            garbage=messages.GARBAGE_EVENT,
        )
    else:
        payload = messages.message_json(answer, body["model"])
        await exchange.json(payload, generation_steps=answer.output_tokens)


async def _count_tokens(exchange: Exchange, body: Any) -> None:
    problem = messages.check_request(body, needs_max_tokens=False)
    if problem is not None:
        await exchange.error(problem)
        return
    await exchange.json(messages.count_tokens_json(body))


async def _embeddings(exchange: Exchange, body: Any) -> None:
    problem = _check_request(body, "input", "a string or an array", (str, list))
    if problem is not None:
        await exchange.error(problem)
        return
    raw_input = body["input"]
    if isinstance(raw_input, str):
        inputs = [raw_input]
    elif raw_input and all(isinstance(item, int) for item in raw_input):
        inputs = [" ".join(map(str, raw_input))]  # one input given as token ids
    else:
        inputs = [
            item if isinstance(item, str) else jsontext.dumps(item).decode() for item in raw_input
        ]
    as_base64 = body.get("encoding_format") == "base64"
    payload = orjson.dumps(content.embeddings(inputs, body["model"], as_base64=as_base64))
    await exchange.json(payload)


def _check_request(
    body: Any, param: str, expected: str, kind: type | tuple[type, ...]
) -> errors.ErrorResponse | None:
    """The first problem with ``body``'s JSON, ``model`` and ``param``, or None."""
    if not isinstance(body, dict):
        return errors.invalid_json()
    if "model" not in body:
        return errors.missing_parameter("model")
    model = body["model"]
    if not isinstance(model, str):
        return errors.invalid_type("model", "a string", model)
    if param not in body:
        return errors.missing_parameter(param)
    if not isinstance(body[param], kind):
        return errors.invalid_type(param, expected, body[param])
    if not is_known_model(model):
        return errors.model_not_found(model)
    return None


def _check_stream(body: dict[str, Any]) -> errors.ErrorResponse | None:
    stream = body.get("stream")
    if stream is None or isinstance(stream, bool):
        return None
    return errors.invalid_type("stream", "a boolean", stream)


def _usage_asked(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _auth_error(authorization: str | None) -> errors.ErrorResponse:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return errors.missing_api_key()
    return errors.incorrect_api_key(key.strip())


def _anthropic_auth_error(api_key: str | None, authorization: str | None) -> errors.ErrorResponse:
    if api_key is None and authorization is None:
        return errors.anthropic(401, "x-api-key header is required")
    return errors.anthropic(401, "invalid x-api-key")


def _dump_log(value: Any) -> bytes:
    """The request log as JSON, whatever the depth of a body in it (orjson reads 1024
    levels but writes 254: a deeper body made every read of the log a 500)."""
    return jsontext.dumps(value)


def _parse_body(raw: bytes) -> Any:
    """The body as JSON, or as text when it is not JSON, or None when empty."""
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks) if len(chunks) > 1 else chunks[0]


async def _send_json(send: Send, status: int, body: bytes, *, head: bool = False) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", JSON_TYPE), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
