"""Red team on ToolCallPolicy: forbidden calls that reach the client as the official
SDKs reassemble them.

Each case goes through a real ``luthien-control serve`` process in front of the hostile
backend of the red-team suite (``tests/red_team_backend.py``), under the red team's two
policies (``strict``: ``action: block``; ``lenient``: ``action: drop_call``; both deny
``shell`` and the built-in tool items and hold the argument pattern ``/etc/``). What the
client got is then read by the official SDK (``tests/test_red_team.py``'s views: the
openai chat and Responses stream helpers, anthropic's ``messages.stream()``), and no
tool call of the SDK's final answer may be denied by name or match the pattern.

The classes found here (each reached the client before its fix, under block and
drop_call):

- **A Responses answer that also has chat's ``choices``.** The OpenAI routes read an
  answer's ``choices`` and only else its ``output``, and a stream event with a non-empty
  ``choices`` only as a chat chunk: an empty ``choices`` beside a Responses ``output``
  (buffered), or a ``choices`` list in each event of a call item (streamed), hid the call
  from the policy while the Responses SDK read it. Both shapes are now read.
- **Anthropic's ``mcp_tool_use`` blocks** (the MCP connector's calls) were no calls.
- **A streamed Messages input the SDK reads leniently.** The anthropic SDK parses the
  input buffer with ``jiter`` in partial mode: the first value, what follows ignored,
  what is left open closed. The proxy saw no JSON there, only a text that a pattern
  anchored at a value's start (``^/etc/``) did not match.
- **A Messages event the SDK leaves out.** The anthropic SDK skips an event named
  ``ping`` and one with no ``event:`` line, whatever its data says; the proxy joined
  its ``input_json_delta`` into the input it checked (``/e`` + ``X`` + ``tc/`` passed,
  the SDK folded ``/etc/``). An event of a tool call named otherwise than its data's
  ``type`` now makes the stream ``BackendBroken``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

import tests.test_red_team as rt
from luthien_control.dialects import messages_tools
from luthien_control.policies.tools.names import normalise_name
from tests.conftest import ProxyStarter
from tests.red_team_backend import (
    Canned,
    HostileBackend,
    MessagesStream,
    ResponsesStream,
    anthropic_message,
    function_item,
    json_answer,
    message_item,
    response_object,
    serve_in_thread,
    sse,
    stream_answer,
    text_part,
)

DENIED = frozenset(map(normalise_name, rt.DENIED))


@dataclass(frozen=True)
class ToolCase:
    id: str
    dialect: str  # chat, responses or messages
    stream: bool
    proxy: str  # strict (block) or lenient (drop_call)
    answer: Canned
    marker: str  # in the forbidden call's arguments
    calls: tuple[str, ...] = ()  # the calls the SDK is left with once the forbidden one is dropped
    broken: bool = False  # the stream is the backend's fault: 502, or the error event

    def case(self) -> rt.Case:
        action = "block" if self.proxy in ("strict", "anchored") else "drop_call"
        expect = rt.tool_expect(action, **({"calls": self.calls} if self.calls else {}))
        if self.broken:
            expect = rt.Expect("broken")
        return rt.Case(
            self.id,
            self.id.split("-")[0],
            self.dialect,
            f"tools-{action}",
            rt.post(self.dialect, self.id, self.stream),
            expect,
            (self.marker,),
            self.answer,
            secret=False,
        )


CASES: dict[str, ToolCase] = {}


def add(case: ToolCase) -> None:
    assert case.id not in CASES
    CASES[case.id] = case


# --- Responses: an answer that also has chat's ``choices`` ---------------------------------


def r_choices_buffered(mark: str) -> Canned:
    """A buffered Responses answer with an empty ``choices`` list besides its ``output``:
    the SDK reads the ``output``."""
    call = function_item("shell", json.dumps({"command": f"ls {mark}"}))
    return json_answer(response_object([message_item(text_part("ok")), call], choices=[]))


def r_choices_stream(mark: str) -> Canned:
    """Every event of a streamed call carries a ``choices`` list as well."""
    events = ResponsesStream()
    events.message(["ok"])
    item = function_item("shell", json.dumps({"command": f"ls {mark}"}))
    extra = {"choices": [{"index": 0, "delta": {}}]}
    events.emit("response.output_item.added", output_index=1, item=item, **extra)
    events.emit("response.output_item.done", output_index=1, item=item, **extra)
    events.output.append(item)
    completed = response_object(events.output, choices=[{"index": 0, "delta": {}}])
    events.emit("response.completed", response=completed, **extra)
    return stream_answer(events.events)


# --- Messages: the MCP connector's calls ----------------------------------------------------


def _mcp_block(mark: str) -> dict[str, Any]:
    return {
        "type": "mcp_tool_use",
        "id": "mcptoolu_red",
        "name": "shell",
        "server_name": "box",
        "input": {"command": f"ls {mark}"},
    }


def m_mcp_buffered(mark: str) -> Canned:
    """An ``mcp_tool_use`` block (Anthropic's MCP connector; the SDK's
    ``BetaMCPToolUseBlock``, whose input its stream helper tracks like a ``tool_use``'s)
    naming a denied tool."""
    return json_answer(anthropic_message([{"type": "text", "text": "ok"}, _mcp_block(mark)]))


def m_mcp_stream(mark: str) -> Canned:
    stream = MessagesStream()
    stream.text("ok")
    block = _mcp_block(mark)
    arguments = json.dumps(block["input"])
    stream.block(
        {**block, "input": {}},
        [{"type": "input_json_delta", "partial_json": p} for p in (arguments[:6], arguments[6:])],
    )
    return stream_answer(stream.done())


# --- Messages: input JSON the SDK reads leniently ---------------------------------------------


def m_trailing_json(mark: str) -> Canned:
    """A ``tool_use`` input streamed as an object followed by more text: the anthropic
    SDK parses the buffer with ``jiter`` in partial mode, which reads the first value and
    ignores the rest; the proxy saw no JSON, only a text an anchored pattern
    (``^/etc/``) does not match."""
    stream = MessagesStream()
    stream.text("ok")
    arguments = json.dumps({"path": f"/etc/passwd-{mark}"})
    stream.tool_use("read_file", arguments, ' {"path": "notes.txt"}')
    return stream_answer(stream.done("tool_use"))


def m_unclosed_json(mark: str) -> Canned:
    """A ``tool_use`` input streamed without its closing brace: ``jiter``'s partial mode
    closes it."""
    stream = MessagesStream()
    stream.text("ok")
    stream.tool_use("read_file", json.dumps({"path": f"/etc/passwd-{mark}"})[:-1])
    return stream_answer(stream.done("tool_use"))


def m_hidden_delta(event: str | None) -> Callable[[str], Canned]:
    """A ``tool_use`` input whose deltas spell ``/etc/passwd`` once an event between them
    is left out, as the anthropic SDK leaves out an event named ``ping`` (or with no
    ``event:`` line), whatever its data says."""

    def answer(mark: str) -> Canned:
        stream = MessagesStream()
        stream.text("ok")
        start = {"type": "tool_use", "id": "toolu_red", "name": "read_file", "input": {}}
        stream.emit({"type": "content_block_start", "index": 1, "content_block": start})

        def delta(text: str) -> dict[str, Any]:
            json_delta = {"type": "input_json_delta", "partial_json": text}
            return {"type": "content_block_delta", "index": 1, "delta": json_delta}

        stream.emit(delta('{"path": "/e'))
        stream.raw(sse(delta("X"), event))
        stream.emit(delta(f'tc/passwd-{mark}"}}'))
        stream.emit({"type": "content_block_stop", "index": 1})
        return stream_answer(stream.done("tool_use"))

    return answer


SPECS: dict[tuple[str, str, bool], tuple[Callable[[str], Canned], tuple[str, ...]]] = {
    ("choices_buffered", "responses", False): (r_choices_buffered, ()),
    ("choices_stream", "responses", True): (r_choices_stream, ()),
    ("mcp_tool_use_buffered", "messages", False): (m_mcp_buffered, ()),
    ("mcp_tool_use_stream", "messages", True): (m_mcp_stream, ()),
    ("trailing_json", "messages", True): (m_trailing_json, ()),
    ("unclosed_json", "messages", True): (m_unclosed_json, ()),
    ("delta_in_ping", "messages", True): (m_hidden_delta("ping"), ()),
    ("delta_without_event_name", "messages", True): (m_hidden_delta(None), ()),
}
ANCHORED = {"trailing_json", "unclosed_json"}  # tried under a pattern anchored at the value's start
BROKEN = {"delta_in_ping", "delta_without_event_name"}  # 502, or the error event
for (_name, _dialect, _stream), (_make, _calls) in SPECS.items():
    for _proxy in ("anchored", "anchored_drop") if _name in ANCHORED else ("strict", "lenient"):
        _id = f"{_name}-{_dialect}-{_proxy}"
        _mark = rt.marker(_id)
        _case = ToolCase(_id, _dialect, _stream, _proxy, _make(_mark), _mark, _calls)
        add(replace(_case, broken=_name in BROKEN))


# --- running them ------------------------------------------------------------------------------


def proxy_policy(name: str, backend: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The red team's proxies, and ``anchored`` (``anchored_drop``): ToolCallPolicy with
    the argument pattern ``^/etc/`` only, blocking (dropping)."""
    if not name.startswith("anchored"):
        return rt.proxy_policy(name, backend)
    action = "block" if name == "anchored" else "drop_call"
    tools = {
        "type": rt.TOOLS,
        "config": {"argument_patterns": ["^/etc/"], "action": action},
    }
    url = f"http://{backend}/v1"
    chain = (rt.AUTH, rt.LOGGING, tools, rt.KEYS, rt.backend_at(url), rt.SEND, tools, rt.LOGGING)
    return rt.serial(name, *chain), {}


@pytest.fixture(scope="module")
def proxies(start_proxy: ProxyStarter) -> Iterator[rt.OneProxyAtATime]:
    answers: dict[str, Any] = {case.id: case.answer for case in CASES.values()}
    with serve_in_thread(HostileBackend(answers, rt.default_answer)) as host:
        fleet = rt.OneProxyAtATime(start_proxy, host, proxy_policy)
        yield fleet
        fleet.stop()


def ordered() -> list[ToolCase]:
    order = ("strict", "lenient", "anchored", "anchored_drop")
    return sorted(CASES.values(), key=lambda case: order.index(case.proxy))


def sdk_calls(final: Any, dialect: str) -> list[tuple[str, str]]:
    """(name, arguments as JSON text) of each tool call of the SDK's final answer."""
    calls: list[tuple[str, str]] = []
    if not isinstance(final, dict):
        return calls
    if dialect == "chat":
        for choice in final.get("choices") or []:
            message = choice.get("message") or {}
            for call in message.get("tool_calls") or []:
                part = call.get("function") or call.get("custom") or {}
                arguments = part.get("arguments", part.get("input"))
                calls.append((part.get("name") or "", json.dumps(arguments)))
            if message.get("function_call"):
                legacy = message["function_call"]
                calls.append((legacy.get("name") or "", json.dumps(legacy.get("arguments"))))
    elif dialect == "responses":
        for item in final.get("output") or []:
            if isinstance(item, dict) and item.get("type") not in ("message", "reasoning"):
                name = str(item.get("name") or item.get("type"))
                calls.append((name, json.dumps(item, ensure_ascii=False)))
                if item.get("type") not in ("function_call", "custom_tool_call"):
                    calls.append((str(item.get("type")), ""))
    else:
        for block in final.get("content") or []:
            if block.get("type") in ("tool_use", "server_tool_use", "mcp_tool_use"):
                calls.append((block.get("name") or "", json.dumps(block.get("input"))))
    return calls


@pytest.mark.parametrize("tool_case", ordered(), ids=lambda case: case.id)
def test_red_team_tools(tool_case: ToolCase, proxies: rt.OneProxyAtATime) -> None:
    case = tool_case.case()
    proxy = proxies.get(tool_case.proxy)
    assert proxy.server is not None
    start = proxy.server.log_path.stat().st_size
    status, headers, body = rt.send(proxy, case.call)
    run = rt.Exchange(status, headers, body, start)
    assert run.transaction_id
    run.record = rt.read_record(proxy, run.transaction_id, time.monotonic() + 30)
    run.log = proxy.server.log_path.read_bytes()[start:].decode("utf-8", "replace")
    view = rt.sdk_view(case, run)
    final = json.loads(view.text).get("final")
    calls = sdk_calls(final, tool_case.dialect)
    assert not [name for name, _ in calls if normalise_name(name) in DENIED], calls
    assert not [text for _, text in calls if "/etc/" in text.replace("\\/", "/")], calls
    leaks = rt.exposures(case, run, view)
    assert not leaks, f"leaked (where: which needles): {leaks}"
    assert "Traceback" not in run.log
    rt.check_outcome(case, run, view)


def test_a_dropped_mcp_call_in_the_history_goes_with_its_result() -> None:
    """An ``mcp_tool_use`` of the history is a call, and its ``mcp_tool_result`` (in the
    same assistant message: Anthropic ran it) goes when it is dropped."""
    mark = rt.marker("mcp-history")
    block = _mcp_block(mark)
    result = {
        "type": "mcp_tool_result",
        "tool_use_id": "mcptoolu_red",
        "is_error": False,
        "content": [{"type": "text", "text": "done"}],
    }
    payload = {
        "model": "claude-red",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [block, result]},
            {"role": "user", "content": "go on"},
        ],
    }
    calls = messages_tools.history_calls(payload)
    assert [[call.name for call in found.versions] for found in calls] == [["shell"]]
    for found in calls:
        found.drop()
    assert calls.commit()
    assert payload["messages"][1] == {"role": "assistant", "content": [messages_tools.REMOVED]}
