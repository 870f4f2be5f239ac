"""Nothing the proxy writes or forwards carries a secret it should not.

Real ``luthien-control serve`` processes in front of ``RawBackend``, a loopback HTTP
server in this process that keeps every request's bytes as they came and answers as the
path asks: echoing the key it was sent in a 401, cutting a stream short, never
answering, or judging. Requests go out through ``http.client``, which sends the path and
the headers exactly as given (httpx would resolve ``..`` itself). Each class:

1. the backend URL's credentials never appear in an error body, an error event, a
   record or a log line (``display_url``), nor in a dev ``detail``;
2. a backend's error answer that echoes the backend key reaches neither the client nor
   the record with the key in it;
3. the client key reaches the backend in no header, whichever header the client put it
   in; ``ClientApiKeyAuth`` takes it from ``x-api-key`` too; the backend key goes in the
   header its policy names;
4. a path with a dot segment is refused with 400, never forwarded;
5. ``LLMJudgePolicy`` names its rule, never the judge's reason.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from luthien_control.exceptions import BackendUnreachable, MalformedRequest, PolicyConfigError
from luthien_control.policies import load_policy
from luthien_control.policies.backend import AddApiKeyHeaderFromEnv
from luthien_control.responses import error_status_and_body
from luthien_control.transaction import ProxyRequest, Transaction
from tests.conftest import BACKEND_KEY, CLIENT_KEY, ProxyServer, ProxyStarter, free_port

URL_PASSWORD = "url-password-7f3a9c"  # in the backend URL's userinfo
URL_USER = "luthien"
ANTHROPIC_KEY = "anthropic-backend-key-5e8d"  # ANTHROPIC_API_KEY of the proxies
CUSTOM_KEY = "custom-backend-key-42b1"  # read by AddApiKeyHeaderFromEnv
SECRET = "sk-proj-" + "Qq1Ww2Ee3Rr4Tt5Yy6Uu7Ii8"  # what a judge's reason quotes
DOT_SEGMENTS = (
    "the request path holds a '.' or '..' segment (as written or percent-encoded); "
    "such a path is not forwarded"
)
STREAM_EVENT = (
    b'data: {"id":"c1","object":"chat.completion.chunk","choices":'
    b'[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- the raw backend --------------------------------------------------------------------------


@dataclass
class Received:
    """One request as the backend read it."""

    method: str
    target: str  # the request line's target, byte for byte (latin-1)
    headers: dict[str, str]  # names in lower case
    body: bytes


def _key_sent(headers: dict[str, str]) -> str:
    """The credential a backend would check (and quote when refusing it)."""
    authorization = headers.get("authorization", "")
    if authorization.startswith("Bearer "):
        return authorization.removeprefix("Bearer ")
    return headers.get("x-api-key") or headers.get("x-goog-api-key") or ""


def _response(status: str, body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return (
        f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n{head}\r\n"
    ).encode() + body


def echo_error(key: str) -> bytes:
    """OpenAI's 401, quoting the key it was given."""
    message = f"Incorrect API key provided: {key}. You can find your API key in the dashboard."
    error = {"message": message, "type": "invalid_request_error", "param": None}
    return orjson.dumps({"error": {**error, "code": "invalid_api_key"}})


def judge_answer() -> bytes:
    verdict = {"verdict": "block", "reason": f"the text quotes the key {SECRET}"}
    message = {"role": "assistant", "content": json.dumps(verdict)}
    return orjson.dumps({"choices": [{"index": 0, "message": message}]})


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        backend: RawBackend = self.server.backend  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        sock.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                return
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        while len(body) < int(headers.get("content-length", "0")):
            body += sock.recv(65536)
        backend.requests.append(Received(method, target, headers, body))
        if "/slow" in target:
            while sock.recv(65536):  # never answers; the proxy gives up and closes
                pass
        elif "/drop" in target:  # a stream cut short after its first event
            sock.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
                + f"{len(STREAM_EVENT):x}\r\n".encode()
                + STREAM_EVENT
                + b"\r\n"
            )
        elif "/echo" in target:
            key = _key_sent(headers)
            sock.sendall(
                _response(
                    "401 Unauthorized",
                    echo_error(key),
                    "content-type: application/json",
                    f'www-authenticate: Bearer realm="api", error="invalid key {key}"',
                )
            )
        elif "/judge/" in target:
            sock.sendall(_response("200 OK", judge_answer(), "content-type: application/json"))
        else:
            sock.sendall(_response("200 OK", b'{"ok":true}', "content-type: application/json"))


class RawBackend:
    """A loopback HTTP/1.1 backend in a thread (one request per connection)."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.backend = self  # type: ignore[attr-defined]
        self.port: int = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def last(self) -> Received:
        return self.requests[-1]


@pytest.fixture(scope="module")
def raw_backend() -> Iterator[RawBackend]:
    backend = RawBackend()
    backend.thread.start()
    yield backend
    backend.server.shutdown()
    backend.server.server_close()


# --- proxies and requests ---------------------------------------------------------------------


def serial(*policies: dict[str, Any]) -> dict[str, Any]:
    return {"type": "SerialPolicy", "config": {"name": "egress", "policies": list(policies)}}


AUTH = {"type": "ClientApiKeyAuth", "config": {}}
SEND = {"type": "SendBackendRequest", "config": {}}


def backend_at(url: str) -> dict[str, Any]:
    return {"type": "SetBackendPolicy", "config": {"backend_url": url}}


@pytest.fixture(scope="module")
def keyed(start_proxy: ProxyStarter, raw_backend: RawBackend) -> ProxyServer:
    """``AddApiKeyHeader``: ``OPENAI_API_KEY`` as Bearer, or ``ANTHROPIC_API_KEY`` as
    ``x-api-key`` on the Messages API."""
    return start_proxy(
        policy=serial(
            AUTH,
            {"type": "AddApiKeyHeader", "config": {}},
            backend_at(f"{raw_backend.url}/v1"),
            SEND,
        ),
        env={"ANTHROPIC_API_KEY": ANTHROPIC_KEY},
    )


@pytest.fixture(scope="module")
def custom_header(start_proxy: ProxyStarter, raw_backend: RawBackend) -> ProxyServer:
    """``AddApiKeyHeaderFromEnv`` with a ``header_name`` of its own."""
    add = {
        "type": "AddApiKeyHeaderFromEnv",
        "config": {"api_key_env_var_name": "CUSTOM_KEY_VAR", "header_name": "X-Goog-Api-Key"},
    }
    return start_proxy(
        policy=serial(AUTH, add, backend_at(f"{raw_backend.url}/v1"), SEND),
        env={"CUSTOM_KEY_VAR": CUSTOM_KEY},
    )


@pytest.fixture(scope="module")
def userinfo(start_proxy: ProxyStarter, raw_backend: RawBackend) -> ProxyServer:
    """A backend URL with credentials in it; everything logged at DEBUG."""
    url = f"http://{URL_USER}:{URL_PASSWORD}@{raw_backend.host}/v1"
    logging = {"type": "TransactionContextLoggingPolicy", "config": {"log_level": "DEBUG"}}
    return start_proxy(
        policy=serial(AUTH, logging, backend_at(url), SEND, logging),
        env={"BACKEND_READ_TIMEOUT": "1", "LOG_LEVEL": "DEBUG"},
    )


@pytest.fixture(scope="module")
def unreachable(start_proxy: ProxyStarter) -> tuple[ProxyServer, int]:
    """A backend URL with credentials, on a port where nothing listens; ``RUN_MODE=dev``."""
    port = free_port()
    url = f"http://{URL_USER}:{URL_PASSWORD}@127.0.0.1:{port}/v1"
    proxy = start_proxy(policy=serial(AUTH, backend_at(url), SEND), env={"RUN_MODE": "dev"})
    return proxy, port


@pytest.fixture(scope="module")
def judged(start_proxy: ProxyStarter, raw_backend: RawBackend) -> ProxyServer:
    """A judge (the raw backend) that blocks every request, quoting a key in its reason."""
    judge = {
        "type": "LLMJudgePolicy",
        "config": {
            "name": "judge",
            "backend_url": f"{raw_backend.url}/judge/v1",
            "model": "judge-model",
            "instructions": "Block anything.",
        },
    }
    return start_proxy(policy=serial(AUTH, judge, backend_at(f"{raw_backend.url}/v1"), SEND))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def transaction_id(self) -> str:
        return self.headers["x-luthien-transaction-id"]

    def json(self) -> Any:
        return orjson.loads(self.body)


def call(
    proxy: ProxyServer,
    target: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
    method: str | None = None,
) -> Answer:
    """One request with exactly these path and headers (and ``host``, ``accept-encoding:
    identity``, ``content-length`` from ``http.client``)."""
    host, port = proxy.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        data = None if body is None else orjson.dumps(body)
        sent = dict(headers or {})
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        connection.request(method or ("GET" if data is None else "POST"), target, data, sent)
        response = connection.getresponse()
        return Answer(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        connection.close()


def bearer(key: str = CLIENT_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def error_body(
    message: str, type_: str, code: str, transaction_id: str, **extra: Any
) -> dict[str, Any]:
    error = {"message": message, "type": type_, "param": None, "code": code}
    return {"error": {**error, **extra, "transaction_id": transaction_id}}


# --- 1. the backend URL's credentials ---------------------------------------------------------


def test_an_unreachable_backend_error_shows_no_url_credentials(
    unreachable: tuple[ProxyServer, int],
) -> None:
    proxy, port = unreachable
    answer = call(proxy, "/v1/chat/completions?api_key=client-query-secret", bearer(), CHAT)
    message = (
        f"cannot connect to the backend at http://127.0.0.1:{port}/v1/chat/completions"
        "?api_key=[REDACTED]: Connection refused"
    )
    assert answer.status == 502
    assert answer.json() == error_body(
        message,
        "backend_error",
        "backend_unreachable",
        answer.transaction_id,
        detail="ConnectionRefusedError(111, 'Connection refused')",
    )
    record = proxy.record(answer.transaction_id)
    assert record["error"] == message
    assert record["request"]["sent"]["url"] == (
        f"http://127.0.0.1:{port}/v1/chat/completions?api_key=[REDACTED]"
    )
    assert URL_PASSWORD not in json.dumps(record)


def test_a_timeout_error_shows_no_url_credentials(
    userinfo: ProxyServer, raw_backend: RawBackend
) -> None:
    answer = call(userinfo, "/v1/slow?token=client-query-secret", bearer())
    message = f"the backend did not answer in time ({raw_backend.url}/v1/slow?token=[REDACTED])"
    assert answer.status == 504
    assert answer.json() == error_body(
        message, "backend_error", "backend_timeout", answer.transaction_id
    )
    record = userinfo.record(answer.transaction_id)
    assert record["error"] == message
    assert record["request"]["sent"]["url"] == f"{raw_backend.url}/v1/slow?token=[REDACTED]"


def test_a_stream_cut_short_ends_with_an_error_event_without_url_credentials(
    userinfo: ProxyServer, raw_backend: RawBackend
) -> None:
    answer = call(userinfo, "/v1/drop/chat/completions", bearer(), {**CHAT, "stream": True})
    assert answer.status == 200
    # The credentials still reach the backend, as Basic authentication.
    credentials = base64.b64encode(f"{URL_USER}:{URL_PASSWORD}".encode()).decode()
    assert raw_backend.last().headers["authorization"] == f"Basic {credentials}"
    message = f"the backend's response was cut short ({raw_backend.url}/v1/drop/chat/completions)"
    error = error_body(message, "backend_error", "backend_broken", answer.transaction_id)
    assert answer.body == STREAM_EVENT + b"data: " + orjson.dumps(error) + b"\n\n"
    record = userinfo.record(answer.transaction_id)
    assert record["error"] == message
    assert record["request"]["sent"]["url"] == f"{raw_backend.url}/v1/drop/chat/completions"
    assert URL_PASSWORD not in json.dumps(record)


def test_the_log_never_holds_the_url_credentials(
    userinfo: ProxyServer, raw_backend: RawBackend
) -> None:
    answer = call(userinfo, "/v1/models", bearer())
    assert answer.status == 200
    userinfo.record(answer.transaction_id)  # written, so its log line is out too
    log = userinfo.server.log()  # type: ignore[union-attr]
    assert answer.transaction_id in log  # the DEBUG lines are there
    assert URL_PASSWORD not in log


def test_a_dev_detail_shows_no_url_credentials_nor_header_values() -> None:
    cause = ValueError(
        f"cannot open http://{URL_USER}:{URL_PASSWORD}@backend/v1?key={URL_PASSWORD} with "
        f"{{'authorization': 'Bearer {BACKEND_KEY}', 'x-api-key': '{CUSTOM_KEY}'}} ({SECRET})"
    )
    exc = BackendUnreachable("cannot connect to the backend")
    exc.__cause__ = cause
    _, body = error_status_and_body(exc, "t1", dev=True)
    assert body["error"]["detail"] == (
        'ValueError("cannot open http://backend/v1?key=[REDACTED] with '
        "{'authorization': '[REDACTED] [REDACTED]', 'x-api-key': '[REDACTED]'} ([REDACTED])\")"
    )


# --- 2. a backend's error answer that echoes the backend key ----------------------------------


def test_a_backend_error_that_echoes_the_key_is_redacted(
    keyed: ProxyServer, raw_backend: RawBackend
) -> None:
    answer = call(keyed, "/v1/echo/chat/completions", bearer(), CHAT)
    assert raw_backend.last().headers["authorization"] == f"Bearer {BACKEND_KEY}"
    assert answer.status == 401
    assert answer.body == echo_error("[REDACTED]")
    assert answer.headers["www-authenticate"] == (
        'Bearer realm="api", error="invalid key [REDACTED]"'
    )
    record = keyed.record(answer.transaction_id)
    assert record["response"]["received"]["body"] == orjson.loads(echo_error("[REDACTED]"))
    assert record["response"]["sent"]["body"] == orjson.loads(echo_error("[REDACTED]"))
    assert {"policy": "SendBackendRequest", "action": "redacted"}.items() <= (
        record["decisions"][0].items()
    )
    assert BACKEND_KEY not in json.dumps(record)


def test_a_key_in_a_header_of_its_own_is_redacted_from_the_error_and_the_record(
    custom_header: ProxyServer, raw_backend: RawBackend
) -> None:
    answer = call(custom_header, "/v1/echo/models", bearer())
    assert raw_backend.last().headers["x-goog-api-key"] == CUSTOM_KEY
    assert answer.status == 401
    assert answer.body == echo_error("[REDACTED]")
    record = custom_header.record(answer.transaction_id)
    assert record["request"]["sent"]["headers"]["x-goog-api-key"] == "[REDACTED]"
    assert CUSTOM_KEY not in json.dumps(record)


# --- 3. the client key and the backend key's header -------------------------------------------


def test_the_client_key_reaches_the_backend_in_no_header(
    keyed: ProxyServer, raw_backend: RawBackend
) -> None:
    headers = {
        **bearer(),
        "api-key": CLIENT_KEY,
        "X-Api-Key": CLIENT_KEY,
        "Proxy-Authorization": f"Bearer {CLIENT_KEY}",
        "X-Custom-Auth": f"token={CLIENT_KEY}",
        "X-Forwarded-Key": CLIENT_KEY,
        "X-Other": "harmless",
    }
    answer = call(keyed, "/v1/chat/completions", headers, CHAT)
    assert answer.status == 200
    received = raw_backend.last()
    assert received.headers == {
        "host": raw_backend.host,
        "accept-encoding": "identity",
        "content-type": "application/json",
        "x-other": "harmless",
        "authorization": f"Bearer {BACKEND_KEY}",
        "content-length": str(len(orjson.dumps(CHAT))),
    }


def test_the_client_key_is_accepted_from_x_api_key(
    keyed: ProxyServer, raw_backend: RawBackend
) -> None:
    answer = call(keyed, "/v1/models", {"x-api-key": CLIENT_KEY})
    assert answer.status == 200
    assert raw_backend.last().headers == {
        "host": raw_backend.host,
        "accept-encoding": "identity",
        "authorization": f"Bearer {BACKEND_KEY}",
    }
    # Either header may hold it.
    answer = call(keyed, "/v1/models", {**bearer("not-a-key"), "x-api-key": CLIENT_KEY})
    assert answer.status == 200


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            {},
            "missing client API key: send it as 'Authorization: Bearer <key>' "
            "or as 'x-api-key: <key>'",
        ),
        ({"x-api-key": "not-a-key"}, "invalid client API key"),
        ({"Authorization": "Basic abc", "x-api-key": "not-a-key"}, "invalid client API key"),
    ],
)
def test_without_a_valid_key_in_either_header_it_is_401(
    keyed: ProxyServer, headers: dict[str, str], message: str
) -> None:
    answer = call(keyed, "/v1/models", headers)
    assert answer.status == 401
    assert answer.json() == error_body(
        message, "authentication_error", "invalid_api_key", answer.transaction_id
    )


def test_the_messages_api_gets_the_anthropic_key_as_x_api_key(
    keyed: ProxyServer, raw_backend: RawBackend
) -> None:
    body = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        headers = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}
        answer = call(keyed, path, headers, body)
        assert answer.status == 200
        received = raw_backend.last()
        assert received.target == path
        assert received.headers == {
            "host": raw_backend.host,
            "accept-encoding": "identity",
            "content-type": "application/json",
            "anthropic-version": "2023-06-01",
            "x-api-key": ANTHROPIC_KEY,
            "content-length": str(len(orjson.dumps(body))),
        }


def test_a_header_name_carries_the_bare_key(
    custom_header: ProxyServer, raw_backend: RawBackend
) -> None:
    answer = call(custom_header, "/v1/models", bearer())
    assert answer.status == 200
    assert raw_backend.last().headers == {
        "host": raw_backend.host,
        "accept-encoding": "identity",
        "x-goog-api-key": CUSTOM_KEY,
    }


@pytest.mark.parametrize(
    ("config", "header"),
    [
        ({}, ("authorization", f"Bearer {CUSTOM_KEY}")),
        ({"header_name": "Authorization"}, ("authorization", f"Bearer {CUSTOM_KEY}")),
        ({"header_name": "x-api-key"}, ("x-api-key", CUSTOM_KEY)),
        ({"header_name": "Api-Key"}, ("api-key", CUSTOM_KEY)),
    ],
)
@pytest.mark.anyio
async def test_add_api_key_header_from_env_sets_the_named_header(
    monkeypatch: pytest.MonkeyPatch, config: dict[str, str], header: tuple[str, str]
) -> None:
    monkeypatch.setenv("CUSTOM_KEY_VAR", CUSTOM_KEY)
    raw = {"type": "AddApiKeyHeaderFromEnv", "config": {"api_key_env_var_name": "CUSTOM_KEY_VAR"}}
    raw["config"].update(config)
    policy = load_policy(raw)
    assert isinstance(policy, AddApiKeyHeaderFromEnv)
    assert policy.serialize() == raw
    tx = Transaction(request=ProxyRequest("GET", "/models", b"", {}, b""), services=None)
    await policy.on_request(tx)
    assert tx.backend_headers == dict([header])


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("x api key", "must be an HTTP header name"),
        ("Host", "Host cannot carry the backend key: the proxy manages it"),
        ("Connection", "Connection cannot carry the backend key: the proxy manages it"),
    ],
)
def test_a_header_name_that_cannot_carry_the_key_is_a_config_error(name: str, reason: str) -> None:
    raw = {
        "type": "AddApiKeyHeaderFromEnv",
        "config": {"api_key_env_var_name": "X", "header_name": name},
    }
    with pytest.raises(PolicyConfigError) as caught:
        load_policy(serial(raw))
    assert (caught.value.path, caught.value.reason) == (
        "policies[0].config.header_name",
        reason,
    )


# --- 4. dot segments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../internal",
        "/v1/%2e%2e/x",
        "/v1/foo/%2E%2E/%2e%2e/admin",
        "/v1/./x",
        "/v1/..%2finternal",
        "/v1/x%2F%2e%2e%2F%2e%2e%2Fadmin",
        "/v1/x\\..\\admin",
        "/v1/x%5c%2e%2e%5cadmin",
        "/v1/%252e%252e/x",
        "/v1/..;/admin",
        "/api/v1/../../admin",
        "/v1%2f..%2fadmin",
    ],
)
def test_a_path_with_a_dot_segment_is_refused_and_never_forwarded(
    keyed: ProxyServer, raw_backend: RawBackend, path: str
) -> None:
    before = len(raw_backend.requests)
    answer = call(keyed, path, bearer(), CHAT)
    assert answer.status == 400
    assert answer.json() == error_body(
        DOT_SEGMENTS, "invalid_request_error", "invalid_request", answer.transaction_id
    )
    assert len(raw_backend.requests) == before


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/v1/models/gpt-4.1", "/v1/models/gpt-4.1"),
        ("/v1/files/a..b/.c", "/v1/files/a..b/.c"),
        ("/api/v1/models/org%2Fname", "/v1/models/org%2Fname"),
    ],
)
def test_a_path_without_dot_segments_is_forwarded_as_written(
    keyed: ProxyServer, raw_backend: RawBackend, path: str, target: str
) -> None:
    answer = call(keyed, path, bearer())
    assert answer.status == 200
    assert raw_backend.last().target == target


@pytest.mark.anyio
async def test_a_dot_segment_a_policy_wrote_is_refused_before_the_backend() -> None:
    tx = Transaction(request=ProxyRequest("GET", "/x/../admin", b"", {}, b""), services=None)
    with pytest.raises(MalformedRequest) as caught:
        await load_policy({"type": "SendBackendRequest", "config": {}}).apply(tx)
    assert caught.value.message == DOT_SEGMENTS


# --- 5. block messages -----------------------------------------------------------------------


def test_a_judge_block_names_the_rule_not_the_judges_reason(judged: ProxyServer) -> None:
    answer = call(judged, "/v1/chat/completions", bearer(), CHAT)
    assert answer.status == 403
    message = (
        "blocked by judge: the judge found the request non-compliant with the policy's instructions"
    )
    assert answer.json() == error_body(
        message, "permission_error", "policy_blocked", answer.transaction_id
    )
    record = judged.record(answer.transaction_id)
    [decision] = record["decisions"]
    detail = json.loads(decision["detail"])
    assert (decision["action"], detail["reason"]) == (
        "judge_blocked",
        "the text quotes the key [REDACTED]",
    )
