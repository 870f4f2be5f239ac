"""Red team on the dialects: what the official SDKs fold from a Messages or Responses
stream that the proxy did not read as the SDK does.

Each case goes through a real ``luthien-control serve`` process in front of the hostile
backend of the red-team suite (``tests/red_team_backend.py``), with its two policies
(``strict``: block secrets and forbidden calls; ``lenient``: redact and drop), and is
checked as ``tests/test_red_team.py`` checks its cases: a secret must reach neither the
client's bytes, nor what the SDK reassembles, nor the record, nor the log; a forbidden
call must reach neither the client nor its SDK; and the proxy must say what it did.

The classes found here (each was a leak before its fix):

- **Text a Responses delta continues that no channel held.** The openai SDK appends an
  ``output_text.delta`` to the text its part began with and a
  ``function_call_arguments.delta`` to the arguments its item began with: a part or
  item as ``response.created``, ``output_item.added`` or ``content_part.added`` gave it.
  The proxy's channels began with the deltas, so half a key there and half in the
  deltas reached the SDK's ``snapshot`` whole. Such a stream is now ``BackendBroken``.
- **A Responses final answer the SDK builds itself.** A terminal event without
  ``output`` makes the SDK's final response of the items as ``output_item.done`` (or a
  later ``response.in_progress``, by identity) stated them, and ``output_text`` joins
  their text; the proxy read each of those events alone. Such an ending is now
  ``BackendBroken`` once items came.
- **A Messages tool input the SDK keeps from the block's start.** The anthropic SDK
  parses the ``input_json_delta`` buffer only when it is not empty: with empty deltas
  the ``tool_use`` input is the one ``content_block_start`` gave. The proxy judged the
  empty text (``argument_patterns`` matched nothing) and the record said ``{}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import tests.test_red_team as rt
from tests.conftest import ProxyServer, ProxyStarter
from tests.red_team_backend import (
    Canned,
    HostileBackend,
    MessagesStream,
    ResponsesStream,
    function_item,
    message_item,
    response_object,
    serve_in_thread,
    stream_answer,
    text_part,
)


@dataclass(frozen=True)
class DialectCase:
    id: str
    dialect: str  # messages or responses
    proxy: str  # strict or lenient
    answer: Callable[[str], Canned]  # of the needle (a key, or a marker in a call)
    expect: str  # blocked, dropped or broken
    secret: bool = True  # the needle is a key (else: a forbidden call's marker)

    @property
    def needle(self) -> str:
        return rt.openai_key(self.id).text if self.secret else rt.marker(self.id)

    def case(self) -> rt.Case:
        if self.secret:
            expect = rt.Expect(self.expect)
            mode = "leak-block" if self.proxy == "strict" else "leak-redact"
        else:
            expect = rt.tool_expect("block" if self.proxy == "strict" else "drop_call")
            mode = "tools-block" if self.proxy == "strict" else "tools-drop_call"
        return rt.Case(
            self.id,
            "dialects",
            self.dialect,
            mode,
            rt.post(self.dialect, self.id, True),
            expect,
            (self.needle,),
            self.answer(self.needle),
            secret=self.secret,
        )


def halves(key: str) -> tuple[str, str]:
    return "my key is " + key[:14], key[14:]


# --- Responses: text the SDK folds that no delta carried -------------------------------------


def r_done_items_only(key: str) -> Canned:
    """Two message items stated only by their ``output_item.done`` events, and a
    ``response.completed`` without ``output``: the SDK's final response is those items,
    and its ``output_text`` joins them."""
    first, second = halves(key)
    events = ResponsesStream()
    events.item_done(0, message_item(text_part(first), item_id="msg_a"))
    events.item_done(1, message_item(text_part(second), item_id="msg_b"))
    response = response_object([])
    del response["output"]
    events.emit("response.completed", response=response)
    return stream_answer(events.events)


def r_part_added_text(key: str) -> Canned:
    """A ``content_part.added`` whose part already holds text: the SDK appends the
    deltas to it (the delta events' ``snapshot``)."""
    first, second = halves(key)
    events = ResponsesStream()
    item = {**message_item(item_id="msg_a"), "status": "in_progress"}
    events.emit("response.output_item.added", output_index=0, item=item)
    place = {"item_id": "msg_a", "output_index": 0, "content_index": 0}
    events.emit("response.content_part.added", **place, part=text_part(first))
    events.emit("response.output_text.delta", **place, delta=second, logprobs=[])
    events.emit("response.output_text.done", **place, text=second, logprobs=[])
    events.emit("response.content_part.done", **place, part=text_part(second))
    events.item_done(0, message_item(text_part(second), item_id="msg_a"))
    return stream_answer(events.done())


def r_item_added_text(key: str) -> Canned:
    """An ``output_item.added`` message whose part already holds text."""
    first, second = halves(key)
    events = ResponsesStream()
    item = {**message_item(text_part(first), item_id="msg_a"), "status": "in_progress"}
    events.emit("response.output_item.added", output_index=0, item=item)
    place = {"item_id": "msg_a", "output_index": 0, "content_index": 0}
    events.emit("response.output_text.delta", **place, delta=second, logprobs=[])
    events.emit("response.output_text.done", **place, text=second, logprobs=[])
    events.item_done(0, message_item(text_part(second), item_id="msg_a"))
    return stream_answer(events.done())


def r_created_output_text(key: str) -> Canned:
    """A ``response.created`` whose output already holds a message with text."""
    first, second = halves(key)
    events = ResponsesStream()
    events.events.clear()
    events.sequence = 0
    created = response_object([message_item(text_part(first), item_id="msg_a")], "in_progress")
    events.emit("response.created", response=created)
    place = {"item_id": "msg_a", "output_index": 0, "content_index": 0}
    events.emit("response.output_text.delta", **place, delta=second, logprobs=[])
    events.emit("response.output_text.done", **place, text=second, logprobs=[])
    events.item_done(0, message_item(text_part(second), item_id="msg_a"))
    return stream_answer(events.done())


def r_function_added_arguments(key: str) -> Canned:
    """A ``function_call`` item added with arguments, continued by deltas: the SDK
    appends the deltas to them."""
    first, second = '{"note": "' + key[:14], key[14:] + '"}'
    events = ResponsesStream()
    item = {**function_item("lookup", first), "status": "in_progress"}
    events.emit("response.output_item.added", output_index=0, item=item)
    place = {"item_id": "fc_red", "output_index": 0}
    events.emit("response.function_call_arguments.delta", **place, delta=second)
    events.emit("response.function_call_arguments.done", **place, arguments=second)
    events.item_done(0, function_item("lookup", second))
    return stream_answer(events.done())


def r_lifecycle_replaced(key: str) -> Canned:
    """A ``response.in_progress`` after an item is done restates it (same id) with the
    key in two parts; ``response.completed`` has no ``output``, so the SDK's final
    response holds the restated item, its parts joined in ``output_text``."""
    first, second = halves(key)
    events = ResponsesStream()
    events.message(["hello"], item_id="msg_a")
    restated = message_item(text_part(first), text_part(second), item_id="msg_a")
    events.emit("response.in_progress", response=response_object([restated], "in_progress"))
    response = response_object([])
    del response["output"]
    events.emit("response.completed", response=response)
    return stream_answer(events.events)


# --- Messages --------------------------------------------------------------------------------


def m_empty_partial_json(mark: str) -> Canned:
    """A ``tool_use`` block whose input is in its start, with one empty
    ``input_json_delta``: the SDK parses no empty buffer and keeps the start's input."""
    stream = MessagesStream()
    stream.text("ok")
    stream.tool_use("read_file", "", input={"path": f"/etc/passwd-{mark}"})
    return stream_answer(stream.done("tool_use"))


CASES: dict[str, DialectCase] = {}


def add(case: DialectCase) -> None:
    assert case.id not in CASES
    CASES[case.id] = case


_SECRETS = {
    "done_items_only": r_done_items_only,
    "part_added_text": r_part_added_text,
    "item_added_text": r_item_added_text,
    "created_output_text": r_created_output_text,
    "function_added_arguments": r_function_added_arguments,
    "lifecycle_replaced": r_lifecycle_replaced,
}
_CALLS = {"empty_partial_json": ("messages", m_empty_partial_json)}

# A Responses stream the SDK would fold where no policy read is the backend's fault: 502
# (or the error event), under either policy.
for _proxy in ("strict", "lenient"):
    for _name, _make in _SECRETS.items():
        add(DialectCase(f"{_name}-responses-{_proxy}", "responses", _proxy, _make, "broken"))
    for _name, (_dialect, _make) in _CALLS.items():
        _kind = "blocked" if _proxy == "strict" else "dropped"
        add(DialectCase(f"{_name}-{_dialect}-{_proxy}", _dialect, _proxy, _make, _kind, False))


# --- running them ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxies(start_proxy: ProxyStarter) -> Iterator[rt.OneProxyAtATime]:
    answers: dict[str, Any] = {case.id: case.case().answer for case in CASES.values()}
    backend = HostileBackend(answers, rt.default_answer)
    with serve_in_thread(backend) as host:
        fleet = rt.OneProxyAtATime(start_proxy, host, backend=backend)
        yield fleet
        fleet.stop()


def exchange(fleet: rt.OneProxyAtATime, proxy: ProxyServer, case: rt.Case) -> rt.Exchange:
    assert proxy.server is not None
    start = proxy.server.log_path.stat().st_size
    status, headers, body = rt.send(proxy, case.call)
    run = rt.Exchange(status, headers, body, start)
    assert run.transaction_id
    run.record = rt.read_record(proxy, run.transaction_id, time.monotonic() + 30)
    run.record_text = "\n".join(str(value) for value in run.record.values())
    run.log = proxy.server.log_path.read_bytes()[start:].decode("utf-8", "replace")
    run.received = list(fleet.backend.received.get(case.id, []))
    return run


def ordered() -> list[DialectCase]:
    return sorted(CASES.values(), key=lambda case: case.proxy != "strict")


@pytest.mark.parametrize("dialect_case", ordered(), ids=lambda case: case.id)
def test_red_team_dialects(dialect_case: DialectCase, proxies: rt.OneProxyAtATime) -> None:
    case = dialect_case.case()
    run = exchange(proxies, proxies.get(dialect_case.proxy), case)
    view = rt.sdk_view(case, run)
    leaks = rt.exposures(case, run, view)
    assert not leaks, f"leaked (where: which needles): {leaks}"
    assert "Traceback" not in run.log
    rt.check_outcome(case, run, view)
    if dialect_case.expect == "broken":
        assert run.record["outcome"] == "backend_error"
