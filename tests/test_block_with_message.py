"""``block_with: message``: a block reaches the client as a normal, complete answer in its
dialect that says what was blocked and why, never as an error an agent would retry.
Before anything was sent (buffered, or a whole stream) and mid-stream alike."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import anthropic
import httpx
import openai
import pytest

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer, ProxyStarter

SECRET = "sk-proj-" + "Bb2Cc3Dd4Ee5Ff6Gg7Hh8Ii9"
DENIED = [{"name": "shell", "arguments": json.dumps({"command": "rm -rf /"})}]
TOOL_NOTICE = "blocked by ToolCallPolicy: a tool call in the response: the tool is in denied_tools"


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> ProxyServer:
    tools = {
        "type": "ToolCallPolicy",
        "config": {"denied_tools": ["shell"], "block_with": "message"},
    }
    secrets = {"type": "LeakedApiKeyDetection", "config": {"block_with": "message"}}
    policy = {
        "type": "SerialPolicy",
        "config": {
            "name": "block-with-message",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                secrets,
                {"type": "SetBackendPolicy", "config": {"backend_url": mock_backend.api_base}},
                {"type": "SendBackendRequest", "config": {}},
                tools,
            ],
        },
    }
    return start_proxy(policy=policy)


def directives(**values: Any) -> dict[str, str]:
    return {"x-mock-" + k.replace("_", "-"): quote(str(v), safe=":") for k, v in values.items()}


def calls_then_text(text: str) -> dict[str, str]:
    return directives(content=text, tool_calls=json.dumps(DENIED), chunk_size=4)


def outcome(proxy: ProxyServer, transaction: str) -> tuple[str, int]:
    record = proxy.record(transaction)
    return record["outcome"], record["status"]


def test_messages_stream_ends_with_the_notice_as_a_normal_turn(proxy: ProxyServer) -> None:
    client = anthropic.Anthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0)
    with client.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=256,
        messages=[{"role": "user", "content": "clean up"}],
        extra_headers=calls_then_text("Running it."),
    ) as stream:
        final = stream.get_final_message()
        transaction = stream.response.headers["x-luthien-transaction-id"]
    assert [(block.type, block.text) for block in final.content] == [  # type: ignore[union-attr]
        ("text", "Running it."),
        ("text", TOOL_NOTICE),
    ]
    assert final.stop_reason == "end_turn"
    assert outcome(proxy, transaction) == ("blocked", 200)


def test_messages_buffered_answer_is_the_notice(proxy: ProxyServer) -> None:
    client = anthropic.Anthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0)
    message = client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=256,
        messages=[{"role": "user", "content": "clean up"}],
        extra_headers=calls_then_text("Running it."),
    )
    assert [(block.type, block.text) for block in message.content] == [  # type: ignore[union-attr]
        ("text", TOOL_NOTICE)
    ]
    assert message.stop_reason == "end_turn"


def test_a_blocked_request_gets_a_whole_stream_saying_so(proxy: ProxyServer) -> None:
    client = anthropic.Anthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0)
    with client.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=256,
        messages=[{"role": "user", "content": f"my key is {SECRET}"}],
    ) as stream:
        final = stream.get_final_message()
    assert [block.text for block in final.content] == [  # type: ignore[union-attr]
        "blocked by LeakedApiKeyDetection: the request contains a secret (openai_api_key)"
    ]
    assert final.stop_reason == "end_turn"
    chat = httpx.post(
        proxy.api_base + "/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": SECRET}]},
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert chat.status_code == 200
    assert chat.json()["choices"][0]["message"]["content"].startswith("blocked by Leaked")
    assert SECRET not in chat.text


def test_chat_stream_ends_with_the_notice_and_done(proxy: ProxyServer) -> None:
    client = openai.OpenAI(base_url=proxy.api_base, api_key=CLIENT_KEY, max_retries=0)
    with client.chat.completions.stream(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "clean up"}],
        extra_headers=calls_then_text("Running it."),
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.message.content == "Running it.\n\n" + TOOL_NOTICE
    assert not choice.message.tool_calls
    assert choice.finish_reason == "stop"
    raw = httpx.post(
        proxy.api_base + "/chat/completions",
        json={
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
        },
        headers={"authorization": f"Bearer {CLIENT_KEY}", **calls_then_text("ok")},
    )
    assert raw.text.endswith("data: [DONE]\n\n")
    assert '"error"' not in raw.text


def test_responses_stream_completes_with_the_notice(proxy: ProxyServer) -> None:
    client = openai.OpenAI(base_url=proxy.api_base, api_key=CLIENT_KEY, max_retries=0)
    with client.responses.stream(
        model="gpt-4o-mini", input="clean up", extra_headers=calls_then_text("Running it.")
    ) as stream:
        final = stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == "Running it." + TOOL_NOTICE
    assert [item.type for item in final.output] == ["message", "message"]
    buffered = client.responses.create(
        model="gpt-4o-mini", input="clean up", extra_headers=calls_then_text("Running it.")
    )
    assert buffered.output_text == TOOL_NOTICE
