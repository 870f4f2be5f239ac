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
