"""SIGTERM with requests in flight, through a real proxy process and the official SDKs:
when the grace period (``SHUTDOWN_GRACE_SECONDS``, 1 s here) is over, each live stream
ends with its dialect's error event, so that the SDK raises; a non-streamed request
still waiting for its backend gets a 503 in its dialect's shape; each is recorded as
``cut_by_shutdown`` before the process exits; the log has one line per cut transaction
and no traceback."""

from __future__ import annotations

import signal
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import CLIENT_KEY, MockBackendServer, ProxyServer, ProxyStarter, e2e_policy

WAIT = 30.0  # bound on every wait (never asserted on)
SLOW_STREAM = {"x-mock-words": "5000", "x-mock-delay-ms": "20"}  # some 100 s of events
MESSAGE = "the proxy is shutting down and its grace period is over; retry"


@dataclass
class Call:
    """One client call in its own thread: the transaction id, what it got, how it ended."""

    name: str
    started: threading.Event = field(default_factory=threading.Event)
    transaction_id: str | None = None
    received: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    thread: threading.Thread | None = None


def openai_stream(proxy: ProxyServer, call: Call) -> None:
    client = openai.OpenAI(base_url=proxy.api_base, api_key=CLIENT_KEY, max_retries=0, timeout=WAIT)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "a long answer"}],
        stream=True,
        extra_headers=SLOW_STREAM,
    )
    call.transaction_id = raw.headers["x-luthien-transaction-id"]
    for chunk in raw.parse():
        call.received.append(chunk)
        call.started.set()


def anthropic_stream(proxy: ProxyServer, call: Call) -> None:
    client = anthropic.Anthropic(
        base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0, timeout=WAIT
    )
    raw = client.messages.with_raw_response.create(
        model="claude-sonnet-4-5",
        max_tokens=10_000,
        messages=[{"role": "user", "content": "a long answer"}],
        stream=True,
        extra_headers=SLOW_STREAM,
    )
    call.transaction_id = raw.headers["x-luthien-transaction-id"]
    for event in raw.parse():
        call.received.append(event)
        call.started.set()


def openai_slow_answer(proxy: ProxyServer, mock: MockBackendServer, call: Call) -> None:
    client = openai.OpenAI(base_url=proxy.api_base, api_key=CLIENT_KEY, max_retries=0, timeout=WAIT)
    request_id = uuid.uuid4().hex
    threading.Thread(
        target=lambda: (
            mock.wait_for_record(request_id, lambda record: True, WAIT) and call.started.set()
        ),
        daemon=True,
    ).start()
    try:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "take your time"}],
            extra_headers={"x-mock-first-byte-delay-ms": "60000", "x-mock-request-id": request_id},
        )
    except openai.APIStatusError as exc:
        call.transaction_id = exc.response.headers["x-luthien-transaction-id"]
        raise


def run(call: Call, target: Any, *args: Any) -> None:
    def body() -> None:
        try:
            target(*args, call)
        except BaseException as exc:  # what the SDK raised is the outcome under test
            call.error = exc

    call.thread = threading.Thread(target=body, name=call.name, daemon=True)
    call.thread.start()


@dataclass
class Shutdown:
    proxy: ProxyServer
    calls: dict[str, Call]
    exit_status: int | None
    log: str


@pytest.fixture(scope="module")
def shutdown(start_proxy: ProxyStarter, mock_backend: MockBackendServer) -> Shutdown:
    """A proxy with three requests in flight, sent SIGTERM, and what each client got."""
    proxy = start_proxy(
        policy=e2e_policy(mock_backend.api_base), env={"SHUTDOWN_GRACE_SECONDS": "1"}
    )
    calls = {name: Call(name) for name in ("openai_stream", "anthropic_stream", "openai_slow")}
    run(calls["openai_stream"], openai_stream, proxy)
    run(calls["anthropic_stream"], anthropic_stream, proxy)
    run(calls["openai_slow"], openai_slow_answer, proxy, mock_backend)
    for call in calls.values():
        assert call.started.wait(WAIT), f"{call.name} never started: {call.error!r}"
    assert proxy.server is not None and proxy.server.process is not None
    process = proxy.server.process
    process.send_signal(signal.SIGTERM)
    for call in calls.values():
        assert call.thread is not None
        call.thread.join(WAIT)
        assert not call.thread.is_alive(), f"{call.name} still waits after the shutdown"
    exit_status = process.wait(WAIT)
    return Shutdown(proxy, calls, exit_status, proxy.server.log())


def test_the_openai_sdk_raises_the_streams_error_event(shutdown: Shutdown) -> None:
    call = shutdown.calls["openai_stream"]
    assert call.received  # it had begun
    assert type(call.error) is openai.APIError
    assert call.error.message == MESSAGE
    assert call.error.body == {
        "message": MESSAGE,
        "type": "server_error",
        "param": None,
        "code": "shutting_down",
        "transaction_id": call.transaction_id,
    }


def test_the_anthropic_sdk_raises_the_streams_error_event(shutdown: Shutdown) -> None:
    call = shutdown.calls["anthropic_stream"]
    assert call.received
    assert isinstance(call.error, anthropic.APIStatusError)
    assert call.error.body == {"type": "error", "error": {"type": "api_error", "message": MESSAGE}}


def test_a_request_still_waiting_for_its_backend_gets_503(shutdown: Shutdown) -> None:
    call = shutdown.calls["openai_slow"]
    assert isinstance(call.error, openai.InternalServerError)
    assert call.error.status_code == 503
    assert call.error.body == {
        "message": MESSAGE,
        "type": "server_error",
        "param": None,
        "code": "shutting_down",
        "transaction_id": call.transaction_id,
    }


def test_each_is_recorded_as_cut_by_shutdown(shutdown: Shutdown) -> None:
    rows = {}
    for name, call in shutdown.calls.items():
        assert call.transaction_id is not None
        record = shutdown.proxy.record(call.transaction_id)
        rows[name] = (record["outcome"], record["status"], record["error"])
    assert rows == {
        "openai_stream": ("cut_by_shutdown", 200, MESSAGE),
        "anthropic_stream": ("cut_by_shutdown", 200, MESSAGE),
        "openai_slow": ("cut_by_shutdown", 503, MESSAGE),
    }
    stream = shutdown.proxy.record(shutdown.calls["openai_stream"].transaction_id or "")
    assert stream["usage_partial"] is True


def test_the_log_has_one_line_per_cut_transaction_and_no_traceback(shutdown: Shutdown) -> None:
    log = shutdown.log
    assert "Traceback" not in log
    cut = [line for line in log.splitlines() if "cut by the shutdown" in line]
    assert len(cut) == 3, log
    for call in shutdown.calls.values():
        assert sum(call.transaction_id in line for line in cut) == 1, log
    assert shutdown.exit_status == 0
