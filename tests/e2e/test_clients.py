"""The same conversations through every common client: raw httpx with httpx-sse,
``curl -N``, LangChain's ``ChatOpenAI`` and the SDK's ``chat.completions.stream()``
helper with tool calls. The proxy must be invisible to each of them."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import openai
import pytest
from httpx_sse import connect_sse
from langchain_openai import ChatOpenAI

from tests.conftest import ProxyServer
from tests.e2e.conftest import Backend
from tests.e2e.sse import collect_sse_events

pytestmark = pytest.mark.e2e

TEXT = "Every client sees the same stream."
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def chat_body(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": True}


def test_httpx_sse_reads_the_stream(proxy: ProxyServer, backend: Backend) -> None:
    contents: list[str] = []
    done = False
    with (
        httpx.Client(timeout=30) as client,
        connect_sse(
            client,
            "POST",
            f"{proxy.api_base}/chat/completions",
            json=chat_body(backend.model),
            headers={"Authorization": f"Bearer {proxy.key}", **backend.directives(content=TEXT)},
        ) as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for event in source.iter_sse():
            if event.data == "[DONE]":
                done = True
                break
            delta = json.loads(event.data)["choices"][0]["delta"]
            contents.append(delta.get("content") or "")
    assert done
    if backend.mock is not None:
        assert "".join(contents) == TEXT


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_no_buffer_streams_events_as_they_come(proxy: ProxyServer, backend: Backend) -> None:
    request_id = backend.request_id()
    headers = backend.directives(content=TEXT, delay_ms=80, request_id=request_id)
    command = [
        "curl",
        "-sN",
        f"{proxy.api_base}/chat/completions",
        "-H",
        f"Authorization: Bearer {proxy.key}",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(chat_body(backend.model)),
    ]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    with subprocess.Popen(command, stdout=subprocess.PIPE) as curl:
        assert curl.stdout is not None
        first = curl.stdout.readline()
        if backend.mock is not None:
            record = backend.mock.record(request_id)
            assert record is not None and record["outcome"] == "in_progress"
        rest = curl.stdout.read()
    assert curl.returncode == 0
    result = collect_sse_events([first + rest])
    assert result.done and result.errors == []
    if backend.mock is not None:
        assert result.content == TEXT


def test_langchain_chat_openai_streams_and_invokes(proxy: ProxyServer, backend: Backend) -> None:
    llm = ChatOpenAI(
        model=backend.model,
        base_url=proxy.api_base,
        api_key=proxy.key,  # type: ignore[arg-type]
        max_retries=0,
        timeout=30,
        default_headers=backend.directives(content=TEXT),
    )
    pieces = [chunk.content for chunk in llm.stream("hello")]
    answer = llm.invoke("hello")
    if backend.mock is not None:
        assert "".join(str(p) for p in pieces) == TEXT
        assert answer.content == TEXT
    else:
        assert pieces and answer.content


def test_sdk_stream_helper_with_tool_calls(proxy: ProxyServer, backend: Backend) -> None:
    tool_calls = json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}}])
    with (
        openai.OpenAI(
            base_url=proxy.api_base, api_key=proxy.key, max_retries=0, timeout=30
        ) as client,
        client.chat.completions.stream(
            model=backend.model,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            extra_headers=backend.directives(tool_calls=tool_calls, chunk_size=3),
        ) as stream,
    ):
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.delta" in kinds
    call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert final.choices[0].finish_reason == "tool_calls"
