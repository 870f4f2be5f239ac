"""The worked examples of docs/policies.md run as written: the custom policies module,
the script that checks it without a server, and the YAML policy in a real proxy."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyStarter, python_env

DOC = Path(__file__).resolve().parent.parent / "docs" / "policies.md"
CUSTOM = DOC.read_text().split("## Custom policies", 1)[1]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", CUSTOM, re.S)


@pytest.fixture(scope="module")
def my_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``my_pkg/policies.py`` exactly as the docs give it."""
    root = tmp_path_factory.mktemp("example")
    package = root / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "policies.py").write_text(blocks("python")[0])
    return root


def test_the_check_without_a_server_prints_what_the_docs_say(my_pkg: Path) -> None:
    script = blocks("python")[1]
    expected = re.search(r"# (.*)$", script.strip().splitlines()[-1])
    assert expected is not None
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=python_env(PYTHONPATH=f"{my_pkg}:{Path.cwd()}"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected.group(1)


def test_the_yaml_policy_runs_in_a_real_proxy(
    my_pkg: Path, start_proxy: ProxyStarter, mock_backend: MockBackendServer
) -> None:
    policy: dict[str, Any] = yaml.safe_load(blocks("yaml")[-1])
    members = policy["config"]["policies"]
    send = next(i for i, m in enumerate(members) if m["type"] == "SendBackendRequest")
    backend = {"type": "SetBackendPolicy", "config": {"backend_url": mock_backend.api_base}}
    members.insert(send, backend)  # the docs' policy, pointed at the mock backend
    proxy = start_proxy(policy=policy, env={"PYTHONPATH": str(my_pkg)})
    headers = {
        "Authorization": f"Bearer {CLIENT_KEY}",
        "x-mock-content": quote("the secret is secret-ish"),
        "x-mock-chunk-size": "3",
        "x-mock-request-id": "docs-example",
    }
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST", f"{proxy.api_base}/chat/completions", json=body, headers=headers
        ) as response,
    ):
        raw = response.read().decode()
    assert response.status_code == 200, raw
    assert "secret" not in raw
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in raw.splitlines()
        if line.startswith("data: {")
    )
    assert text == "the **** is ****-ish"
    record = mock_backend.record("docs-example")
    assert record is not None
    assert record["body"]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_the_tool_call_check_drops_what_it_forbids(
    my_pkg: Path, start_proxy: ProxyStarter, mock_backend: MockBackendServer
) -> None:
    policy = {
        "type": "SerialPolicy",
        "config": {
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": mock_backend.api_base}},
                {"type": "SendBackendRequest", "config": {}},
                {"type": "my_pkg.policies:DeleteOnlyInTmp", "config": {}},
            ]
        },
    }
    proxy = start_proxy(policy=policy, env={"PYTHONPATH": str(my_pkg)})
    calls = [
        {"name": "delete_file", "arguments": {"path": "/tmp/scratch.txt"}},
        {"name": "delete_file", "arguments": {"path": "/etc/passwd"}},
    ]

    def ask(tool_calls: list[dict[str, Any]]) -> httpx.Response:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "clean"}]}
        return httpx.post(
            f"{proxy.api_base}/chat/completions",
            json=body,
            headers={
                "Authorization": f"Bearer {CLIENT_KEY}",
                "x-mock-tool-calls": quote(json.dumps(tool_calls)),
            },
            timeout=30,
        )

    allowed = ask(calls[:1])
    assert allowed.status_code == 200
    message = allowed.json()["choices"][0]["message"]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == calls[0]["arguments"]
    refused = ask(calls)
    assert refused.status_code == 403
    assert "delete_file outside /tmp/" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "text_of"),
    [
        (
            "/responses",
            {"model": "gpt-4o-mini", "input": "hi", "stream": True},
            lambda data: (
                data.get("delta", "") if data.get("type") == "response.output_text.delta" else ""
            ),
        ),
        (
            "/messages",
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
            },
            lambda data: (
                (data.get("delta") or {}).get("text", "")
                if data.get("type") == "content_block_delta"
                else ""
            ),
        ),
    ],
)
def test_the_neutral_custom_policy_runs_on_every_dialect(
    my_pkg: Path,
    start_proxy: ProxyStarter,
    mock_backend: MockBackendServer,
    path: str,
    body: dict[str, Any],
    text_of: Any,
) -> None:
    policy = {
        "type": "SerialPolicy",
        "config": {
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "SetBackendPolicy", "config": {"backend_url": mock_backend.api_base}},
                {"type": "SendBackendRequest", "config": {}},
                {"type": "my_pkg.policies:CensorWord", "config": {"word": "secret"}},
            ]
        },
    }
    proxy = start_proxy(policy=policy, env={"PYTHONPATH": str(my_pkg)})
    headers = {
        "x-api-key": CLIENT_KEY,
        "x-mock-content": quote("the secret is secret-ish"),
        "x-mock-chunk-size": "3",
    }
    response = httpx.post(f"{proxy.api_base}{path}", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert "secret" not in response.text
    text = "".join(
        text_of(json.loads(line[6:]))
        for line in response.text.splitlines()
        if line.startswith("data: {")
    )
    assert text == "the **** is ****-ish"
    del body["stream"]
    buffered = httpx.post(f"{proxy.api_base}{path}", json=body, headers=headers, timeout=30)
    assert "secret" not in buffered.text
    assert "the **** is ****-ish" in buffered.text


# The tool-call example: a call mentioning "rm -rf" dropped, in every dialect.
FORBIDDEN = {"name": "run", "arguments": {"cmd": "rm -rf /tmp/x"}}
ALLOWED = {"name": "run", "arguments": {"cmd": "ls"}}


def _chat_calls(raw: str, stream: bool) -> tuple[list[tuple[str, Any]], Any]:
    """The calls the client reassembles, and the finish reason."""
    if not stream:
        choice = json.loads(raw)["choices"][0]
        calls = choice["message"].get("tool_calls") or []
        found = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
        return found, choice["finish_reason"]
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish = None
    for event in _events(raw):
        choice = event["choices"][0]
        for delta in choice["delta"].get("tool_calls") or ():
            index = delta["index"]
            names[index] = names.get(index, "") + (delta["function"].get("name") or "")
            arguments[index] = arguments.get(index, "") + delta["function"].get("arguments", "")
        finish = choice.get("finish_reason") or finish
    assert sorted(names) == list(range(len(names)))  # renumbered without a gap
    return [(names[i], json.loads(arguments[i])) for i in sorted(names)], finish


def _responses_calls(raw: str, stream: bool) -> tuple[list[tuple[str, Any]], Any]:
    if stream:
        events = _events(raw)
        done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
        indices = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
        assert indices == list(range(len(indices)))
        numbers = [e["sequence_number"] for e in events]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        output = events[-1]["response"]["output"]
        assert output == done  # the final object agrees with the stream
    else:
        output = json.loads(raw)["output"]
    calls = [
        (i["name"], json.loads(i["arguments"])) for i in output if i["type"] == "function_call"
    ]
    return calls, None


def _messages_calls(raw: str, stream: bool) -> tuple[list[tuple[str, Any]], Any]:
    if not stream:
        message = json.loads(raw)
        blocks = message["content"]
        return [(b["name"], b["input"]) for b in blocks if b["type"] == "tool_use"], message[
            "stop_reason"
        ]
    names: dict[int, str] = {}
    inputs: dict[int, str] = {}
    starts: list[int] = []
    stop = None
    for event in _events(raw):
        if event["type"] == "content_block_start":
            starts.append(event["index"])
            if event["content_block"]["type"] == "tool_use":
                names[event["index"]] = event["content_block"]["name"]
        elif event["type"] == "content_block_delta" and "partial_json" in event["delta"]:
            index = event["index"]
            inputs[index] = inputs.get(index, "") + event["delta"]["partial_json"]
        elif event["type"] == "message_delta":
            stop = event["delta"]["stop_reason"]
    assert starts == list(range(len(starts)))  # renumbered without a gap
    return [(names[i], json.loads(inputs[i])) for i in sorted(names)], stop


def _events(raw: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]


# Per dialect: the path, a request, the answer's calls, the stop reasons (some calls
# left, none left), and a history with a forbidden call and its result.
DIALECTS: dict[str, dict[str, Any]] = {
    "chat": {
        "path": "/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        "calls": _chat_calls,
        "stops": ("tool_calls", "stop"),
        "history": {
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_rm",
                            "type": "function",
                            "function": {"name": "run", "arguments": '{"cmd": "rm -rf /"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_rm", "content": "done"},
                {"role": "user", "content": "next"},
            ]
        },
        "forwarded": {
            "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "next"}]
        },
    },
    "responses": {
        "path": "/responses",
        "body": {"model": "gpt-4o-mini", "input": "hi"},
        "calls": _responses_calls,
        "stops": (None, None),
        "history": {
            "input": [
                {"role": "user", "content": "hi"},
                {
                    "type": "function_call",
                    "call_id": "call_rm",
                    "name": "run",
                    "arguments": '{"cmd": "rm -rf /"}',
                },
                {"type": "function_call_output", "call_id": "call_rm", "output": "done"},
                {"role": "user", "content": "next"},
            ]
        },
        "forwarded": {
            "input": [{"role": "user", "content": "hi"}, {"role": "user", "content": "next"}]
        },
    },
    "messages": {
        "path": "/messages",
        "body": {
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}],
        },
        "calls": _messages_calls,
        "stops": ("tool_use", "end_turn"),
        "history": {
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "running it"},
                        {
                            "type": "tool_use",
                            "id": "toolu_rm",
                            "name": "run",
                            "input": {"cmd": "rm -rf /"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_rm", "content": "done"},
                        {"type": "text", "text": "next"},
                    ],
                },
            ]
        },
        "forwarded": {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "running it"}]},
                {"role": "user", "content": [{"type": "text", "text": "next"}]},
            ]
        },
    },
}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_neutral_tool_call_policy_runs_on_every_dialect(
    my_pkg: Path, start_proxy: ProxyStarter, mock_backend: MockBackendServer, dialect: str
) -> None:
    case = DIALECTS[dialect]
    policy = {
        "type": "SerialPolicy",
        "config": {
            "policies": [
                {"type": "ClientApiKeyAuth", "config": {}},
                {"type": "my_pkg.policies:DropCallsMentioning", "config": {"word": "rm -rf"}},
                {"type": "SetBackendPolicy", "config": {"backend_url": mock_backend.api_base}},
                {"type": "SendBackendRequest", "config": {}},
                {"type": "my_pkg.policies:DropCallsMentioning", "config": {"word": "rm -rf"}},
            ]
        },
    }
    proxy = start_proxy(policy=policy, env={"PYTHONPATH": str(my_pkg)})
    url = f"{proxy.api_base}{case['path']}"
    stop_with_calls, stop_without = case["stops"]
    for stream in (False, True):
        for scripted, stop in (
            ([FORBIDDEN, ALLOWED], stop_with_calls),
            ([FORBIDDEN], stop_without),
        ):
            headers = {
                "x-api-key": CLIENT_KEY,
                "x-mock-tool-calls": quote(json.dumps(scripted)),
                "x-mock-chunk-size": "4",
            }
            body = {**case["body"], "stream": stream}
            response = httpx.post(url, json=body, headers=headers, timeout=30)
            assert response.status_code == 200, response.text
            assert "rm -rf" not in response.text
            calls, finish = case["calls"](response.text, stream)
            expected = [("run", {"cmd": "ls"})] if len(scripted) == 2 else []
            assert (calls, finish) == (expected, stop), (stream, scripted)

    history = {**case["body"], **case["history"]}
    request_id = f"docs-tools-{dialect}"
    headers = {"x-api-key": CLIENT_KEY, "x-mock-request-id": request_id}
    response = httpx.post(url, json=history, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    record = mock_backend.record(request_id)
    assert record is not None
    assert record["body"] == {**case["body"], **case["forwarded"]}
