"""Directive parsing and the split of replies into deltas, without HTTP."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from luthien_control.mock_backend.content import (
    Reply,
    chat_prompt_tokens,
    embedding_vector,
    split_arguments,
    split_content,
)
from luthien_control.mock_backend.scenario import (
    DEFAULT_SCENARIO,
    DirectiveError,
    Failure,
    Scenario,
    ToolCall,
    parse_scenario,
)


def test_no_directives_give_the_default_scenario() -> None:
    assert parse_scenario({"content-type": "application/json"}) is DEFAULT_SCENARIO


def test_directives_are_parsed() -> None:
    scenario = parse_scenario(
        {
            "x-mock-content": quote("Grüß dich, 世界"),
            "x-mock-words": "3",
            "x-mock-chunk-size": "4",
            "x-mock-chunks": "2",
            "x-mock-delay-ms": "12.5",
            "x-mock-first-byte-delay-ms": "250",
            "x-mock-tool-calls": quote(
                '[{"name": "f", "arguments": {"a": [1, 2]}}, {"name": "g"}]'
            ),
            "x-mock-fail": "drop:3",
            "x-mock-retry-after": "30",
            "x-mock-request-id": "req-1",
        }
    )
    assert scenario == Scenario(
        request_id="req-1",
        content="Grüß dich, 世界",
        words=3,
        chunk_size=4,
        chunks=2,
        delay=0.0125,
        first_byte_delay=0.25,
        tool_calls=(ToolCall("f", '{"a":[1,2]}'), ToolCall("g", "{}")),
        failure=Failure("drop", 3),
        retry_after="30",
    )


def test_string_tool_arguments_are_used_as_is() -> None:
    scenario = parse_scenario(
        {"x-mock-tool-calls": '[{"name": "f", "arguments": "{ \\"x\\": 1 }"}]'}
    )
    assert scenario.tool_calls == (ToolCall("f", '{ "x": 1 }'),)


@pytest.mark.parametrize(
    ("value", "failure"),
    [
        ("status:500", Failure("status", 500)),
        ("status:429", Failure("status", 429)),
        ("garbage:0", Failure("garbage", 0)),
        ("hang", Failure("hang")),
    ],
)
def test_failures(value: str, failure: Failure) -> None:
    assert parse_scenario({"x-mock-fail": value}).failure == failure


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-mock-words", "many"),
        ("x-mock-chunk-size", "0"),
        ("x-mock-chunks", "-1"),
        ("x-mock-delay-ms", "soon"),
        ("x-mock-delay-ms", "-5"),
        ("x-mock-first-byte-delay-ms", "nan"),
        ("x-mock-tool-calls", "{not json"),
        ("x-mock-tool-calls", '{"name": "f"}'),
        ("x-mock-tool-calls", '[{"arguments": {}}]'),
        ("x-mock-fail", "explode"),
        ("x-mock-fail", "status:200"),
        ("x-mock-fail", "drop:x"),
        ("x-mock-retry-after", "later"),
    ],
)
def test_bad_directives_are_rejected_naming_the_header(header: str, value: str) -> None:
    with pytest.raises(DirectiveError, match=header):
        parse_scenario({header: value})


def test_default_split_is_one_word_per_delta_with_its_leading_space() -> None:
    assert split_content("Hello from  the mock ") == ["Hello", " from", "  the", " mock "]
    assert split_content(" ") == [" "]
    assert split_content("") == []


def test_split_by_chunk_size() -> None:
    assert split_content("abcdefghij", chunk_size=4) == ["abcd", "efgh", "ij"]


def test_split_into_exactly_n_nearly_equal_chunks() -> None:
    assert split_content("abcdefghij", chunks=3) == ["abcd", "efg", "hij"]
    assert split_content("ab", chunks=3) == ["a", "b", ""]


def test_split_arguments() -> None:
    assert split_arguments('{"city":"Paris"}', 8) == ['{"city":', '"Paris"}']


def test_reply_counts_deltas_and_argument_fragments() -> None:
    scenario = Scenario(content="one two", tool_calls=(ToolCall("f", "x" * 17),))
    reply = Reply.for_chat(scenario, [])
    assert reply.deltas == ["one", " two"]
    assert reply.fragments == [["x" * 8, "x" * 8, "x"]]
    assert reply.completion_tokens == 5
    assert reply.finish_reason == "tool_calls"


def test_tool_calls_alone_have_no_content() -> None:
    reply = Reply.for_chat(Scenario(tool_calls=(ToolCall("f", "{}"),)), [])
    assert reply.content is None
    assert reply.deltas == []


def test_default_reply_echoes_the_last_user_message() -> None:
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ignored"},
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url"}]},
    ]
    reply = Reply.for_chat(DEFAULT_SCENARIO, messages)
    assert reply.content == "Hello from the Luthien mock backend! You said: look"
    assert chat_prompt_tokens(messages) == 3


def test_embedding_vectors_are_deterministic() -> None:
    vector = embedding_vector("hello")
    assert vector == embedding_vector("hello")
    assert vector != embedding_vector("hello!")
    assert len(vector) == 8
    assert all(-1.0 <= value < 1.0 for value in vector)
