"""More red team: ways past the proxy that ``tests/test_red_team.py`` did not try.

Each case goes through a real ``luthien-control serve`` process in front of the hostile
backend of the red-team suite (``tests/red_team_backend.py``), with the same two
policies (``strict``: block; ``lenient``: redact), and is checked where the red-team
suite checks: the client's bytes, what the official SDK reassembles from them, the
stored record and the proxy's log must never hold the whole secret; and the proxy must
say what it did (a block, a redaction, or a 502 for an answer it cannot read).

The classes found here (each was a leak before its fix):

- **Strings the OpenAI SDK joins that no channel held.** The SDK folds every chat
  chunk's ``delta`` into the message with ``accumulate_delta``, which concatenates
  *every* string it meets again, at any depth: the ``role``, a tool call's ``id``, a
  custom tool's ``input``, ``audio.id``, a field no API documents. The proxy scanned only
  the documented channels across chunks, so a key split across two such strings reached
  the SDK whole.
- **A JSON body hidden from the proxy's sniffing.** A buffered answer labelled
  ``text/plain`` is parsed as JSON by the SDKs all the same (``json.loads``, which reads
  UTF-16 and UTF-32 and skips any amount of whitespace). The proxy looked for JSON in
  the first 64 bytes only: 100 spaces, in UTF-16, and the answer went out unread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

import tests.test_red_team as rt
from tests.conftest import ProxyServer, ProxyStarter
from tests.red_team_backend import (
    Canned,
    HostileBackend,
    chat_events,
    serve_in_thread,
    stream_answer,
)

LEAK = rt.LEAK


@dataclass(frozen=True)
class MoreCase:
    id: str
    dialect: str
    proxy: str  # strict (block) or lenient (redact)
    stream: bool
    answer: Callable[[rt.Secret], Canned]
    expect: str  # blocked, redacted or broken

    @property
    def secret(self) -> rt.Secret:
        return rt.openai_key(self.id)

    def case(self) -> rt.Case:
        secret = self.secret
        return rt.Case(
            self.id,
            "more",
            self.dialect,
            "leak-block" if self.proxy == "strict" else "leak-redact",
            rt.post(self.dialect, self.id, self.stream),
            rt.Expect(self.expect),
            (secret.text,),
            self.answer(secret),
        )


# --- strings the OpenAI SDK joins across chat chunks ------------------------------------------


def chat_split(
    make: Callable[[str, str], list[dict[str, object]]],
) -> Callable[[rt.Secret], Canned]:
    """A chat stream whose deltas ``make`` spells with the key's two halves."""

    def answer(secret: rt.Secret) -> Canned:
        first, second = secret.text[:14], secret.text[14:]
        return stream_answer(chat_events(*make(first, second)))

    return answer


def _call(**fields: object) -> dict[str, object]:
    return {"tool_calls": [{"index": 0, **fields}]}


CHAT_JOINED: dict[str, Callable[[str, str], list[dict[str, object]]]] = {
    "role": lambda a, b: [{"role": "note " + a}, {"role": b}],
    "tool_call_id": lambda a, b: [
        _call(id="call_" + a, type="function", function={"name": "lookup", "arguments": ""}),
        _call(id=b, function={"arguments": "{}"}),
    ],
    "undocumented_field": lambda a, b: [{"meta": {"note": a}}, {"meta": {"note": b}}],
    "audio_id": lambda a, b: [{"audio": {"id": a, "transcript": "hi"}}, {"audio": {"id": b}}],
    "custom_tool_input": lambda a, b: [
        _call(id="call_c", type="custom", custom={"name": "lookup", "input": a}),
        _call(custom={"input": b}),
    ],
}


# --- a JSON answer the proxy's sniffing missed -----------------------------------------------


def hidden_json(encoding: str, dialect: str) -> Callable[[rt.Secret], Canned]:
    """A buffered answer as ``text/plain``: 100 spaces, then the JSON, in ``encoding``
    (no byte order mark). ``json.loads`` reads it; orjson does not."""

    def answer(secret: rt.Secret) -> Canned:
        body = rt.text_answer(dialect, False, "The key is ", secret.text, ".").pieces[0]
        text = " " * 100 + body.decode()
        return Canned(200, [("content-type", "text/plain")], [text.encode(encoding)])

    return answer


CASES: dict[str, MoreCase] = {}


def add(case: MoreCase) -> None:
    assert case.id not in CASES
    CASES[case.id] = case


for _proxy, _expect in (("strict", "blocked"), ("lenient", "redacted")):
    for _name, _make in CHAT_JOINED.items():
        add(
            MoreCase(
                f"chat_joined_{_name}-{_proxy}", "chat", _proxy, True, chat_split(_make), _expect
            )
        )
    for _dialect in rt.DIALECTS:
        for _encoding in ("utf-16-le", "utf-32-le"):
            _id = f"hidden_json_{_encoding}-{_dialect}-{_proxy}"
            add(MoreCase(_id, _dialect, _proxy, False, hidden_json(_encoding, _dialect), "broken"))


# --- running them ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxies(start_proxy: ProxyStarter) -> Iterator[rt.OneProxyAtATime]:
    answers = {case.id: case.case().answer for case in CASES.values()}
    backend = HostileBackend(answers, rt.default_answer)  # type: ignore[arg-type]
    with serve_in_thread(backend) as host:
        fleet = rt.OneProxyAtATime(start_proxy, host)
        yield fleet
        fleet.stop()


def exchange(proxy: ProxyServer, case: rt.Case) -> rt.Exchange:
    assert proxy.server is not None
    start = proxy.server.log_path.stat().st_size
    status, headers, body = rt.send(proxy, case.call)
    run = rt.Exchange(status, headers, body, start)
    assert run.transaction_id
    run.record = rt.read_record(proxy, run.transaction_id, time.monotonic() + 30)
    run.record_text = "\n".join(str(value) for value in run.record.values())
    run.log = proxy.server.log_path.read_bytes()[start:].decode("utf-8", "replace")
    return run


def ordered() -> list[MoreCase]:
    return sorted(CASES.values(), key=lambda case: case.proxy != "strict")


@pytest.mark.parametrize("more", ordered(), ids=lambda case: case.id)
def test_red_team_more(more: MoreCase, proxies: rt.OneProxyAtATime) -> None:
    case = more.case()
    run = exchange(proxies.get(more.proxy), case)
    view = rt.sdk_view(case, run)
    places = {
        "client bytes": rt.client_text(run),
        "SDK": view.text,
        "record": run.record_text,
        "log": run.log,
    }
    leaks = [place for place, text in places.items() if rt.found(text, case.needles)]
    assert not leaks, f"the key reached: {leaks}"
    assert "Traceback" not in run.log
    if more.expect == "broken":
        rt.check_error_ending(case, run, "broken")
        assert run.record["outcome"] == "backend_error"
        return
    action = "blocked" if more.expect == "blocked" else "redacted"
    assert rt.decisions(run) == {(LEAK, action)}
    if action == "blocked":
        rt.check_error_ending(case, run, "blocked")
        assert run.record["outcome"] == "blocked"
        return
    assert run.status == 200 and rt.complete_stream(case.dialect, run)
    if "custom_tool" not in more.id:  # the SDK's stream helper cannot fold a custom call
        assert view.errors == []
    assert any(rt.REDACTED in form for form in rt.readable_forms(rt.client_text(run)))


def test_looks_like_json_as_json_loads_reads() -> None:
    """``looks_like_json`` finds what ``json.loads`` would read: past any amount of
    whitespace, in UTF-16 and UTF-32 without a byte order mark too."""
    from luthien_control.decoding import looks_like_json

    for encoding in ("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32-le"):
        body = (" \n" * 70_000 + '{"a": 1}').encode(encoding)
        assert json.loads(body) == {"a": 1}
        assert looks_like_json(body), encoding
        assert not looks_like_json((" " * 70_000 + "hello").encode(encoding)), encoding
