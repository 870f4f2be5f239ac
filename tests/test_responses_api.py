"""The Responses API through the proxy: typed events relayed as they arrive, a failure
ending the stream with ``response.failed``, usage recorded, secrets held back."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer, ProxyStarter

SECRET = "sk-proj-" + "Rr9Ss8Tt7Uu6Vv5Ww4Xx3Yy2"


def policy(backend: str, *after: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "SerialPolicy",
        "config": {
            "name": "responses",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": backend}},
                {"type": "SendBackendRequest", "config": {}},
                *after,
            ],
        },
    }


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    redact = {"type": "LeakedApiKeyDetection", "config": {"action": "redact"}}
    return start_proxy(policy=policy(mock_backend.api_base, redact))


def directives(**values: Any) -> dict[str, str]:
    return {"x-mock-" + k.replace("_", "-"): quote(str(v), safe=":") for k, v in values.items()}


def sdk(proxy: ProxyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.api_base, api_key=CLIENT_KEY, max_retries=0, timeout=30)


def test_streamed_response_events_arrive_typed_and_in_order(
    proxy: ProxyServer, mock_backend: MockBackendServer
) -> None:
    text = "Typed events, one by one."
    with sdk(proxy) as client:
        stream = client.responses.create(
            model="gpt-4o-mini",
            input="hi",
            stream=True,
            extra_headers=directives(content=text, delay_ms=80, request_id="responses-live"),
        )
        events = iter(stream)
        first = next(events)
        record = mock_backend.record("responses-live")
        assert record is not None and record["outcome"] == "in_progress"  # really streamed
        rest = list(events)
    kinds = [first.type, *(event.type for event in rest)]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] == "response.completed"
    deltas = [event.delta for event in rest if event.type == "response.output_text.delta"]
    assert "".join(deltas) == text
    assert rest[-1].response.output_text == text  # type: ignore[union-attr]


def test_non_streamed_response_and_usage_recorded(proxy: ProxyServer) -> None:
    with sdk(proxy) as client:
        raw = client.responses.with_raw_response.create(
            model="gpt-4o-mini", input="two words", extra_headers=directives(content="a b c")
        )
        response = raw.parse()
    assert response.output_text == "a b c"
    record = proxy.record(raw.headers["x-luthien-transaction-id"])
    assert record["endpoint"] == "/responses" and record["outcome"] == "ok"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (2, 3)


def test_streamed_usage_is_recorded(proxy: ProxyServer) -> None:
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{proxy.api_base}/responses",
            json={"model": "gpt-4o-mini", "input": "one two three", "stream": True},
            headers={"Authorization": f"Bearer {CLIENT_KEY}", **directives(words=5)},
        ) as response,
    ):
        response.read()
    record = proxy.record(response.headers["x-luthien-transaction-id"])
    assert record["streamed"] is True
    assert (record["prompt_tokens"], record["completion_tokens"], record["total_tokens"]) == (
        3,
        5,
        8,
    )
    assert record["response"]["sent"]["stream"]["choices"][0]["message"]["content"] == (
        "word0 word1 word2 word3 word4"
    )


def test_backend_drop_ends_the_stream_with_response_failed(proxy: ProxyServer) -> None:
    with sdk(proxy) as client:
        events = list(
            client.responses.create(
                model="gpt-4o-mini",
                input="hi",
                stream=True,
                extra_headers=directives(words=30, fail="drop:6"),
            )
        )
    last = events[-1]
    assert last.type == "response.failed"
    assert last.response.status == "failed"  # type: ignore[union-attr]
    assert last.response.error.code == "backend_broken"  # type: ignore[union-attr]
    assert "response.completed" not in [event.type for event in events]
    assert last.sequence_number == events[-2].sequence_number + 1


def test_secret_split_across_deltas_is_redacted_everywhere(proxy: ProxyServer) -> None:
    text = f"the key {SECRET} is here"
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{proxy.api_base}/responses",
            json={"model": "gpt-4o-mini", "input": "hi", "stream": True},
            headers={
                "Authorization": f"Bearer {CLIENT_KEY}",
                **directives(content=text, chunk_size=4),
            },
        ) as response,
    ):
        raw = response.read().decode()
    assert SECRET[:8] not in raw
    deltas = []
    for block in raw.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = json.loads(line[6:])
                if data["type"] == "response.output_text.delta":
                    deltas.append(data["delta"])
                if data["type"] == "response.output_text.done":
                    assert data["text"] == "the key [REDACTED] is here"
    assert "".join(deltas) == "the key [REDACTED] is here"


def test_secret_split_across_function_call_argument_deltas_is_redacted(
    proxy: ProxyServer,
) -> None:
    calls = json.dumps([{"name": "save", "arguments": {"token": SECRET}}])
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{proxy.api_base}/responses",
            json={"model": "gpt-4o-mini", "input": "hi", "stream": True},
            headers={
                "Authorization": f"Bearer {CLIENT_KEY}",
                **directives(tool_calls=calls, chunk_size=4),
            },
        ) as response,
    ):
        raw = response.read().decode()
    assert SECRET[:8] not in raw
    arguments = "".join(
        json.loads(line[6:])["delta"]
        for line in raw.splitlines()
        if line.startswith("data: ") and '"response.function_call_arguments.delta"' in line
    )
    assert arguments == '{"token":"[REDACTED]"}'


def test_a_rewrite_reaches_the_final_response_object_too(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer
) -> None:
    """The SDK's final object is built from the events that repeat the text whole
    (``*.done``, ``output_item.done``, ``response.completed``): they say what was sent."""
    increment = {"type": "IncrementIntegers", "config": {}}
    proxy = start_proxy(policy=policy(mock_backend.api_base, increment))
    with (
        sdk(proxy) as client,
        client.responses.stream(
            model="gpt-4o-mini",
            input="count",
            extra_headers=directives(content="41 apples and 1999 pears", chunk_size=2),
        ) as stream,
    ):
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "42 apples and 2000 pears"
    assert final.output_text == "42 apples and 2000 pears"
    raw = httpx.post(
        proxy.api_base + "/responses",
        json={"model": "gpt-4o-mini", "input": "count", "stream": True},
        headers={
            "authorization": f"Bearer {CLIENT_KEY}",
            **directives(content="41 apples and 1999 pears", chunk_size=2),
        },
    )
    assert "1999" not in raw.text and "41 apples" not in raw.text
