"""ToolCallPolicy: a tool call is checked whole, and none of a refused call gets out.

The stream transform is driven with hand-built chunks, the arguments split in every
way; what the transform returns is what the client would receive.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import regex

from luthien_control.dialects.chat import ChatAssembler as StreamAssembler
from luthien_control.exceptions import PolicyBlocked, PolicyConfigError
from luthien_control.mock_backend import responses as mock_responses
from luthien_control.mock_backend.scenario import Scenario
from luthien_control.mock_backend.scenario import ToolCall as MockCall
from luthien_control.policies.loader import load_policy
from luthien_control.policies.tools import ToolCall, ToolCallPolicy
from luthien_control.sse import Chunk
from luthien_control.transaction import ProxyRequest, ProxyResponse, Transaction
from tests.policies.conftest import through

READ_ARGS = '{"path": "/tmp/notes.txt", "lines": 10}'
SHELL_ARGS = '{"command": "rm -rf /srv/data"}'


def policy(**config: Any) -> ToolCallPolicy:
    return ToolCallPolicy(ToolCallPolicy.Config(**config), config)


def transaction(payload: Any = None) -> Transaction:
    body = orjson.dumps(payload if payload is not None else {})
    return Transaction(
        request=ProxyRequest("POST", "/chat/completions", b"", {}, body), services=None
    )


def event(delta: dict[str, Any], *, finish: str | None = None, index: int = 0) -> Chunk:
    data = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return Chunk(b"data: " + orjson.dumps(data) + b"\n\n")


def text(content: str, *, index: int = 0) -> Chunk:
    return event({"content": content}, index=index)


def role() -> Chunk:
    return event({"role": "assistant", "content": None, "refusal": None})


def finish(reason: str = "tool_calls", *, index: int = 0) -> Chunk:
    return event({}, finish=reason, index=index)


def call(
    k: int, name: str, parts: list[str], *, choice: int = 0, call_id: str | None = None
) -> list[Chunk]:
    """A streamed tool call as OpenAI sends it: the head (id, name), then argument deltas."""
    head = {
        "index": k,
        "id": call_id or f"call_{k}",
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    return [
        event({"tool_calls": [head]}, index=choice),
        *(
            event({"tool_calls": [{"index": k, "function": {"arguments": p}}]}, index=choice)
            for p in parts
        ),
    ]


def splits(value: str) -> list[list[str]]:
    """Every way to cut ``value`` into two parts, and a spread of three-part cuts."""
    two = [[value[:i], value[i:]] for i in range(1, len(value))]
    three = [
        [value[:i], value[i:j], value[j:]]
        for i in range(1, len(value) - 1)
        for j in range(i + 1, len(value))
    ]
    return [[value], *two, *three[::5]]


async def run(
    p: ToolCallPolicy, chunks: list[Chunk], tx: Transaction | None = None
) -> tuple[list[Chunk], Transaction]:
    tx = tx or transaction()
    return await through(p.stream_transform(tx), chunks), tx


async def run_until_blocked(
    p: ToolCallPolicy, chunks: list[Chunk]
) -> tuple[list[Chunk], Transaction, PolicyBlocked]:
    """Everything released before the transform raised ``PolicyBlocked`` (which it must)."""
    tx = transaction()
    transform = p.stream_transform(tx)
    out: list[Chunk] = []
    with pytest.raises(PolicyBlocked) as caught:
        for c in chunks:
            out.extend(await transform.on_chunk(c))
        out.extend(await transform.on_end())
    return out, tx, caught.value


def data_of(c: Chunk) -> dict[str, Any]:
    parsed: dict[str, Any] = orjson.loads(c.raw[6:-2])
    return parsed


def assembled(chunks: list[Chunk]) -> StreamAssembler:
    """What a client accumulates from the chunks it received."""
    assembler = StreamAssembler()
    for c in chunks:
        assembler.feed(data_of(c))
    return assembler


def call_deltas(chunks: list[Chunk]) -> list[dict[str, Any]]:
    return [
        delta
        for c in chunks
        for choice in data_of(c)["choices"]
        for delta in (choice["delta"].get("tool_calls") or [])
    ]


def decisions(tx: Transaction) -> list[tuple[str, str, str]]:
    return [(d.policy, d.action, d.detail) for d in tx.decisions]


# --- streamed: allowed calls ------------------------------------------------------------


@pytest.mark.anyio
async def test_allowed_call_comes_out_byte_for_byte_in_order_for_every_split() -> None:
    for parts in splits(READ_ARGS):
        chunks = [role(), text("Let me look."), *call(0, "read_file", parts), finish()]
        raws = [c.raw for c in chunks]
        out, tx = await run(policy(denied_tools=["shell"]), chunks)
        assert [c.raw for c in out] == raws
        assert tx.decisions == []


@pytest.mark.anyio
async def test_two_allowed_calls_come_out_byte_for_byte() -> None:
    chunks = [
        role(),
        *call(0, "read_file", ['{"pa', 'th": "/a"}']),
        *call(1, "read_file", ['{"path"', ': "/b"}']),
        finish(),
    ]
    raws = [c.raw for c in chunks]
    out, _ = await run(policy(allowed_tools=["read_file"], argument_patterns=["/etc"]), chunks)
    assert [c.raw for c in out] == raws


@pytest.mark.anyio
async def test_text_flows_at_once_while_a_call_is_held_until_complete() -> None:
    transform = policy(denied_tools=["shell"]).stream_transform(transaction())
    first, second = role(), text("Checking the file.")
    assert await transform.on_chunk(first) == [first]
    assert await transform.on_chunk(second) == [second]  # released at once
    head, *arguments = call(0, "read_file", ['{"path": ', '"/tmp/a"}'])
    assert await transform.on_chunk(head) == []
    assert await transform.on_chunk(arguments[0]) == []
    during = text(" Still here.")  # text while the call is open is not held either
    assert await transform.on_chunk(during) == [during]
    assert await transform.on_chunk(arguments[1]) == []
    end = finish()
    assert await transform.on_chunk(end) == [head, *arguments, end]  # the call, then the finish
    assert await transform.on_end() == []


@pytest.mark.anyio
async def test_a_call_is_complete_when_the_next_call_begins() -> None:
    transform = policy(denied_tools=["shell"]).stream_transform(transaction())
    first = call(0, "read_file", [READ_ARGS])
    second = call(1, "list_dir", ['{"path": "/"}'])
    for c in first:
        assert await transform.on_chunk(c) == []
    assert await transform.on_chunk(second[0]) == first  # call 0 released, call 1 held
    assert await transform.on_chunk(second[1]) == []
    assert await transform.on_end() == second  # the stream ended without a finish_reason


@pytest.mark.anyio
async def test_text_and_a_call_delta_in_one_chunk_are_separated() -> None:
    mixed = event(
        {
            "content": "Reading.",
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": READ_ARGS[:9]},
                }
            ],
        }
    )
    rest = event({"tool_calls": [{"index": 0, "function": {"arguments": READ_ARGS[9:]}}]})
    transform = policy(denied_tools=["shell"]).stream_transform(transaction())
    now = await transform.on_chunk(mixed)
    assert [data_of(c)["choices"][0]["delta"] for c in now] == [{"content": "Reading."}]
    assert await transform.on_chunk(rest) == []
    out = [*now, *await transform.on_chunk(finish()), *await transform.on_end()]
    message = assembled(out).message()
    assert message["content"] == "Reading."
    assert message["tool_calls"] == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "read_file", "arguments": READ_ARGS},
        }
    ]
    assert assembled(out).choices[0].finish_reason == "tool_calls"


@pytest.mark.anyio
async def test_events_without_choices_pass_unchanged() -> None:
    usage = Chunk(b'data: {"id":"x","choices":[],"usage":{"total_tokens":3}}\n\n')
    other = Chunk(b'event: response.created\ndata: {"type":"response.created"}\n\n')
    out, _ = await run(policy(denied_tools=["shell"]), [usage, other])
    assert out == [usage, other]


# --- streamed: blocked calls ------------------------------------------------------------


@pytest.mark.anyio
async def test_denied_call_never_gets_out_whatever_the_split() -> None:
    for parts in splits(SHELL_ARGS):
        chunks = [role(), text("Sure."), *call(0, "shell", parts), finish()]
        out, tx, blocked = await run_until_blocked(policy(denied_tools=["shell"]), chunks)
        assert call_deltas(out) == []
        assert assembled(out).message()["content"] == "Sure."  # text before it did flow
        assert blocked.status_code == 403 and "denied_tools" in blocked.message
        assert "shell" not in blocked.message  # the rule, not the name
        assert "rm -rf" not in blocked.message
        assert decisions(tx) == [("ToolCallPolicy", "blocked", "tool shell")]


@pytest.mark.anyio
async def test_denied_call_is_blocked_before_the_next_call_gets_out() -> None:
    chunks = [*call(0, "shell", [SHELL_ARGS]), *call(1, "read_file", [READ_ARGS]), finish()]
    out, _, _ = await run_until_blocked(policy(denied_tools=["shell"]), chunks)
    assert out == []


@pytest.mark.anyio
async def test_a_call_after_allowed_ones_is_blocked_without_taking_them_back() -> None:
    chunks = [*call(0, "read_file", [READ_ARGS]), *call(1, "shell", [SHELL_ARGS]), finish()]
    out, _, _ = await run_until_blocked(policy(denied_tools=["shell"]), chunks)
    assert [d.get("index") for d in call_deltas(out)] == [0, 0]
    assert assembled(out).message()["tool_calls"][0]["function"]["name"] == "read_file"


@pytest.mark.anyio
async def test_denied_call_at_the_end_of_a_stream_without_finish_is_blocked() -> None:
    out, _, _ = await run_until_blocked(policy(denied_tools=["shell"]), call(0, "shell", ["{}"]))
    assert out == []


@pytest.mark.anyio
async def test_name_split_across_deltas_is_reassembled() -> None:
    head = event(
        {"tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"name": "sh"}}]}
    )
    tail = event({"tool_calls": [{"index": 0, "function": {"name": "ell", "arguments": "{}"}}]})
    out, _, _ = await run_until_blocked(policy(denied_tools=["shell"]), [head, tail, finish()])
    assert out == []


def tool_delta(**entry: Any) -> Chunk:
    """A chunk carrying one ``tool_calls`` delta (index 0 unless given)."""
    return event({"tool_calls": [{"index": 0, **entry}]})


@pytest.mark.anyio
async def test_a_name_repeated_in_every_delta_is_checked_alone_and_joined() -> None:
    # The OpenAI SDKs join the names ("bashbash"); a client that keeps the first or the
    # last name runs "bash". Each spelling is checked.
    chunks = [
        tool_delta(id="c", type="function", function={"name": "bash", "arguments": ""}),
        tool_delta(function={"name": "bash", "arguments": '{"a"'}),
        tool_delta(function={"name": "bash", "arguments": ": 1}"}),
        finish(),
    ]
    out, tx, _ = await run_until_blocked(policy(denied_tools=["bash"]), chunks)
    assert out == [] and decisions(tx) == [("ToolCallPolicy", "blocked", "tool bash")]
    # What the SDK would call (the names joined) is not an allowed tool either.
    repeated = [*call(0, "read_file", [READ_ARGS]), finish()]
    repeated[1] = tool_delta(function={"name": "read_file", "arguments": READ_ARGS})
    out, _, _ = await run_until_blocked(policy(allowed_tools=["read_file"]), repeated)
    assert out == []


@pytest.mark.anyio
async def test_a_name_in_pieces_is_checked_as_the_client_joins_it() -> None:
    chunks = [
        tool_delta(id="c", type="function", function={"name": "ba"}),
        tool_delta(function={"name": "sh", "arguments": "{}"}),
        finish(),
    ]
    out, _, _ = await run_until_blocked(policy(denied_tools=["bash"]), chunks)
    assert out == []


@pytest.mark.anyio
async def test_a_call_whose_function_is_null_is_checked_by_what_follows() -> None:
    chunks = [
        tool_delta(id="c", type="function", function=None),
        tool_delta(function={"name": "bash", "arguments": "{}"}),
        finish(),
    ]
    out, _, _ = await run_until_blocked(policy(denied_tools=["bash"]), chunks)
    assert out == []
    custom = [
        tool_delta(id="c", type="custom", function=None, custom={"name": "bash", "input": "x"}),
        finish(),
    ]
    out, _, _ = await run_until_blocked(policy(denied_tools=["bash"]), custom)
    assert out == []


@pytest.mark.anyio
async def test_function_and_custom_in_one_entry_are_both_checked() -> None:
    both = {"name": "read_file", "arguments": "{}"}
    chunks = [
        tool_delta(id="c", type="custom", function=both, custom={"name": "bash", "input": ""}),
        finish(),
    ]
    out, _, _ = await run_until_blocked(policy(denied_tools=["bash"]), chunks)
    assert out == []
    payload = completion(("read_file", "{}"))
    entry = payload["choices"][0]["message"]["tool_calls"][0]
    entry["function"] = None
    entry["custom"] = {"name": "bash", "input": "rm -rf /"}
    with pytest.raises(PolicyBlocked):
        await policy(denied_tools=["bash"]).apply(responded(payload))
    entry["function"] = {"name": "read_file", "arguments": "{}"}
    with pytest.raises(PolicyBlocked):
        await policy(denied_tools=["bash"]).apply(responded(payload))


@pytest.mark.anyio
async def test_legacy_function_call_name_repeated_or_in_pieces() -> None:
    for names in (["shell", "shell"], ["sh", "ell"]):
        chunks = [
            event({"role": "assistant", "function_call": {"name": names[0], "arguments": ""}}),
            event({"function_call": {"name": names[1], "arguments": "{}"}}),
            finish("function_call"),
        ]
        out, _, _ = await run_until_blocked(policy(denied_tools=["shell"]), chunks)
        assert out == []


@pytest.mark.anyio
async def test_a_new_id_under_a_used_index_is_checked_as_the_client_merges_it() -> None:
    # The SDK merges deltas by index, whatever their id: "ba" then "sh" is one call, bash.
    first = tool_delta(id="c1", type="function", function={"name": "ba", "arguments": "{}"})
    second = tool_delta(id="c2", type="function", function={"name": "sh", "arguments": ""})
    out, _, _ = await run_until_blocked(policy(denied_tools=["bash"]), [first, second, finish()])
    assert out == [first]  # released before the second began; the rest never goes out
    # A dropped call under an index that went out leaves that index taken.
    read = tool_delta(id="c1", type="function", function={"name": "read", "arguments": "{}"})
    shell = tool_delta(id="c2", type="function", function={"name": "shell", "arguments": ""})
    later = call(1, "list_dir", ["{}"])
    out, _ = await run(
        policy(denied_tools=["shell"], action="drop_call"), [read, shell, *later, finish()]
    )
    assert [d["index"] for d in call_deltas(out)] == [0, 1, 1]


@pytest.mark.anyio
async def test_allowed_tools_only_lets_those_through() -> None:
    p = policy(allowed_tools=["read_file"])
    out, _ = await run(p, [*call(0, "read_file", [READ_ARGS]), finish()])
    assert len(call_deltas(out)) == 2
    out, tx, blocked = await run_until_blocked(p, [*call(0, "write_file", ["{}"]), finish()])
    assert out == [] and "not in allowed_tools" in blocked.message
    assert decisions(tx) == [("ToolCallPolicy", "blocked", "tool write_file")]


@pytest.mark.anyio
async def test_a_secret_in_a_tool_name_stays_out_of_the_message_and_the_record() -> None:
    key = "sk-proj-" + "A1b2C3d4E5" * 5
    name = f"run_{key}"
    out, tx, blocked = await run_until_blocked(
        policy(denied_tools=[name]), [*call(0, name, ["{}"]), finish()]
    )
    assert out == [] and key not in blocked.message and "run_" not in blocked.message
    assert blocked.message == (
        "blocked by ToolCallPolicy: a tool call in the response: the tool is in denied_tools"
    )
    assert decisions(tx) == [("ToolCallPolicy", "blocked", "tool run_[REDACTED]")]
    p = policy(allowed_tools=["read_file"], action="drop_call")
    out, tx = await run(p, [*call(0, "x" * 5000, ["{}"]), finish()])
    assert decisions(tx) == [("ToolCallPolicy", "dropped", "tool " + "x" * 200 + "...")]


@pytest.mark.anyio
async def test_argument_pattern_matches_across_chunk_boundaries() -> None:
    p = policy(argument_patterns=[r"rm\s+-rf"])
    for parts in splits(SHELL_ARGS):
        out, tx, blocked = await run_until_blocked(p, [*call(0, "shell", parts), finish()])
        assert out == []
        assert "argument_patterns[0]" in blocked.message and "rm" not in blocked.message
        assert decisions(tx) == [("ToolCallPolicy", "blocked", "tool shell")]


@pytest.mark.anyio
async def test_argument_pattern_sees_through_json_escapes() -> None:
    escaped = '{"command": "\\u0072m -rf /"}'
    assert "rm" not in escaped
    out, _, _ = await run_until_blocked(
        policy(argument_patterns=[r"rm\s+-rf"]), [*call(0, "shell", [escaped]), finish()]
    )
    assert out == []


DECODED_RM = {
    "escaped value": '{"command": "\\u0072m -rf /"}',
    "escaped key": '{"\\u0072m -rf /": true}',
    "key given twice": '{"command": "\\u0072m -rf /", "command": "ls"}',
    "argument vector": '{"argv": ["rm", "-rf", "/"]}',
    "JSON inside a string": '{"payload": "{\\"c\\": \\"\\\\u0072m -rf /\\"}"}',
    "not strict JSON (NaN)": '{"command": "\\u0072m -rf /", "n": NaN}',
    "cut short": '{"command": "\\u0072m -rf /',
    "surrogate pair escape": '{"c": "\\u0072\\u006d -rf /", "e": "\\ud83d\\ude00"',
}


@pytest.mark.anyio
@pytest.mark.parametrize("arguments", DECODED_RM.values(), ids=DECODED_RM.keys())
async def test_argument_patterns_run_on_what_the_arguments_decode_to(arguments: str) -> None:
    pattern = r"rm\s+-rf\s+/"
    assert regex.search(pattern, arguments) is None  # not in the text as written
    p = policy(argument_patterns=[pattern])
    for parts in ([arguments], [arguments[:7], arguments[7:]]):
        out, _, blocked = await run_until_blocked(p, [*call(0, "tool", parts), finish()])
        assert out == [] and "argument_patterns[0]" in blocked.message
    with pytest.raises(PolicyBlocked):
        await p.apply(responded(completion(("tool", arguments))))
    with pytest.raises(PolicyBlocked):
        await p.apply(responded(response_object(("tool", arguments))))


@pytest.mark.anyio
async def test_arguments_that_are_not_strict_json_pass_when_no_pattern_matches() -> None:
    p = policy(argument_patterns=[r"rm\s+-rf"])
    for arguments in ['{"path": ', '{"n": NaN}', "ls -la /tmp", '{"a": 1, "a": 2}']:
        chunks = [*call(0, "tool", [arguments]), finish()]
        out, tx = await run(p, chunks)
        assert [c.raw for c in out] == [c.raw for c in chunks] and tx.decisions == []


def test_tool_call_arguments_are_parsed_strictly() -> None:
    assert ToolCall.of("c", "f", '{"a": NaN}').parsed_arguments is None
    assert ToolCall.of("c", "f", '{"a": 1, "a": 2}').parsed_arguments == {"a": 2}
    assert ToolCall.of("c", "f", "[" * 100_000).parsed_arguments is None


@pytest.mark.anyio
async def test_more_deltas_for_a_released_call_are_checked_again() -> None:
    # A backend revisits call 0 after call 1 began: too late to drop it, so it is blocked.
    late = event({"tool_calls": [{"index": 0, "function": {"arguments": "rm -rf /"}}]})
    chunks = [*call(0, "shell", ['{"a": 1}']), *call(1, "read_file", ["{}"]), late, finish()]
    out, tx, _ = await run_until_blocked(
        policy(argument_patterns=["rm -rf"], action="drop_call"), chunks
    )
    assert "rm -rf" not in b"".join(c.raw for c in out).decode()
    assert decisions(tx) == [("ToolCallPolicy", "blocked", "tool shell")]


@pytest.mark.anyio
async def test_legacy_function_call_is_checked() -> None:
    chunks = [
        event({"role": "assistant", "function_call": {"name": "shell", "arguments": ""}}),
        event({"function_call": {"arguments": SHELL_ARGS[:10]}}),
        event({"function_call": {"arguments": SHELL_ARGS[10:]}}),
        finish("function_call"),
    ]
    out, _, _ = await run_until_blocked(policy(denied_tools=["shell"]), chunks)
    assert out == []
    out, tx = await run(policy(denied_tools=["shell"], action="drop_call"), chunks)
    choices = [choice for c in out for choice in data_of(c)["choices"]]
    assert all("function_call" not in choice["delta"] for choice in choices)
    assert choices[0]["delta"] == {"role": "assistant"}
    assert choices[-1]["finish_reason"] == "stop"
    assert decisions(tx) == [("ToolCallPolicy", "dropped", "tool shell")]


# --- streamed: dropped calls ------------------------------------------------------------


@pytest.mark.anyio
async def test_drop_call_removes_the_first_and_renumbers_the_second() -> None:
    p = policy(denied_tools=["shell"], action="drop_call")
    for parts in splits(SHELL_ARGS)[::3]:
        chunks = [
            role(),
            *call(0, "shell", parts),
            *call(1, "read_file", ['{"path": ', '"/tmp/a"}']),
            finish(),
        ]
        out, tx = await run(p, chunks)
        assert [d["index"] for d in call_deltas(out)] == [0, 0, 0]
        client = assembled(out)
        assert client.message()["tool_calls"] == [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "read_file", "arguments": '{"path": "/tmp/a"}'},
            }
        ]
        assert client.choices[0].finish_reason == "tool_calls"
        assert "rm -rf" not in b"".join(c.raw for c in out).decode()
        assert decisions(tx) == [("ToolCallPolicy", "dropped", "tool shell")]


@pytest.mark.anyio
async def test_drop_call_of_the_only_call_finishes_with_stop() -> None:
    chunks = [role(), text("Running it."), *call(0, "shell", [SHELL_ARGS]), finish()]
    out, tx = await run(policy(denied_tools=["shell"], action="drop_call"), chunks)
    assert call_deltas(out) == []
    client = assembled(out)
    assert client.message() == {"role": "assistant", "content": "Running it."}
    assert client.choices[0].finish_reason == "stop"
    assert decisions(tx) == [("ToolCallPolicy", "dropped", "tool shell")]


@pytest.mark.anyio
async def test_drop_call_in_the_middle_keeps_indices_contiguous() -> None:
    chunks = [
        *call(0, "read_file", ['{"path": "/a"}']),
        *call(1, "shell", [SHELL_ARGS]),
        *call(2, "read_file", ['{"path": "/b"}'], call_id="call_b"),
        *call(3, "shell", [SHELL_ARGS], call_id="call_c"),
        finish(),
    ]
    out, tx = await run(policy(denied_tools=["shell"], action="drop_call"), chunks)
    assert [d["index"] for d in call_deltas(out)] == [0, 0, 1, 1]
    calls = assembled(out).message()["tool_calls"]
    assert [c["id"] for c in calls] == ["call_0", "call_b"]
    assert assembled(out).choices[0].finish_reason == "tool_calls"
    assert [d[1] for d in decisions(tx)] == ["dropped", "dropped"]


@pytest.mark.anyio
async def test_drop_call_with_all_calls_in_one_chunk() -> None:
    both = event(
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "shell", "arguments": SHELL_ARGS},
                },
                {
                    "index": 1,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": READ_ARGS},
                },
            ],
        }
    )
    out, _ = await run(policy(denied_tools=["shell"], action="drop_call"), [both, finish()])
    assert call_deltas(out)[0]["index"] == 0
    assert assembled(out).message() == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "read_file", "arguments": READ_ARGS},
            }
        ],
    }
    assert data_of(out[0])["choices"][0]["delta"] == {"role": "assistant"}  # at once


@pytest.mark.anyio
async def test_each_choice_is_held_and_finished_on_its_own() -> None:
    transform = policy(denied_tools=["shell"], action="drop_call").stream_transform(transaction())
    held = call(0, "shell", [SHELL_ARGS], choice=0)
    for c in held:
        assert await transform.on_chunk(c) == []
    other = text("choice one", index=1)
    assert await transform.on_chunk(other) == [other]
    kept = call(0, "read_file", [READ_ARGS], choice=1)
    kept_raws = [c.raw for c in kept]
    for c in kept:
        assert await transform.on_chunk(c) == []
    out = await transform.on_chunk(finish(index=0))
    assert [data_of(c)["choices"][0]["finish_reason"] for c in out] == ["stop"]
    end_one = finish(index=1)
    out = await transform.on_chunk(end_one)
    assert [c.raw for c in out] == [*kept_raws, end_one.raw]


@pytest.mark.anyio
async def test_other_choice_finish_releases_only_its_own_calls() -> None:
    transform = policy(denied_tools=["shell"]).stream_transform(transaction())
    first = call(0, "read_file", [READ_ARGS], choice=0)
    second = call(0, "read_file", ['{"path": "/b"}'], choice=1)
    for c in [*first, *second]:
        assert await transform.on_chunk(c) == []
    end_one = finish(index=1)
    assert await transform.on_chunk(end_one) == [*second, end_one]
    end_zero = finish(index=0)
    assert await transform.on_chunk(end_zero) == [*first, end_zero]


# --- custom checks ----------------------------------------------------------------------


class NoSystemPaths(ToolCallPolicy):
    """A custom check on the parsed arguments."""

    seen: list[ToolCall]

    def check(self, call: ToolCall) -> str | None:
        self.seen.append(call)
        path = call.parsed_arguments.get("path") if isinstance(call.parsed_arguments, dict) else ""
        if isinstance(path, str) and path.startswith("/etc"):
            return "system paths are off limits"
        return super().check(call)


@pytest.mark.anyio
async def test_a_subclass_checks_the_reassembled_call() -> None:
    p = NoSystemPaths(NoSystemPaths.Config(), {})
    p.seen = []
    arguments = '{"path": "/etc/shadow"}'
    out, _, blocked = await run_until_blocked(
        p, [*call(0, "read_file", [arguments[:5], arguments[5:14], arguments[14:]]), finish()]
    )
    assert out == [] and "system paths are off limits" in blocked.message
    assert p.seen == [ToolCall("call_0", "read_file", arguments, {"path": "/etc/shadow"})]


def test_tool_call_parses_json_arguments_when_it_can() -> None:
    assert ToolCall.of("c", "f", '{"a": [1]}').parsed_arguments == {"a": [1]}
    assert ToolCall.of("c", "f", '{"a": ').parsed_arguments is None
    assert ToolCall.of(None, "f", "").parsed_arguments is None


# --- buffered responses -----------------------------------------------------------------


def completion(*calls: tuple[str, str], content: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(calls)
        ]
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}
        ],
    }


def responded(payload: dict[str, Any]) -> Transaction:
    tx = transaction()
    tx.response = ProxyResponse(200, {}, orjson.dumps(payload))
    return tx


@pytest.mark.anyio
async def test_buffered_denied_call_is_blocked() -> None:
    tx = responded(completion(("read_file", READ_ARGS), ("shell", SHELL_ARGS)))
    with pytest.raises(PolicyBlocked) as caught:
        await policy(denied_tools=["shell"]).apply(tx)
    assert caught.value.status_code == 403 and caught.value.message == (
        "blocked by ToolCallPolicy: a tool call in the response: the tool is in denied_tools"
    )
    assert "rm -rf" not in caught.value.message
    assert decisions(tx) == [("ToolCallPolicy", "blocked", "tool shell")]


@pytest.mark.anyio
async def test_buffered_allowed_calls_leave_the_body_as_it_was() -> None:
    tx = responded(completion(("read_file", READ_ARGS)))
    assert tx.response is not None
    body = tx.response.body
    await policy(denied_tools=["shell"], argument_patterns=["rm"]).apply(tx)
    assert tx.response.body is body and tx.decisions == []


@pytest.mark.anyio
async def test_buffered_drop_call_keeps_the_others() -> None:
    tx = responded(completion(("shell", SHELL_ARGS), ("read_file", READ_ARGS)))
    await policy(denied_tools=["shell"], action="drop_call").apply(tx)
    assert tx.response is not None
    choice = orjson.loads(tx.response.body)["choices"][0]
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["read_file"]
    assert choice["finish_reason"] == "tool_calls"
    assert decisions(tx) == [("ToolCallPolicy", "dropped", "tool shell")]


@pytest.mark.anyio
async def test_buffered_drop_of_every_call_finishes_with_stop() -> None:
    tx = responded(completion(("shell", SHELL_ARGS), content="I will run it."))
    await policy(argument_patterns=[r"rm\s"], action="drop_call").apply(tx)
    assert tx.response is not None
    choice = orjson.loads(tx.response.body)["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "I will run it."}
    assert choice["finish_reason"] == "stop"


@pytest.mark.anyio
async def test_buffered_legacy_function_call() -> None:
    payload = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "function_call": {"name": "shell", "arguments": SHELL_ARGS},
                },
                "finish_reason": "function_call",
            }
        ]
    }
    with pytest.raises(PolicyBlocked):
        await policy(denied_tools=["shell"]).apply(responded(payload))
    tx = responded(payload)
    await policy(denied_tools=["shell"], action="drop_call").apply(tx)
    assert tx.response is not None
    choice = orjson.loads(tx.response.body)["choices"][0]
    assert "function_call" not in choice["message"] and choice["finish_reason"] == "stop"


@pytest.mark.anyio
async def test_an_error_body_is_left_alone() -> None:
    tx = transaction()
    tx.response = ProxyResponse(404, {}, b'{"error": {"message": "no such model"}}')
    body = tx.response.body
    await policy(denied_tools=["shell"]).apply(tx)
    assert tx.response.body is body


# --- the request side: the history ------------------------------------------------------


def history() -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [
            {"role": "user", "content": "clean up"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "shell", "arguments": SHELL_ARGS},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_a", "content": "done"},
            {
                "role": "assistant",
                "content": "Now reading.",
                "tool_calls": [
                    {
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "read_file", "arguments": READ_ARGS},
                    },
                    {
                        "id": "call_c",
                        "type": "function",
                        "function": {"name": "shell", "arguments": '{"command": "ls"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_b", "content": "notes"},
            {"role": "tool", "tool_call_id": "call_c", "content": "a b c"},
            {"role": "user", "content": "thanks"},
        ],
    }


@pytest.mark.anyio
async def test_request_history_with_a_denied_call_is_blocked() -> None:
    tx = transaction(history())
    with pytest.raises(PolicyBlocked) as caught:
        await policy(denied_tools=["shell"]).apply(tx)
    assert caught.value.status_code == 403 and "in the request" in caught.value.message
    assert decisions(tx) == [("ToolCallPolicy", "blocked", "tool shell")]


@pytest.mark.anyio
async def test_request_history_drop_call_removes_the_calls_and_their_results() -> None:
    tx = transaction(history())
    await policy(denied_tools=["shell"], action="drop_call").apply(tx)
    messages = orjson.loads(tx.request.body)["messages"]
    assert messages == [
        {"role": "user", "content": "clean up"},
        {
            "role": "assistant",
            "content": "Now reading.",
            "tool_calls": [
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": READ_ARGS},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_b", "content": "notes"},
        {"role": "user", "content": "thanks"},
    ]
    assert [d[1] for d in decisions(tx)] == ["dropped", "dropped"]


@pytest.mark.anyio
async def test_request_with_allowed_history_is_unchanged() -> None:
    tx = transaction(history())
    body = tx.request.body
    await policy(denied_tools=["delete_repo"]).apply(tx)
    assert tx.request.body is body and tx.decisions == []


# --- names compared after normalisation ------------------------------------------------

DISGUISED_BASH = {
    "case": "BaSH",
    "fullwidth": "\uff42\uff41\uff53\uff48",
    "Cyrillic look-alike": "b\u0430sh",
    "zero-width": "ba\u200bsh",
    "soft hyphen": "ba\u00adsh",
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", DISGUISED_BASH.values(), ids=DISGUISED_BASH.keys())
async def test_a_disguised_denied_name_is_denied_streamed_buffered_and_in_the_request(
    name: str,
) -> None:
    p = policy(denied_tools=["bash"])
    out, _, _ = await run_until_blocked(p, [*call(0, name, ['{"c": 1}']), finish()])
    assert out == []
    with pytest.raises(PolicyBlocked):
        await p.apply(responded(completion((name, "{}"))))
    with pytest.raises(PolicyBlocked):
        await p.apply(responded(response_object((name, "{}"))))
    request = history()
    request["messages"][1]["tool_calls"][0]["function"]["name"] = name
    with pytest.raises(PolicyBlocked):
        await p.apply(transaction(request))


@pytest.mark.anyio
async def test_configured_names_are_normalised_too() -> None:
    p = policy(denied_tools=["\uff22\uff21\uff33\uff28"], allowed_tools=["Read_File", "bash"])
    out, _, _ = await run_until_blocked(p, [*call(0, "bash", ["{}"]), finish()])
    assert out == []
    chunks = [*call(0, "read_fil\u0435", [READ_ARGS]), finish()]  # a Cyrillic e
    out, tx = await run(p, chunks)
    assert [c.raw for c in out] == [c.raw for c in chunks] and tx.decisions == []


# --- configuration ----------------------------------------------------------------------


def config_error(definition: dict[str, Any]) -> PolicyConfigError:
    with pytest.raises(PolicyConfigError) as caught:
        load_policy(definition)
    return caught.value


def test_config_errors_name_the_exact_path() -> None:
    bad_regex = {"type": "ToolCallPolicy", "config": {"argument_patterns": ["ok", "rm ("]}}
    error = config_error(bad_regex)
    assert error.path == "config.argument_patterns[1]"
    assert error.reason.startswith("invalid regular expression")
    nested = {
        "type": "SerialPolicy",
        "config": {"policies": [{"type": "NoopPolicy", "config": {}}, bad_regex]},
    }
    assert config_error(nested).path == "policies[1].config.argument_patterns[1]"
    assert config_error({"type": "ToolCallPolicy", "config": {"action": "drop"}}).path == (
        "config.action"
    )
    assert config_error({"type": "ToolCallPolicy", "config": {"allowed_tools": "shell"}}).path == (
        "config.allowed_tools"
    )
    assert config_error({"type": "ToolCallPolicy", "config": {"denied_tools": [1]}}).path == (
        "config.denied_tools[0]"
    )
    assert config_error({"type": "ToolCallPolicy", "config": {"denied": ["x"]}}).path == (
        "config.denied"
    )


def test_definition_round_trips_and_defaults() -> None:
    definition = {
        "type": "ToolCallPolicy",
        "config": {
            "denied_tools": ["shell"],
            "argument_patterns": [r"rm\s"],
            "action": "drop_call",
        },
    }
    loaded = load_policy(definition)
    assert isinstance(loaded, ToolCallPolicy) and loaded.serialize() == definition
    default = load_policy({"type": "ToolCallPolicy", "config": {}})
    assert isinstance(default, ToolCallPolicy)
    assert default.action == "block" and default.allowed is None and default.denied == frozenset()


# --- the Responses API ------------------------------------------------------------------
# Streams are the mock backend's own events for scripted calls, split every way.


def responses_events(
    *calls: tuple[str, str], content: str | None = None, chunk_size: int = 8
) -> list[Chunk]:
    scenario = Scenario(
        content=content,
        chunk_size=chunk_size,
        tool_calls=tuple(MockCall(name, arguments) for name, arguments in calls),
    )
    reply = mock_responses.reply_for(scenario, "hi")
    return [Chunk(raw) for raw in mock_responses.response_stream(reply, "m", 1)]


def responses_transaction() -> Transaction:
    return Transaction(request=ProxyRequest("POST", "/responses", b"", {}, b"{}"), services=None)


def event_data(c: Chunk) -> dict[str, Any]:
    """The event's JSON as it goes on the wire."""
    data: dict[str, Any] = orjson.loads(Chunk(c.raw).payload)
    return data


class ClientView:
    """What a client builds from Responses events, keyed by output_index as the SDK does."""

    def __init__(self, chunks: list[Chunk]) -> None:
        self.events = [event_data(c) for c in chunks]
        self.items: dict[int, dict[str, Any]] = {}
        self.text = ""
        for data in self.events:
            kind = data["type"]
            if kind == "response.output_item.added":
                assert data["output_index"] not in self.items
                self.items[data["output_index"]] = dict(data["item"])
            elif kind == "response.function_call_arguments.delta":
                self.items[data["output_index"]]["arguments"] += data["delta"]
            elif kind == "response.output_text.delta":
                self.text += data["delta"]

    @property
    def calls(self) -> list[tuple[str, str]]:
        return [
            (item["name"], item["arguments"])
            for _, item in sorted(self.items.items())
            if item["type"] == "function_call"
        ]

    @property
    def completed(self) -> list[dict[str, Any]]:
        last = self.events[-1]
        assert last["type"] == "response.completed"
        output: list[dict[str, Any]] = last["response"]["output"]
        return output


def argument_sizes(arguments: str) -> range:
    return range(1, len(arguments) + 1)


@pytest.mark.anyio
async def test_responses_allowed_call_comes_out_byte_for_byte_for_every_split() -> None:
    for size in argument_sizes(READ_ARGS):
        chunks = responses_events(("read_file", READ_ARGS), content="Reading.", chunk_size=size)
        raws = [c.raw for c in chunks]
        out, tx = await run(policy(denied_tools=["shell"], argument_patterns=["rm"]), chunks)
        assert [c.raw for c in out] == raws
        assert tx.decisions == []


@pytest.mark.anyio
async def test_responses_call_is_held_until_its_item_is_done() -> None:
    chunks = responses_events(("read_file", READ_ARGS), content="Hi.", chunk_size=5)
    kinds = [event_data(c)["type"] for c in chunks]
    start = kinds.index("response.output_item.added", kinds.index("response.output_item.done"))
    transform = policy(denied_tools=["shell"]).stream_transform(responses_transaction())
    for c in chunks[:start]:  # the message item flows at once
        assert await transform.on_chunk(c) == [c]
    done = kinds.index("response.output_item.done", start)
    for c in chunks[start:done]:
        assert await transform.on_chunk(c) == []
    assert await transform.on_chunk(chunks[done]) == chunks[start : done + 1]
    assert await transform.on_chunk(chunks[-1]) == [chunks[-1]]
    assert await transform.on_end() == []


@pytest.mark.anyio
async def test_responses_text_of_another_item_flows_while_a_call_is_held() -> None:
    def named(kind: str, **fields: Any) -> Chunk:
        data = {"type": kind, **fields}
        return Chunk(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")

    call_item = {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "read_file"}
    added = named(
        "response.output_item.added",
        output_index=1,
        item={**call_item, "arguments": "", "status": "in_progress"},
    )
    first = named(
        "response.function_call_arguments.delta", item_id="fc_1", output_index=1, delta="{}"
    )
    text_delta = named(
        "response.output_text.delta", item_id="msg_1", output_index=0, content_index=0, delta="x"
    )
    done = named(
        "response.output_item.done",
        output_index=1,
        item={**call_item, "arguments": "{}", "status": "completed"},
    )
    transform = policy(denied_tools=["shell"]).stream_transform(responses_transaction())
    assert await transform.on_chunk(added) == []
    assert await transform.on_chunk(first) == []
    assert await transform.on_chunk(text_delta) == [text_delta]
    assert await transform.on_chunk(done) == [added, first, done]


@pytest.mark.anyio
async def test_responses_denied_call_never_gets_out_whatever_the_split() -> None:
    for size in argument_sizes(SHELL_ARGS):
        chunks = responses_events(("shell", SHELL_ARGS), content="Sure.", chunk_size=size)
        tx = responses_transaction()
        transform = policy(argument_patterns=[r"rm\s+-rf"]).stream_transform(tx)
        out: list[Chunk] = []
        with pytest.raises(PolicyBlocked) as caught:
            for c in chunks:
                out.extend(await transform.on_chunk(c))
        wire = b"".join(c.raw for c in out)
        assert b"rm" not in wire and b"fc_mock_0" not in wire and b"shell" not in wire
        assert ClientView(out).text == "Sure."  # the text before it did flow
        assert "argument_patterns[0]" in caught.value.message and "rm" not in caught.value.message
        assert decisions(tx) == [("ToolCallPolicy", "blocked", "tool shell")]


@pytest.mark.anyio
async def test_responses_drop_call_renumbers_what_follows() -> None:
    for size in (1, 4, 100):
        chunks = responses_events(
            ("shell", SHELL_ARGS), ("read_file", READ_ARGS), content="Ok.", chunk_size=size
        )
        tx = responses_transaction()
        out, _ = await run(policy(denied_tools=["shell"], action="drop_call"), chunks, tx)
        client = ClientView(out)
        assert client.calls == [("read_file", READ_ARGS)]
        assert sorted(client.items) == [0, 1]  # no gap where the dropped item was
        numbers = [data["sequence_number"] for data in client.events]
        assert numbers == list(range(len(out)))
        assert [item["type"] for item in client.completed] == ["message", "function_call"]
        assert client.completed[1]["id"] == "fc_mock_1"
        assert b"rm -rf" not in b"".join(c.raw for c in out)
        assert decisions(tx) == [("ToolCallPolicy", "dropped", "tool shell")]


@pytest.mark.anyio
async def test_responses_drop_of_the_last_call_leaves_the_rest_unchanged() -> None:
    chunks = responses_events(("read_file", READ_ARGS), ("shell", SHELL_ARGS), content="Ok.")
    raws = [c.raw for c in chunks]
    out, _ = await run(policy(denied_tools=["shell"], action="drop_call"), chunks)
    shell = [
        position
        for position, c in enumerate(chunks)
        if event_data(c).get("item", {}).get("name") == "shell"
    ]
    assert [c.raw for c in out[:-1]] == raws[: shell[0]]  # all before the shell item, as is
    client = ClientView(out)
    assert client.calls == [("read_file", READ_ARGS)]
    assert [item.get("name") for item in client.completed] == [None, "read_file"]
    assert client.events[-1]["sequence_number"] == len(out) - 1


@pytest.mark.anyio
async def test_responses_completed_output_contradicting_the_stream_is_blocked() -> None:
    chunks = responses_events(("read_file", READ_ARGS))
    last = event_data(chunks[-1])
    last["response"]["output"][0]["arguments"] = SHELL_ARGS
    chunks[-1] = Chunk.from_data(last, event="response.completed")
    tx = responses_transaction()
    transform = policy(argument_patterns=["rm -rf"], action="drop_call").stream_transform(tx)
    for c in chunks[:-1]:
        await transform.on_chunk(c)
    with pytest.raises(PolicyBlocked):
        await transform.on_chunk(chunks[-1])  # released already: too late to drop
    assert chunks[-1].data["response"]["output"] == []  # nor in the failure event
    assert decisions(tx) == [("ToolCallPolicy", "blocked", "tool read_file")]


@pytest.mark.anyio
async def test_responses_done_arguments_contradicting_the_deltas_are_checked() -> None:
    chunks = responses_events(("read_file", READ_ARGS), chunk_size=4)
    for position, c in enumerate(chunks):
        data = event_data(c)
        if data["type"] == "response.function_call_arguments.done":
            data["arguments"] = SHELL_ARGS
            chunks[position] = Chunk.from_data(data, event=data["type"])
    out, _, _ = await run_until_blocked(policy(argument_patterns=["rm -rf"]), chunks)
    assert "function_call" not in b"".join(c.raw for c in out).decode()


@pytest.mark.anyio
async def test_responses_argument_events_without_their_item_are_held_too() -> None:
    orphan = Chunk.from_data(
        {
            "type": "response.function_call_arguments.delta",
            "item_id": "fc_x",
            "output_index": 3,
            "delta": SHELL_ARGS,
        },
        event="response.function_call_arguments.delta",
    )
    out, _, _ = await run_until_blocked(policy(argument_patterns=["rm -rf"]), [orphan])
    assert out == []


# --- the Responses API: buffered and requests -------------------------------------------


def response_object(*calls: tuple[str, str], content: str | None = None) -> dict[str, Any]:
    scenario = Scenario(
        content=content, tool_calls=tuple(MockCall(name, args) for name, args in calls)
    )
    return mock_responses.response_json(mock_responses.reply_for(scenario, "hi"), "m", 1)


@pytest.mark.anyio
async def test_responses_buffered_denied_call_is_blocked() -> None:
    tx = responded(response_object(("read_file", READ_ARGS), ("shell", SHELL_ARGS)))
    with pytest.raises(PolicyBlocked) as caught:
        await policy(denied_tools=["shell"]).apply(tx)
    assert caught.value.status_code == 403 and "rm -rf" not in caught.value.message
    assert decisions(tx) == [("ToolCallPolicy", "blocked", "tool shell")]


@pytest.mark.anyio
async def test_responses_buffered_drop_call_and_allowed_calls() -> None:
    tx = responded(response_object(("shell", SHELL_ARGS), ("read_file", READ_ARGS), content="x"))
    await policy(denied_tools=["shell"], action="drop_call").apply(tx)
    assert tx.response is not None
    output = orjson.loads(tx.response.body)["output"]
    assert [(item["type"], item.get("name")) for item in output] == [
        ("message", None),
        ("function_call", "read_file"),
    ]
    assert decisions(tx) == [("ToolCallPolicy", "dropped", "tool shell")]
    tx = responded(response_object(("read_file", READ_ARGS)))
    assert tx.response is not None
    body = tx.response.body
    await policy(denied_tools=["shell"]).apply(tx)
    assert tx.response.body is body and tx.decisions == []


def responses_input() -> dict[str, Any]:
    return {
        "model": "m",
        "input": [
            {"role": "user", "content": "clean up"},
            {
                "type": "function_call",
                "call_id": "call_a",
                "name": "shell",
                "arguments": SHELL_ARGS,
            },
            {"type": "function_call_output", "call_id": "call_a", "output": "done"},
            {"type": "function_call", "call_id": "call_b", "name": "read_file", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_b", "output": "notes"},
            {"role": "user", "content": "thanks"},
        ],
    }


@pytest.mark.anyio
async def test_responses_input_with_a_denied_call_is_blocked_or_cleaned() -> None:
    tx = transaction(responses_input())
    with pytest.raises(PolicyBlocked) as caught:
        await policy(denied_tools=["shell"]).apply(tx)
    assert "in the request" in caught.value.message
    tx = transaction(responses_input())
    await policy(denied_tools=["shell"], action="drop_call").apply(tx)
    items = orjson.loads(tx.request.body)["input"]
    assert [item.get("call_id") for item in items] == [None, "call_b", "call_b", None]
    assert decisions(tx) == [("ToolCallPolicy", "dropped", "tool shell")]
    tx = transaction(responses_input())
    body = tx.request.body
    await policy(denied_tools=["delete_repo"]).apply(tx)
    assert tx.request.body is body


@pytest.mark.anyio
async def test_responses_custom_tool_call_is_held_and_checked() -> None:
    item = {"type": "custom_tool_call", "id": "ctc_1", "call_id": "c1", "name": "shell"}
    where = {"item_id": "ctc_1", "output_index": 0}
    chunks = [
        Chunk.from_data(
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "input": ""},
            },
            event="response.output_item.added",
        ),
        *(
            Chunk.from_data(
                {"type": "response.custom_tool_call_input.delta", "delta": part, **where},
                event="response.custom_tool_call_input.delta",
            )
            for part in ("rm -", "rf /")
        ),
        Chunk.from_data(
            {
                "type": "response.output_item.done",
                "output_index": 0,
                "item": {**item, "input": "rm -rf /"},
            },
            event="response.output_item.done",
        ),
    ]
    out, tx, blocked = await run_until_blocked(policy(argument_patterns=[r"rm\s+-rf"]), chunks)
    assert decisions(tx) == [("ToolCallPolicy", "blocked", "tool shell")]
    assert out == [] and "argument_patterns[0]" in blocked.message
    out, _ = await run(policy(argument_patterns=["ls"]), chunks)
    assert out == chunks
