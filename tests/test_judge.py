"""LLMJudgePolicy end to end: a real proxy process, the mock backend behind it, the mock
also acting as the judge, and the official ``openai`` SDK as the client.

What the client receives is checked on the wire (through the SDK); the verdicts are read
back from the audit trail with ``luthien-control logs``, as an operator would.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import openai
import pytest
from openai import OpenAI

from tests.conftest import MockBackendServer, ProxyServer, ProxyStarter
from tests.policies.test_judge import FORBIDDEN, verdict_json

INSTRUCTIONS = f"Block any text that contains the word {FORBIDDEN}."
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a story."}]


def judged(backend_url: str, judge_url: str, **judge: Any) -> dict[str, Any]:
    """A policy that sends the request to ``backend_url`` and has the answer judged."""
    return {
        "type": "SerialPolicy",
        "config": {
            "name": "judged",
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "AddApiKeyHeader", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": backend_url}},
                {"type": "SendBackendRequest", "config": {}},
                {
                    "type": "LLMJudgePolicy",
                    "config": {
                        "backend_url": judge_url,
                        "api_key_env_var_name": "OPENAI_API_KEY",
                        "model": "gpt-4o-mini",
                        "instructions": INSTRUCTIONS,
                        **judge,
                    },
                },
            ],
        },
    }


def sdk(proxy: ProxyServer) -> OpenAI:
    return OpenAI(base_url=proxy.api_base, api_key=proxy.key, timeout=30, max_retries=0)


def answer(text: str, chunk_size: int = 5) -> dict[str, str]:
    """Headers that script the backend's answer."""
    return {"x-mock-content": quote(text), "x-mock-chunk-size": str(chunk_size)}


def judge_decisions(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["action"], json.loads(d["detail"]))
        for d in record["decisions"]
        if d["policy"] == "LLMJudgePolicy"
    ]


def test_buffer_mode_releases_a_clean_stream_and_blocks_a_violating_one_with_403(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer, content_judge_url: str
) -> None:
    proxy = start_proxy(policy=judged(mock_backend.api_base, content_judge_url, mode="buffer"))
    clean = "A clean answer, judged whole before any of it is sent."
    with sdk(proxy) as client:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=answer(clean)
        )
        received = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert received == clean

        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                stream=True,
                extra_headers=answer(f"A story with the word {FORBIDDEN} in it."),
            )
        assert caught.value.status_code == 403
        assert FORBIDDEN not in caught.value.message
        assert "non-compliant with the policy's instructions" in caught.value.message

        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                extra_headers=answer(f"Not streamed, still {FORBIDDEN}."),
            )

    transaction_id = caught.value.response.headers["x-luthien-transaction-id"]
    record = proxy.record(transaction_id)
    assert record["outcome"] == "blocked" and record["status"] == 403
    [(action, detail)] = judge_decisions(record)
    assert action == "judge_blocked" and detail["mode"] == "buffer"
    assert detail["verdict"] == "block" and detail["reason"] == f"the text says {FORBIDDEN}"


def test_window_mode_delivers_the_judged_windows_then_an_error_event(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer, content_judge_url: str
) -> None:
    policy = judged(
        mock_backend.api_base, content_judge_url, mode="window", window_chars=20, overlap_chars=5
    )
    proxy = start_proxy(policy=policy)
    windows = ["The first window is ", "fine, the second too"]  # 20 characters each
    text = "".join(windows) + f"; then {FORBIDDEN} comes, and more text follows it."
    received = ""
    with sdk(proxy) as client:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=answer(text)
        )
        with pytest.raises(openai.APIError) as caught:
            for event in stream:
                for choice in event.choices:
                    received += choice.delta.content or ""
        stream.close()
    assert caught.type is openai.APIError  # raised mid-stream, not an HTTP error status
    assert FORBIDDEN not in caught.value.message
    assert "non-compliant with the policy's instructions" in caught.value.message
    assert received == "".join(windows)

    record = proxy.record(stream.response.headers["x-luthien-transaction-id"])
    assert record["outcome"] == "blocked"
    assert [(action, d["window"]) for action, d in judge_decisions(record)] == [
        ("judge_allowed", 1),
        ("judge_allowed", 2),
        ("judge_blocked", 3),
    ]


def test_audit_mode_streams_everything_and_records_the_verdict(
    start_proxy: ProxyStarter, mock_backend: MockBackendServer
) -> None:
    verdict = quote(verdict_json("block", "mentions weapons"))
    policy = judged(
        mock_backend.api_base,
        mock_backend.api_base,
        mode="audit",
        extra_headers={"x-mock-content": verdict},
    )
    proxy = start_proxy(policy=policy)
    text = "An answer the judge dislikes, streamed in full all the same."
    with sdk(proxy) as client:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=answer(text)
        )
        received = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert received == text

    record = proxy.record(stream.response.headers["x-luthien-transaction-id"])
    assert record["outcome"] == "ok" and record["status"] == 200
    [(action, detail)] = judge_decisions(record)
    assert action == "judge_flagged" and detail["mode"] == "audit"
    assert detail["verdict"] == "block" and detail["reason"] == "mentions weapons"
    assert isinstance(detail["latency_ms"], float) and detail["latency_ms"] >= 0
