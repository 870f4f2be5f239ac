"""The official ``openai`` SDK, sync and async, pointed at the proxy as a user would.

A client must not notice the proxy: the SDK's own parsing, streaming, tool-call deltas,
usage chunk and error classes all work through it. Each test runs against the proxy
configured from a policy file and from the database (``proxy`` is parametrized).
Against the mock the content is known exactly; against a real backend only the shape.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import ProxyServer
from tests.e2e.conftest import Backend

pytestmark = pytest.mark.e2e

SDK_TIMEOUT = 30.0
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city", "unit"],
        },
    },
}


def sdk(proxy: ProxyServer, key: str | None = None) -> OpenAI:
    return OpenAI(
        base_url=proxy.api_base,
        api_key=key or proxy.key,
        timeout=SDK_TIMEOUT,
        max_retries=0,
    )


def async_sdk(proxy: ProxyServer) -> AsyncOpenAI:
    return AsyncOpenAI(
        base_url=proxy.api_base, api_key=proxy.key, timeout=SDK_TIMEOUT, max_retries=0
    )


def assert_content(backend: Backend, content: str | None, expected: str) -> None:
    if backend.mock is not None:
        assert content == expected
    else:
        assert content


# --- plain and streamed completions ----------------------------------------------------


def test_sync_sdk_non_streamed_completion(proxy: ProxyServer, backend: Backend) -> None:
    text = "Plain answer, parsed by the SDK."
    with sdk(proxy) as client:
        completion = client.chat.completions.create(
            model=backend.model, messages=MESSAGES, extra_headers=backend.directives(content=text)
        )
    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason == "stop"
    assert_content(backend, completion.choices[0].message.content, text)
    assert completion.usage is not None
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_sync_sdk_streamed_completion(proxy: ProxyServer, backend: Backend) -> None:
    text = "Streamed to the SDK, delta by delta."
    with sdk(proxy) as client:
        stream = client.chat.completions.create(
            model=backend.model,
            messages=MESSAGES,
            stream=True,
            extra_headers=backend.directives(content=text, delay_ms=5),
        )
        with stream:
            chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert_content(backend, content, text)


def test_async_sdk_non_streamed_completion(proxy: ProxyServer, backend: Backend) -> None:
    text = "An async answer."

    async def run() -> Any:
        async with async_sdk(proxy) as client:
            return await client.chat.completions.create(
                model=backend.model,
                messages=MESSAGES,
                extra_headers=backend.directives(content=text),
            )

    completion = asyncio.run(run())
    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason == "stop"
    assert_content(backend, completion.choices[0].message.content, text)


def test_async_sdk_streamed_completion(proxy: ProxyServer, backend: Backend) -> None:
    text = "An async stream, delta by delta, to the very end."

    async def run() -> list[Any]:
        async with async_sdk(proxy) as client:
            stream = await client.chat.completions.create(
                model=backend.model,
                messages=MESSAGES,
                stream=True,
                extra_headers=backend.directives(content=text, delay_ms=5),
            )
            async with stream:
                return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert chunks[-1].choices[0].finish_reason == "stop"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert_content(backend, content, text)


def test_sdk_stream_helper_yields_the_content(proxy: ProxyServer, backend: Backend) -> None:
    text = "Through the stream helper."
    deltas: list[str] = []
    with (
        sdk(proxy) as client,
        client.chat.completions.stream(
            model=backend.model,
            messages=MESSAGES,
            extra_headers=backend.directives(content=text, delay_ms=5),
        ) as stream,
    ):
        for event in stream:
            if event.type == "content.delta":
                deltas.append(event.delta)
        final = stream.get_final_completion()
    assert_content(backend, "".join(deltas), text)
    assert final.choices[0].message.content == "".join(deltas)
    assert final.choices[0].finish_reason == "stop"


# --- tool calls and usage --------------------------------------------------------------


def test_sdk_reassembles_streamed_tool_calls(proxy: ProxyServer, backend: Backend) -> None:
    arguments = {"city": "Paris", "unit": "celsius"}
    scripted = json.dumps([{"name": "get_weather", "arguments": arguments}])
    names: dict[int, str] = {}
    fragments: dict[int, str] = {}
    with sdk(proxy) as client:
        stream = client.chat.completions.create(
            model=backend.model,
            messages=[{"role": "user", "content": "What is the weather in Paris, in celsius?"}],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stream=True,
            extra_headers=backend.directives(tool_calls=scripted, chunk_size=5),
        )
        with stream:
            for chunk in stream:
                if not chunk.choices:
                    continue
                for call in chunk.choices[0].delta.tool_calls or []:
                    if call.function is not None and call.function.name:
                        names[call.index] = names.get(call.index, "") + call.function.name
                    if call.function is not None and call.function.arguments:
                        fragments[call.index] = (
                            fragments.get(call.index, "") + call.function.arguments
                        )
    assert names == {0: "get_weather"}
    if backend.mock is not None:
        assert len(fragments) == 1 and fragments[0] == json.dumps(arguments, separators=(",", ":"))
    assert json.loads(fragments[0])["city"] == "Paris"


def test_sdk_include_usage_gives_a_final_usage_chunk(proxy: ProxyServer, backend: Backend) -> None:
    with sdk(proxy) as client:
        stream = client.chat.completions.create(
            model=backend.model,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=backend.directives(words=12),
        )
        with stream:
            chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_sdk_stream_without_include_usage_has_no_usage(
    proxy: ProxyServer, backend: Backend
) -> None:
    with sdk(proxy) as client:
        stream = client.chat.completions.create(
            model=backend.model,
            messages=MESSAGES,
            stream=True,
            extra_headers=backend.directives(words=12),
        )
        with stream:
            chunks = list(stream)
    assert chunks
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)  # no usage-only chunk either
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert_content(backend, content, " ".join(f"word{i}" for i in range(12)))


# --- errors ----------------------------------------------------------------------------


def test_sdk_unknown_model_raises_not_found(proxy: ProxyServer) -> None:
    with sdk(proxy) as client, pytest.raises(openai.NotFoundError) as excinfo:
        client.chat.completions.create(model="no-such-model-sdk", messages=MESSAGES)
    assert excinfo.value.status_code == 404
    assert "no-such-model-sdk" in excinfo.value.message


def test_sdk_streamed_unknown_model_raises_not_found(proxy: ProxyServer) -> None:
    with sdk(proxy) as client, pytest.raises(openai.NotFoundError) as excinfo:
        client.chat.completions.create(
            model="no-such-model-sdk", messages=MESSAGES, stream=True
        ).close()
    assert excinfo.value.status_code == 404


def test_sdk_bad_client_key_raises_authentication_error(proxy: ProxyServer) -> None:
    with (
        sdk(proxy, key="lc-not-a-valid-key") as client,
        pytest.raises(openai.AuthenticationError) as excinfo,
    ):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert excinfo.value.status_code == 401


def test_sdk_raises_when_the_backend_drops_mid_stream(proxy: ProxyServer, backend: Backend) -> None:
    if backend.mock is None:
        pytest.skip("only the mock backend can be told to drop the connection")
    received: list[str] = []
    with sdk(proxy) as client:
        stream = client.chat.completions.create(
            model=backend.model,
            messages=MESSAGES,
            stream=True,
            extra_headers=backend.directives(words=20, fail="drop:3"),
        )
        with stream, pytest.raises(openai.APIError) as excinfo:
            for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
    # The proxy's error event, not a broken connection: the SDK saw a clean error.
    assert not isinstance(excinfo.value, openai.APIConnectionError)
    assert isinstance(excinfo.value.body, dict) and excinfo.value.body["code"] == "backend_broken"
    assert "".join(received) == "word0 word1 word2"


def test_async_sdk_raises_when_the_backend_drops_mid_stream(
    proxy: ProxyServer, backend: Backend
) -> None:
    if backend.mock is None:
        pytest.skip("only the mock backend can be told to drop the connection")
    received: list[str] = []

    async def run() -> None:
        async with async_sdk(proxy) as client:
            stream = await client.chat.completions.create(
                model=backend.model,
                messages=MESSAGES,
                stream=True,
                extra_headers=backend.directives(words=20, fail="drop:3"),
            )
            async with stream:
                async for chunk in stream:
                    received.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError) as excinfo:
        asyncio.run(run())
    assert not isinstance(excinfo.value, openai.APIConnectionError)
    assert isinstance(excinfo.value.body, dict) and excinfo.value.body["code"] == "backend_broken"
    assert "".join(received) == "word0 word1 word2"


@pytest.mark.parametrize(
    ("status", "error_class"),
    [(429, openai.RateLimitError), (500, openai.InternalServerError)],
)
def test_sdk_backend_error_status_raises_its_error_class(
    proxy: ProxyServer, backend: Backend, status: int, error_class: type[openai.APIStatusError]
) -> None:
    if backend.mock is None:
        pytest.skip("only the mock backend can be told to fail")
    with sdk(proxy) as client, pytest.raises(error_class) as excinfo:
        client.chat.completions.create(
            model=backend.model,
            messages=MESSAGES,
            extra_headers=backend.directives(fail=f"status:{status}"),
        )
    assert excinfo.value.status_code == status
    assert len(excinfo.value.response.headers["x-luthien-transaction-id"]) == 32


# --- other routes and raw responses ----------------------------------------------------


def test_sdk_non_streamed_tool_calls(proxy: ProxyServer, backend: Backend) -> None:
    arguments = {"city": "Oslo", "unit": "celsius"}
    scripted = json.dumps([{"name": "get_weather", "arguments": arguments}])
    with sdk(proxy) as client:
        completion = client.chat.completions.create(
            model=backend.model,
            messages=[{"role": "user", "content": "What is the weather in Oslo, in celsius?"}],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            extra_headers=backend.directives(tool_calls=scripted),
        )
    calls = completion.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].type == "function" and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["city"] == "Oslo"
    if backend.mock is not None:
        assert json.loads(calls[0].function.arguments) == arguments


def test_sdk_lists_models_through_the_proxy(proxy: ProxyServer, backend: Backend) -> None:
    with sdk(proxy) as client:
        models = [model.id for model in client.models.list()]
    assert backend.model in models


def test_sdk_raw_response_carries_the_transaction_id(proxy: ProxyServer, backend: Backend) -> None:
    with sdk(proxy) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=backend.model, messages=MESSAGES, extra_headers=backend.directives(content="ok")
        )
    assert raw.status_code == 200
    assert len(raw.headers["x-luthien-transaction-id"]) == 32
    assert_content(backend, raw.parse().choices[0].message.content, "ok")
