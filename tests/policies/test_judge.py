"""LLMJudgePolicy against a real judge: the built-in mock backend, with scripted verdicts.

Most tests script one verdict for every judge call through the mock's ``x-mock-content``
header (``extra_headers``). Window mode needs a judge that reads what it is given:
``ContentJudge`` is the same mock app behind a small shim that scripts ``block`` for any
text under review containing a forbidden word, ``allow`` otherwise.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from starlette.types import Message, Receive, Scope, Send

from luthien_control.dialects.reading import answer_text, request_text
from luthien_control.exceptions import PolicyBlocked, PolicyConfigError
from luthien_control.mock_backend.app import MockBackend
from luthien_control.policies.judge import LLMJudgePolicy, _JudgeError, parse_verdict
from luthien_control.policies.loader import load_policy
from luthien_control.settings import Limits, Timeouts
from luthien_control.sse import Chunk
from luthien_control.transaction import ProxyRequest, ProxyResponse, Transaction
from luthien_control.upstream.client import BackendClient
from tests.conftest import MockBackendServer, free_port, serve_in_thread
from tests.policies.conftest import chunk

INSTRUCTIONS = "Never discuss weapons."
FORBIDDEN = "FORBIDDEN"
JUDGE_KEY = "judge-secret-key-0123456789"
CONVERSATION = [{"role": "user", "content": "Tell me about the weather."}]


# --- a judge that reads -------------------------------------------------------------------


def verdict_json(verdict: str, reason: str) -> str:
    return json.dumps({"verdict": verdict, "reason": reason})


class ContentJudge:
    """The mock backend as a judge: ``block`` when the text under review (the judge
    request's last message) contains ``FORBIDDEN``, else ``allow``. It keeps every text
    it was asked to review, in order."""

    def __init__(self) -> None:
        self.mock = MockBackend()
        self.reviewed: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.mock(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        text = orjson.loads(body)["messages"][-1]["content"]
        self.reviewed.append(text)
        if FORBIDDEN in text:
            answer = verdict_json("block", f"the text says {FORBIDDEN}")
        else:
            answer = verdict_json("allow", "nothing forbidden")
        headers = [*scope["headers"], (b"x-mock-content", quote(answer).encode())]
        replayed = False

        async def body_then_receive() -> Message:
            # The body once, as it came; after that the real channel (disconnects).
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.mock({**scope, "headers": headers}, body_then_receive, send)


@pytest.fixture(scope="module")
def content_judge() -> Iterator[tuple[ContentJudge, str]]:
    judge = ContentJudge()
    with serve_in_thread(judge) as url:
        yield judge, url


@pytest.fixture
def reading_judge(content_judge: tuple[ContentJudge, str]) -> tuple[ContentJudge, str]:
    """The content judge with an empty review log, and its base URL."""
    judge, url = content_judge
    judge.reviewed.clear()
    return judge, url


# --- transactions with a real backend client ------------------------------------------------


@dataclass
class JudgeServices:
    judge_backend: BackendClient  # the pool of the proxy's own calls (app.Services)


@pytest.fixture
async def services() -> AsyncIterator[JudgeServices]:
    client = BackendClient(Timeouts(), Limits(), pool_setting="JUDGE_POOL_SIZE")
    await client.start()
    yield JudgeServices(client)
    await client.close()


def make_policy(backend_url: str, **config: Any) -> LLMJudgePolicy:
    raw = {"backend_url": backend_url, "model": "gpt-4o-mini", "instructions": INSTRUCTIONS}
    raw.update(config)
    return LLMJudgePolicy(LLMJudgePolicy.Config.model_validate(raw, strict=True), raw)


def scripted(verdict: str, reason: str = "scripted", **headers: str) -> dict[str, str]:
    """``extra_headers`` that make the mock answer every judge call with this verdict."""
    return {"x-mock-content": quote(verdict_json(verdict, reason)), **headers}


def make_tx(services: JudgeServices, messages: list[Any] | None = None) -> Transaction:
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": messages or CONVERSATION})
    return Transaction(ProxyRequest("POST", "/chat/completions", b"", {}, body), services)


def with_answer(tx: Transaction, content: str, **message: Any) -> Transaction:
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, **message},
                "finish_reason": "stop",
            }
        ],
    }
    tx.response = ProxyResponse(200, {"content-type": "application/json"}, orjson.dumps(payload))
    return tx


def stream_of(text: str, size: int) -> list[Chunk]:
    """A chat stream: the role, ``text`` in ``size``-character deltas, the finish."""
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    return [chunk(role="assistant"), *[chunk(p) for p in pieces], chunk(finish="stop")]


def content_of(chunks: list[Chunk]) -> str:
    return "".join(
        (choice.get("delta") or {}).get("content") or ""
        for c in chunks
        for choice in orjson.loads(c.raw[6:-2])["choices"]
    )


def decisions(tx: Transaction) -> list[tuple[str, dict[str, Any]]]:
    return [(d.action, json.loads(d.detail)) for d in tx.decisions]


# --- configuration -------------------------------------------------------------------------


def test_loads_by_type_name_and_round_trips() -> None:
    data = {
        "type": "LLMJudgePolicy",
        "config": {
            "backend_url": "https://judge.example/v1",
            "api_key_env_var_name": "JUDGE_KEY",
            "model": "gpt-4o-mini",
            "instructions": INSTRUCTIONS,
            "mode": "window",
            "window_chars": 500,
            "overlap_chars": 100,
            "timeout": 3,
            "on_error": "allow",
            "action": "flag",
            "extra_headers": {"OpenAI-Organization": "org-1"},
        },
    }
    policy = load_policy(data)
    assert isinstance(policy, LLMJudgePolicy)
    assert policy.serialize() == data
    assert policy.url == "https://judge.example/v1/chat/completions"
    assert policy.timeout == 3.0 and policy.mode == "window"
    assert policy.extra_headers == {"openai-organization": "org-1"}


def test_defaults() -> None:
    policy = make_policy("http://judge.example/v1")
    assert (policy.mode, policy.window_chars, policy.overlap_chars) == ("buffer", 1000, 200)
    assert (policy.timeout, policy.on_error, policy.action) == (10.0, "block", "block")
    assert policy.key_variable is None and policy.extra_headers == {}


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        ({"backend_url": "ftp://judge"}, "config.backend_url", "http://"),
        ({"mode": "stream"}, "config.mode", "buffer"),
        ({"window_chars": 0}, "config.window_chars", "greater than 0"),
        ({"overlap_chars": -1}, "config.overlap_chars", "greater than or equal to 0"),
        ({"overlap_chars": 1000}, "config.overlap_chars", "less than window_chars"),
        ({"timeout": 0}, "config.timeout", "greater than 0"),
        ({"on_error": "ignore"}, "config.on_error", "'allow' or 'block'"),
        ({"action": "redact"}, "config.action", "'block' or 'flag'"),
        ({"extra_headers": {"x-bad": "a\r\nb"}}, "config.extra_headers", "invalid header"),
        ({"instructions": ""}, "config.instructions", "at least 1"),
        ({"temperature": 0}, "config.temperature", "Extra inputs"),
    ],
)
def test_invalid_config_names_the_path(change: dict[str, Any], where: str, message: str) -> None:
    config = {"backend_url": "http://judge/v1", "model": "m", "instructions": INSTRUCTIONS}
    config.update(change)
    with pytest.raises(PolicyConfigError) as caught:
        load_policy({"type": "LLMJudgePolicy", "config": config})
    assert caught.value.path == where
    assert message in caught.value.reason


def test_model_and_instructions_are_required() -> None:
    with pytest.raises(PolicyConfigError) as caught:
        load_policy({"type": "LLMJudgePolicy", "config": {"backend_url": "http://judge/v1"}})
    assert caught.value.path == "config.model"
    assert "config.instructions: Field required" in caught.value.reason


# --- what the judge is shown, and how its answer is read ------------------------------------


def test_request_text_renders_every_message_form() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"q": "cat"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
    ]
    assert request_text({"model": "m", "messages": messages}) == (
        "system: Be brief.\n\n"
        "user: What is in this picture?\n[image_url]\n\n"
        'assistant: [tool call] lookup: {"q": "cat"}\n\n'
        "tool: a cat"
    )
    assert request_text({"model": "m", "prompt": "Once upon"}) == "user: Once upon"
    assert request_text(None) == ""


def test_answer_text_has_text_and_tool_calls_of_every_choice() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    payload = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "one"}},
            {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": [call]}},
        ]
    }
    assert answer_text(payload) == "[choice 0]\none\n\n[choice 1]\n[tool call] f: {}"
    assert answer_text({"choices": [{"index": 0, "text": "legacy"}]}) == "legacy"


def completion_with(content: Any) -> bytes:
    return orjson.dumps({"choices": [{"index": 0, "message": {"content": content}}]})


def test_parse_verdict_accepts_exactly_the_answer_format() -> None:
    verdict = parse_verdict(completion_with(verdict_json("block", "mentions weapons")))
    assert verdict.allow is False and verdict.reason == "mentions weapons"
    assert parse_verdict(completion_with(verdict_json("allow", "fine"))).allow is True


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"choices": []}',
        completion_with(None),
        completion_with("not json"),
        completion_with('["allow"]'),
        completion_with('{"verdict": "maybe", "reason": "?"}'),
        completion_with('{"verdict": "ALLOW", "reason": "case matters"}'),
        completion_with('{"verdict": "allow"}'),
        completion_with('{"verdict": "block", "reason": 3}'),
    ],
)
def test_parse_verdict_rejects_everything_else(body: bytes) -> None:
    with pytest.raises(_JudgeError):
        parse_verdict(body)


@pytest.mark.anyio
async def test_judge_request_has_the_documented_shape(
    services: JudgeServices, mock_backend: MockBackendServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LUTHIEN_TEST_JUDGE_KEY", JUDGE_KEY)
    request_id = uuid.uuid4().hex
    policy = make_policy(
        mock_backend.api_base,
        api_key_env_var_name="LUTHIEN_TEST_JUDGE_KEY",
        extra_headers=scripted("allow", **{"x-mock-request-id": request_id}),
    )
    await policy.on_request(make_tx(services))

    record = mock_backend.record(request_id)
    assert record is not None
    assert (record["method"], record["path"]) == ("POST", "/v1/chat/completions")
    assert record["headers"]["authorization"] == f"Bearer {JUDGE_KEY}"
    body = record["body"]
    assert body["model"] == "gpt-4o-mini" and body["stream"] is False
    assert body["temperature"] == 0 and body["response_format"] == {"type": "json_object"}
    system, user = body["messages"]
    assert system["role"] == "system" and user["role"] == "user"
    assert INSTRUCTIONS in system["content"]
    assert '{"verdict": "allow" | "block", "reason": "..."}' in system["content"]
    assert user["content"] == "user: Tell me about the weather."


@pytest.mark.anyio
async def test_no_key_variable_sends_no_authorization(
    services: JudgeServices, mock_backend: MockBackendServer
) -> None:
    request_id = uuid.uuid4().hex
    policy = make_policy(
        mock_backend.api_base, extra_headers=scripted("allow", **{"x-mock-request-id": request_id})
    )
    await policy.on_request(make_tx(services))
    record = mock_backend.record(request_id)
    assert record is not None and "authorization" not in record["headers"]


# --- request and buffered response ---------------------------------------------------------


@pytest.mark.anyio
async def test_request_allowed(services: JudgeServices, mock_backend: MockBackendServer) -> None:
    policy = make_policy(mock_backend.api_base, extra_headers=scripted("allow", "harmless"))
    tx = make_tx(services)
    await policy.on_request(tx)
    [(action, detail)] = decisions(tx)
    assert action == "judge_allowed"
    assert detail["verdict"] == "allow" and detail["reason"] == "harmless"
    assert detail["mode"] == "request" and detail["window"] is None
    assert isinstance(detail["latency_ms"], float) and detail["latency_ms"] >= 0
    assert tx.decisions[0].policy == "LLMJudgePolicy"


@pytest.mark.anyio
async def test_request_blocked_with_the_judges_reason(
    services: JudgeServices, mock_backend: MockBackendServer
) -> None:
    policy = make_policy(mock_backend.api_base, extra_headers=scripted("block", "mentions weapons"))
    tx = make_tx(services)
    with pytest.raises(PolicyBlocked) as caught:
        await policy.on_request(tx)
    # The rule, never the judge's reason: it may quote what it found.
    assert caught.value.message == (
        "blocked by LLMJudgePolicy: the judge found the request non-compliant with the "
        "policy's instructions"
    )
    assert caught.value.policy == "LLMJudgePolicy"
    [(action, detail)] = decisions(tx)
    assert action == "judge_blocked" and detail["verdict"] == "block"
    assert detail["reason"] == "mentions weapons"


@pytest.mark.anyio
async def test_buffered_response_allowed_and_unchanged(
    services: JudgeServices, mock_backend: MockBackendServer
) -> None:
    policy = make_policy(mock_backend.api_base, extra_headers=scripted("allow"))
    tx = with_answer(make_tx(services), "Sunny today.")
    body = tx.response.body if tx.response else b""
    await policy.on_response(tx)
    assert tx.response is not None and tx.response.body == body
    assert [action for action, _ in decisions(tx)] == ["judge_allowed"]
    assert decisions(tx)[0][1]["mode"] == "response"


@pytest.mark.anyio
async def test_buffered_response_blocked_judges_text_and_tool_calls(
    services: JudgeServices, reading_judge: tuple[ContentJudge, str]
) -> None:
    judge, url = reading_judge
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "order", "arguments": f'{{"item": "{FORBIDDEN}"}}'},
    }
    tx = with_answer(make_tx(services), "Ordering it now.", tool_calls=[call])
    with pytest.raises(PolicyBlocked) as caught:
        await make_policy(url).on_response(tx)
    assert FORBIDDEN not in caught.value.message
    assert "non-compliant with the policy's instructions" in caught.value.message
    assert judge.reviewed == [f'Ordering it now.\n[tool call] order: {{"item": "{FORBIDDEN}"}}']
    assert decisions(tx)[0][0] == "judge_blocked"


@pytest.mark.anyio
async def test_backend_error_response_is_not_judged(
    services: JudgeServices, reading_judge: tuple[ContentJudge, str]
) -> None:
    judge, url = reading_judge
    tx = make_tx(services)
    tx.response = ProxyResponse(500, {}, b'{"error": {"message": "FORBIDDEN"}}')
    await make_policy(url).on_response(tx)
    assert judge.reviewed == [] and tx.decisions == []


@pytest.mark.anyio
async def test_action_flag_records_and_passes(
    services: JudgeServices, mock_backend: MockBackendServer
) -> None:
    policy = make_policy(
        mock_backend.api_base, action="flag", extra_headers=scripted("block", "mentions weapons")
    )
    tx = make_tx(services)
    await policy.on_request(tx)
    with_answer(tx, "Here you go.")
    await policy.on_response(tx)
    assert [(a, d["verdict"], d["reason"]) for a, d in decisions(tx)] == [
        ("judge_flagged", "block", "mentions weapons"),
        ("judge_flagged", "block", "mentions weapons"),
    ]


# --- judge errors -----------------------------------------------------------------------------


def failing_policies(backend_url: str, **config: Any) -> list[LLMJudgePolicy]:
    return [
        make_policy(backend_url, on_error=on_error, **config) for on_error in ("allow", "block")
    ]


async def assert_fails_open_and_closed(
    services: JudgeServices, backend_url: str, reason: str, **config: Any
) -> None:
    """With on_error allow the request passes; with block it is blocked; both recorded."""
    fail_open, fail_closed = failing_policies(backend_url, **config)
    tx = make_tx(services)
    await fail_open.on_request(tx)
    with pytest.raises(PolicyBlocked) as caught:
        await fail_closed.on_request(tx)
    assert "the judge failed" in caught.value.message and reason in caught.value.message
    for action, detail in decisions(tx):
        assert action == "judge_error"
        assert detail["verdict"] is None and reason in detail["reason"]
        assert detail["latency_ms"] >= 0
    assert len(tx.decisions) == 2


@pytest.mark.anyio
async def test_judge_that_times_out(
    services: JudgeServices, mock_backend: MockBackendServer
) -> None:
    headers = scripted("allow", **{"x-mock-first-byte-delay-ms": "2000"})
    await assert_fails_open_and_closed(
        services,
        mock_backend.api_base,
        "did not answer within 0.3 s",
        timeout=0.3,
        extra_headers=headers,
    )


@pytest.mark.anyio
async def test_judge_that_answers_garbage(
    services: JudgeServices, mock_backend: MockBackendServer
) -> None:
    await assert_fails_open_and_closed(
        services,
        mock_backend.api_base,
        "not JSON",
        extra_headers={"x-mock-content": quote("not json")},
    )


@pytest.mark.anyio
async def test_judge_answer_missing_a_field(
    services: JudgeServices, mock_backend: MockBackendServer
) -> None:
    await assert_fails_open_and_closed(
        services,
        mock_backend.api_base,
        "no reason",
        extra_headers={"x-mock-content": quote('{"verdict": "block"}')},
    )


@pytest.mark.anyio
async def test_unreachable_judge(services: JudgeServices) -> None:
    await assert_fails_open_and_closed(
        services, f"http://127.0.0.1:{free_port()}/v1", "the judge request failed"
    )


@pytest.mark.anyio
async def test_judge_http_error_never_shows_the_key(
    services: JudgeServices, mock_backend: MockBackendServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LUTHIEN_TEST_JUDGE_KEY", JUDGE_KEY)
    policy = make_policy(
        mock_backend.api_base,
        api_key_env_var_name="LUTHIEN_TEST_JUDGE_KEY",
        extra_headers={"x-mock-fail": "status:401"},
    )
    tx = make_tx(services)
    with pytest.raises(PolicyBlocked) as caught:
        await policy.on_request(tx)
    assert "HTTP status 401" in caught.value.message
    assert JUDGE_KEY not in caught.value.message and JUDGE_KEY not in repr(caught.value)
    assert all(JUDGE_KEY not in d.detail for d in tx.decisions)
    assert decisions(tx)[0][0] == "judge_error"


@pytest.mark.anyio
async def test_missing_key_variable_is_a_judge_error(
    services: JudgeServices, mock_backend: MockBackendServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LUTHIEN_TEST_JUDGE_KEY", raising=False)
    await assert_fails_open_and_closed(
        services,
        mock_backend.api_base,
        "LUTHIEN_TEST_JUDGE_KEY is not set",
        api_key_env_var_name="LUTHIEN_TEST_JUDGE_KEY",
        extra_headers=scripted("allow"),
    )


# --- streams: buffer -----------------------------------------------------------------------------


async def feed(transform: Any, chunks: list[Chunk]) -> list[list[Chunk]]:
    """What ``on_chunk`` returned for each chunk, then what ``on_end`` returned."""
    out = [await transform.on_chunk(c) for c in chunks]
    out.append(await transform.on_end())
    return out


@pytest.mark.anyio
@pytest.mark.parametrize("verdict", ["allow", "block"])
async def test_buffer_mode_holds_everything_until_judged(
    services: JudgeServices, mock_backend: MockBackendServer, verdict: str
) -> None:
    policy = make_policy(mock_backend.api_base, extra_headers=scripted(verdict, "scripted"))
    tx = make_tx(services)
    transform = policy.stream_transform(tx)
    chunks = stream_of("A calm and sunny afternoon.", 4)
    raws = [c.raw for c in chunks]
    for c in chunks:
        assert await transform.on_chunk(c) == []
    if verdict == "block":
        with pytest.raises(PolicyBlocked) as caught:
            await transform.on_end()
        assert "scripted" not in caught.value.message
        assert decisions(tx)[0][0] == "judge_blocked"
        return
    released = await transform.on_end()
    assert released == chunks and [c.raw for c in released] == raws
    [(action, detail)] = decisions(tx)
    assert action == "judge_allowed" and detail["mode"] == "buffer"


@pytest.mark.anyio
async def test_buffer_mode_judges_the_whole_answer_with_tool_calls(
    services: JudgeServices, reading_judge: tuple[ContentJudge, str]
) -> None:
    judge, url = reading_judge
    call_start = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "order"}}
    arguments = [
        {"index": 0, "function": {"arguments": piece}} for piece in ('{"item": ', '"tea"}')
    ]
    chunks = [
        chunk("I will order "),
        chunk("it."),
        chunk(tool_calls=[call_start]),
        *[chunk(tool_calls=[a]) for a in arguments],
        chunk(finish="tool_calls"),
    ]
    tx = make_tx(services)
    out = await feed(make_policy(url).stream_transform(tx), chunks)
    assert out[-1] == chunks
    assert judge.reviewed == ['I will order it.\n[tool call] order: {"item": "tea"}']


@pytest.mark.anyio
async def test_buffer_mode_reads_responses_api_events(
    services: JudgeServices, reading_judge: tuple[ContentJudge, str]
) -> None:
    judge, url = reading_judge
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": {"id": "resp_1"}},
        {"type": "response.output_text.delta", "delta": "Hel"},
        {"type": "response.output_text.delta", "delta": "lo"},
        {"type": "response.output_item.added", "item": {"type": "function_call", "name": "f"}},
        {"type": "response.function_call_arguments.delta", "delta": "{}"},
        {"type": "response.completed", "response": {"id": "resp_1"}},
    ]
    chunks = [Chunk.from_data(e, event=e["type"]) for e in events]
    out = await feed(make_policy(url).stream_transform(make_tx(services)), chunks)
    assert out[-1] == chunks
    assert judge.reviewed == ["Hello\n[tool call] f: {}"]


# --- streams: window -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_window_mode_releases_each_window_once_judged(
    services: JudgeServices, reading_judge: tuple[ContentJudge, str]
) -> None:
    judge, url = reading_judge
    text = "aaaaabbbbbcccccdddddeeeee"  # 25 characters, 5 per chunk, windows of 10
    chunks = stream_of(text, 5)
    raws = [c.raw for c in chunks]
    tx = make_tx(services)
    transform = make_policy(url, mode="window", window_chars=10, overlap_chars=3).stream_transform(
        tx
    )
    out = await feed(transform, chunks)
    role, a, b, c, d, e, finish = chunks
    assert out == [[role], [], [a, b], [], [c, d], [], [], [e, finish]]
    assert [c.raw for step in out for c in step] == raws  # unchanged, byte for byte
    assert judge.reviewed == ["aaaaabbbbb", "bbbcccccddddd", "dddeeeee"]
    assert [(a, d["window"], d["mode"]) for a, d in decisions(tx)] == [
        ("judge_allowed", 1, "window"),
        ("judge_allowed", 2, "window"),
        ("judge_allowed", 3, "window"),
    ]


@pytest.mark.anyio
async def test_window_mode_holds_the_chunk_that_straddles_a_window(
    services: JudgeServices, reading_judge: tuple[ContentJudge, str]
) -> None:
    judge, url = reading_judge
    chunks = [chunk("1234567"), chunk("abcdefg"), chunk("ABCDEFG")]
    tx = make_tx(services)
    policy = make_policy(url, mode="window", window_chars=10, overlap_chars=0)
    out = await feed(policy.stream_transform(tx), chunks)
    first, second, third = chunks
    assert out == [[], [first], [second], [third]]
    assert judge.reviewed == ["1234567abc", "defgABCDEF", "G"]


@pytest.mark.anyio
async def test_window_mode_stops_at_the_first_violating_window(
    services: JudgeServices, reading_judge: tuple[ContentJudge, str]
) -> None:
    judge, url = reading_judge
    text = "0123456789" + "abcdefghij" + f"x{FORBIDDEN}" + "the rest of it"
    chunks = stream_of(text, 5)
    tx = make_tx(services)
    transform = make_policy(url, mode="window", window_chars=10, overlap_chars=2).stream_transform(
        tx
    )
    released: list[Chunk] = []
    with pytest.raises(PolicyBlocked) as caught:
        for c in chunks:
            released.extend(await transform.on_chunk(c))
    assert content_of(released) == "0123456789abcdefghij"
    assert FORBIDDEN not in caught.value.message
    assert "non-compliant with the policy's instructions" in caught.value.message
    assert judge.reviewed == ["0123456789", "89abcdefghij", f"ijx{FORBIDDEN}"]
    assert [(a, d["window"]) for a, d in decisions(tx)] == [
        ("judge_allowed", 1),
        ("judge_allowed", 2),
        ("judge_blocked", 3),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(("overlap", "blocked"), [(0, False), (8, True)])
async def test_window_overlap_catches_a_violation_split_across_windows(
    services: JudgeServices, reading_judge: tuple[ContentJudge, str], overlap: int, blocked: bool
) -> None:
    judge, url = reading_judge
    text = "0123456FOR" + "BIDDEN6789"  # the word straddles the first window's end
    tx = make_tx(services)
    policy = make_policy(url, mode="window", window_chars=10, overlap_chars=overlap)
    transform = policy.stream_transform(tx)
    chunks = stream_of(text, 5)
    if blocked:
        with pytest.raises(PolicyBlocked):
            await feed(transform, chunks)
        assert judge.reviewed == ["0123456FOR", "23456FORBIDDEN6789"]
    else:
        out = await feed(transform, chunks)
        assert content_of([c for step in out for c in step]) == text
        assert judge.reviewed == ["0123456FOR", "BIDDEN6789"]


@pytest.mark.anyio
async def test_window_mode_judges_the_remainder_at_the_end(
    services: JudgeServices, reading_judge: tuple[ContentJudge, str]
) -> None:
    judge, url = reading_judge
    chunks = stream_of(f"short {FORBIDDEN}", 100)
    tx = make_tx(services)
    transform = make_policy(url, mode="window", window_chars=1000).stream_transform(tx)
    role, body, finish = chunks
    assert await transform.on_chunk(role) == [role]
    assert await transform.on_chunk(body) == []
    assert await transform.on_chunk(finish) == []
    with pytest.raises(PolicyBlocked):
        await transform.on_end()
    assert judge.reviewed == [f"short {FORBIDDEN}"]


@pytest.mark.anyio
async def test_window_mode_fails_open_per_window(
    services: JudgeServices, mock_backend: MockBackendServer
) -> None:
    policy = make_policy(
        mock_backend.api_base,
        mode="window",
        window_chars=10,
        overlap_chars=0,
        on_error="allow",
        extra_headers={"x-mock-content": quote("not json")},
    )
    chunks = stream_of("0123456789abcdefghij", 10)
    tx = make_tx(services)
    out = await feed(policy.stream_transform(tx), chunks)
    assert [c for step in out for c in step] == chunks
    assert [(a, d["window"]) for a, d in decisions(tx)] == [("judge_error", 1), ("judge_error", 2)]


# --- streams: audit ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_audit_mode_streams_at_once_and_records_the_verdict(
    services: JudgeServices, mock_backend: MockBackendServer
) -> None:
    policy = make_policy(
        mock_backend.api_base, mode="audit", extra_headers=scripted("block", "mentions weapons")
    )
    chunks = stream_of("Everything passes straight through.", 6)
    tx = make_tx(services)
    out = await feed(policy.stream_transform(tx), chunks)
    assert out == [[c] for c in chunks] + [[]]
    [(action, detail)] = decisions(tx)
    assert action == "judge_flagged"
    assert detail["verdict"] == "block" and detail["reason"] == "mentions weapons"
    assert detail["mode"] == "audit" and detail["latency_ms"] >= 0


@pytest.mark.anyio
async def test_audit_mode_records_a_judge_error_and_never_blocks(
    services: JudgeServices, mock_backend: MockBackendServer
) -> None:
    policy = make_policy(
        mock_backend.api_base,
        mode="audit",
        timeout=0.3,
        extra_headers=scripted("block", **{"x-mock-first-byte-delay-ms": "2000"}),
    )
    tx = make_tx(services)
    out = await feed(policy.stream_transform(tx), stream_of("text", 2))
    assert out[-1] == []
    [(action, detail)] = decisions(tx)
    assert action == "judge_error" and "did not answer within 0.3 s" in detail["reason"]
