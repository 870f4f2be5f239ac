"""LeakedApiKeyDetection: secrets never reach the other side, however a stream splits them."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from luthien_control.exceptions import PolicyBlocked
from luthien_control.policies.secrets import (
    DEFAULT_PATTERNS,
    REDACTED,
    LeakedApiKeyDetection,
    default_secrets,
    field_forms,
)
from luthien_control.sse import Chunk
from luthien_control.transaction import ProxyRequest, ProxyResponse, Transaction
from tests.policies.conftest import chunk, through

OPENAI_KEY = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6"
SECRETS = {
    "openai_api_key": OPENAI_KEY,
    "anthropic_api_key": "sk-ant-api03-" + "x" * 40,
    "aws_access_key_id": "AKIA" + "ABCDEFGHIJKLMNOP",
    "github_token": "ghp_" + "a" * 36,
    "slack_token": "xoxb-" + "1234567890-abcdef",
    "google_api_key": "AIza" + "B" * 35,
    "private_key": (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----"
    ),
    "pgp_private_key": (
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: GnuPG v2\n\n"
        "lQOYBF1234abcdEFGH+/==\n=ab12\n-----END PGP PRIVATE KEY BLOCK-----"
    ),
    "slack_app_token": "xapp-1-A0123BC45DE-1234567890123-" + "a1b2c3d4e5",
    "gitlab_token": "glpat-" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn",
}


def policy(**config: Any) -> LeakedApiKeyDetection:
    return LeakedApiKeyDetection(LeakedApiKeyDetection.Config(**config), config)


def transaction(payload: Any) -> Transaction:
    body = orjson.dumps(payload)
    return Transaction(
        request=ProxyRequest("POST", "/chat/completions", b"", {}, body), services=None
    )


async def run_stream(
    p: LeakedApiKeyDetection, chunks: list[Chunk]
) -> tuple[list[Chunk], Transaction]:
    tx = transaction({})
    return await through(p.stream_transform(tx), chunks), tx


def text_of(chunks: list[Chunk]) -> str:
    return "".join(
        (choice.get("delta") or {}).get("content") or ""
        for c in chunks
        for choice in orjson.loads(c.raw[6:-2])["choices"]
    )


def test_default_patterns_cover_the_named_providers() -> None:
    assert set(SECRETS) == set(DEFAULT_PATTERNS)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", sorted(SECRETS))
async def test_request_with_a_secret_is_blocked(kind: str) -> None:
    tx = transaction(
        {"model": "m", "messages": [{"role": "user", "content": f"my key: {SECRETS[kind]}"}]}
    )
    with pytest.raises(PolicyBlocked) as caught:
        await policy().apply(tx)
    assert caught.value.status_code == 403
    assert SECRETS[kind] not in caught.value.message
    assert kind in caught.value.message
    assert [(d.action, d.detail) for d in tx.decisions] == [("blocked", f"{kind} in the request")]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "payload",
    [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": OPENAI_KEY}]}]},
        {
            "messages": [
                {"role": "system", "content": "x", "name": "n"},
                {"role": "user", "content": OPENAI_KEY},
            ]
        },
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"k": "' + OPENAI_KEY + '"}'},
                        }
                    ],
                }
            ]
        },
        {"messages": [{"role": "tool", "tool_call_id": "c", "content": OPENAI_KEY}]},
    ],
    ids=["content-parts", "second-message", "tool-call-arguments", "tool-result"],
)
async def test_every_message_form_is_scanned(payload: dict[str, Any]) -> None:
    with pytest.raises(PolicyBlocked):
        await policy().apply(transaction({"model": "m", **payload}))


@pytest.mark.anyio
async def test_clean_request_passes_unchanged() -> None:
    tx = transaction({"model": "m", "messages": [{"role": "user", "content": "sk-short is fine"}]})
    body = tx.request.body
    await policy().apply(tx)
    assert tx.request.body == body and tx.decisions == []


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["block", "redact"])
async def test_a_key_spelled_with_json_escapes_is_still_found(action: str) -> None:
    # No literal ("sk-") in the body's bytes: only the \u escapes spell it.
    escaped = "\\u0073\\u006b-" + OPENAI_KEY.removeprefix("sk-")
    body = '{"model": "m", "messages": [{"role": "user", "content": "key ' + escaped + '"}]}'
    tx = Transaction(
        request=ProxyRequest("POST", "/chat/completions", b"", {}, body.encode()), services=None
    )
    assert b"sk-" not in tx.request.body
    if action == "block":
        with pytest.raises(PolicyBlocked):
            await policy().apply(tx)
    else:
        await policy(action="redact").apply(tx)
        assert orjson.loads(tx.request.body)["messages"][0]["content"] == "key [REDACTED]"


@pytest.mark.anyio
async def test_redact_on_the_request_side() -> None:
    tx = transaction({"model": "m", "messages": [{"role": "user", "content": f"a {OPENAI_KEY} b"}]})
    await policy(action="redact").apply(tx)
    assert orjson.loads(tx.request.body)["messages"][0]["content"] == "a [REDACTED] b"


@pytest.mark.anyio
async def test_buffered_response_is_blocked_or_redacted() -> None:
    answer = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": f"here: {OPENAI_KEY}"}}
        ]
    }
    tx = transaction({})
    tx.response = ProxyResponse(200, {}, orjson.dumps(answer))
    with pytest.raises(PolicyBlocked):
        await policy().apply(tx)
    tx.response = ProxyResponse(200, {}, orjson.dumps(answer))
    await policy(action="redact").apply(tx)
    assert orjson.loads(tx.response.body)["choices"][0]["message"]["content"] == "here: [REDACTED]"


def splits(text: str, pieces: int) -> list[list[str]]:
    """Every way to cut ``text`` into ``pieces`` parts."""
    if pieces == 2:
        return [[text[:i], text[i:]] for i in range(1, len(text))]
    return [
        [text[:i], text[i:j], text[j:]]
        for i in range(1, len(text) - 1)
        for j in range(i + 1, len(text))
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", sorted(SECRETS))
async def test_streamed_secret_split_anywhere_never_reaches_the_client(kind: str) -> None:
    secret = SECRETS[kind]
    text = f"Sure. {secret} done"
    for parts in splits(text, 2):
        out, tx = await run_stream(
            policy(action="redact"),
            [chunk("", role="assistant"), *map(chunk, parts), chunk(finish="stop")],
        )
        joined = b"".join(c.raw for c in out)
        assert secret.encode() not in joined.replace(b"\\n", b"\n")
        assert text_of(out) == "Sure. [REDACTED] done"
        assert [d.action for d in tx.decisions] == ["redacted"]


@pytest.mark.anyio
async def test_streamed_secret_in_three_pieces_is_blocked() -> None:
    text = f"key {OPENAI_KEY}!"
    for parts in splits(text, 3)[::7]:
        p = policy()
        tx = transaction({})
        transform = p.stream_transform(tx)
        released = ""
        with pytest.raises(PolicyBlocked):
            for part in parts:
                released += text_of(await transform.on_chunk(chunk(part)))
            await transform.on_end()
        assert OPENAI_KEY[:20] not in released


@pytest.mark.anyio
async def test_hold_back_is_only_what_a_secret_could_still_need() -> None:
    transform = policy().stream_transform(transaction({}))
    out = await transform.on_chunk(chunk("Hello there, this is plain text s"))
    assert text_of(out) == "Hello there, this is plain text "  # only the "s" is held
    out = await transform.on_chunk(chunk("o it goes"))
    assert text_of(out) == "so it goes"  # "goes" ends in "s", but no key starts mid-word
    assert await transform.on_end() == []


@pytest.mark.anyio
async def test_words_that_end_like_a_key_begins_pass_untouched() -> None:
    transform = policy().stream_transform(transaction({}))
    for word in ["Thanks", " for", " the", " ASIA", " trip", " Chinese", " tax"]:
        original = chunk(word)
        raw = original.raw
        out = await transform.on_chunk(original)
        if word == " ASIA":  # "ASIA" could begin an AWS key: held until the next word
            assert text_of(out) == " "
        elif word == " trip":
            assert text_of(out) == "ASIA trip"
        else:
            assert [c.raw for c in out] == [raw]  # forwarded as the same bytes
    assert await transform.on_end() == []


@pytest.mark.parametrize(
    ("text", "quiet"),
    [
        ("plain words and digits 42", True),
        ("", True),
        ("the key sk-", False),  # holds a literal
        ("then s", False),  # ends in what could begin "sk-"
        ("ends in gh", False),
        ("a rule -", False),  # could begin "-----BEGIN "
        ("Thanks", False),  # the slow path decides: no key starts mid-word
    ],
)
def test_only_text_that_cannot_hold_or_begin_a_secret_is_quiet(text: str, quiet: bool) -> None:
    assert policy().secrets.is_quiet(text) is quiet
    # No literal start in the pattern: every text goes through the regex.
    assert policy(patterns=["[a-z]+-token-[0-9]+"]).secrets.is_quiet(text) is False


@pytest.mark.anyio
async def test_unchanged_chunks_are_forwarded_as_the_same_bytes() -> None:
    original = chunk("nothing secret here.")
    raw = original.raw
    out, _ = await run_stream(policy(), [original])
    assert [c.raw for c in out] == [raw]


@pytest.mark.anyio
async def test_held_text_is_released_with_the_finish_chunk() -> None:
    out, _ = await run_stream(policy(), [chunk("ends with sk-"), chunk(finish="stop")])
    assert text_of(out) == "ends with sk-"
    assert orjson.loads(out[-1].raw[6:-2])["choices"][0]["finish_reason"] == "stop"


@pytest.mark.anyio
async def test_secret_split_across_tool_call_argument_deltas_is_redacted() -> None:
    args = '{"token": "' + OPENAI_KEY + '"}'
    first = chunk(
        tool_calls=[
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": ""},
            }
        ]
    )
    pieces = [args[i : i + 7] for i in range(0, len(args), 7)]
    deltas = [chunk(tool_calls=[{"index": 0, "function": {"arguments": p}}]) for p in pieces]
    out, _ = await run_stream(policy(action="redact"), [first, *deltas, chunk(finish="tool_calls")])
    arguments = "".join(
        call["function"].get("arguments") or ""
        for c in out
        for choice in orjson.loads(c.raw[6:-2])["choices"]
        for call in (choice["delta"].get("tool_calls") or [])
    )
    assert arguments == '{"token": "[REDACTED]"}'


@pytest.mark.anyio
async def test_custom_patterns_replace_the_defaults() -> None:
    p = policy(patterns=[r"secret-\d{4}"])
    with pytest.raises(PolicyBlocked):
        await p.apply(transaction({"messages": [{"role": "user", "content": "secret-1234"}]}))
    await p.apply(transaction({"messages": [{"role": "user", "content": OPENAI_KEY}]}))


@pytest.mark.anyio
@pytest.mark.parametrize("prefix", ["%20", "key=", "(", "1", "\n"])
async def test_a_key_after_a_digit_or_symbol_is_still_found(prefix: str) -> None:
    tx = transaction({"model": "m", "messages": [{"role": "user", "content": prefix + OPENAI_KEY}]})
    with pytest.raises(PolicyBlocked):
        await policy().apply(tx)


@pytest.mark.anyio
@pytest.mark.parametrize("before", ["url=%0A", "json \\n", "a %2F"])
async def test_a_key_after_an_escape_is_held_and_redacted_when_streamed(before: str) -> None:
    text = before + OPENAI_KEY + " end"
    for parts in splits(text, 2):
        out, _ = await run_stream(
            policy(action="redact"), [*map(chunk, parts), chunk(finish="stop")]
        )
        assert text_of(out) == before + "[REDACTED] end"


class CountingSecrets:
    """The policy's patterns, counting the characters each scan is given."""

    def __init__(self, secrets: Any) -> None:
        self._secrets = secrets
        self.scanned = 0
        self.literals = secrets.literals
        self.regex = self

    def may_contain(self, text: str) -> bool:
        self.scanned += len(text)
        result: bool = self._secrets.may_contain(text)
        return result

    def finditer(self, text: str, pos: int = 0, **kwargs: Any) -> Any:
        self.scanned += len(text) - pos
        return self._secrets.regex.finditer(text, pos, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._secrets, name)


@pytest.mark.anyio
@pytest.mark.parametrize("with_literal", [False, True], ids=["clean", "prefix-every-chunk"])
async def test_the_scan_never_goes_over_text_it_already_scanned(with_literal: bool) -> None:
    """Issue 4: the scan's cost follows the new text only, a long answer costs no more per
    chunk than a short one (counted in characters given to the scan, not timed)."""
    per_chunk: list[float] = []
    for count in (64, 4096):  # 1 KB and 64 KB of 16-character deltas
        p = policy()
        counter = CountingSecrets(p.secrets)
        p.secrets = counter  # type: ignore[assignment]
        # Every fifth delta ends in "s", which could begin "sk-": held back, then released.
        deltas = [f"w{n:014d}" + ("s" if n % 5 == 0 else " ") for n in range(count)]
        if with_literal:  # "sk-" in every chunk: the regex itself runs each time
            deltas = [
                f"sk-{n % 1000:03d} too short" + ("s" if n % 5 == 0 else " ") for n in range(count)
            ]
        out, _ = await run_stream(p, [chunk(d) for d in deltas])
        assert text_of(out) == "".join(deltas)
        per_chunk.append(counter.scanned / count)
    # Each scan is given the new delta, at most a held tail and three characters of
    # context; a chunk with a literal in it is scanned twice (the literal prefilter,
    # then the regex).
    longest = max(len(d) for d in deltas) + len("-----BEGIN ") + 3
    assert all(value <= 2 * longest for value in per_chunk), per_chunk
    assert per_chunk[1] <= per_chunk[0] * 1.01, per_chunk


def request_tx(
    payload: Any = None,
    *,
    path: str = "/chat/completions",
    query: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Transaction:
    body = orjson.dumps(payload if payload is not None else {"model": "m", "messages": []})
    return Transaction(
        request=ProxyRequest("POST", path, query, headers or {}, body), services=None
    )


async def redacted_stream_text(text: str, parts: list[str]) -> tuple[str, Transaction]:
    out, tx = await run_stream(policy(action="redact"), [*map(chunk, parts), chunk(finish="stop")])
    return text_of(out), tx


# Keys whose prefix is distinctive, glued to the word before them; the literal each
# begins with (what may already be out when a stream cuts it right after the word).
GLUED = {
    "openai_api_key": ("mykey", OPENAI_KEY, "sk-proj-"),
    "anthropic_api_key": ("token", "sk-ant-api03-" + "x" * 40, "sk-ant-"),
    "aws_access_key_id": ("x", "AKIA" + "ABCDEFGHIJKLMNOP", "AKIA"),
    "github_token": ("token", "ghp_" + "a" * 36, "ghp_"),
    "slack_token": ("slack", "xoxb-" + "1234567890-abcdef", "xoxb-"),
    "slack_app_token": ("app", SECRETS["slack_app_token"], "xapp-"),
    "google_api_key": ("key", "AIza" + "B" * 35, "AIza"),
    "gitlab_token": ("mykey", SECRETS["gitlab_token"], "glpat-"),
}


@pytest.mark.anyio
@pytest.mark.parametrize("kind", sorted(GLUED))
async def test_a_key_glued_to_a_word_is_found_when_its_prefix_is_distinctive(kind: str) -> None:
    word, secret, _ = GLUED[kind]
    tx = request_tx({"model": "m", "messages": [{"role": "user", "content": word + secret}]})
    with pytest.raises(PolicyBlocked):
        await policy().apply(tx)
    assert [d.detail for d in tx.decisions] == [f"{kind} in the request"]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", sorted(GLUED))
async def test_a_glued_key_split_anywhere_in_a_stream_never_reaches_the_client(kind: str) -> None:
    word, secret, literal = GLUED[kind]
    text = f"Here {word}{secret} done"
    for parts in splits(text, 2):
        out, tx = await redacted_stream_text(text, parts)
        # The word, at most the start of the key's public prefix, then the redaction.
        head, _, rest = out.partition("[REDACTED]")
        assert rest == " done", (parts, out)
        assert head.startswith(f"Here {word}") and literal.startswith(head[len(f"Here {word}") :])
        assert secret[len(literal) :] not in out
        assert [d.action for d in tx.decisions] == ["redacted"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "text",
    [
        "task-list-for-the-quarterly-report-and-more",  # bare "sk-": generic, after a letter
        "ask-ant-colony-simulation-parameters-xyz",  # "sk-ant-" without a version number
        "xoxo-kisses-from-grandma-and-grandpa",  # "xoxo-" is not a Slack token
        "Thanks, ASIA trip, the thing, a box",
    ],
)
async def test_generic_prefixes_keep_their_word_boundary(text: str) -> None:
    tx = request_tx({"model": "m", "messages": [{"role": "user", "content": text}]})
    await policy().apply(tx)
    assert tx.decisions == []
    out, _ = await run_stream(policy(action="redact"), [chunk(text), chunk(finish="stop")])
    assert text_of(out) == text


LEGACY_KEY = "sk-" + "T3BlbkFJ" * 6  # no distinctive prefix: found after a non-letter only


@pytest.mark.anyio
@pytest.mark.parametrize(
    "before",
    ["\x1b[31m", "\x1b[1;32m", "\x1b[0m", "\x07", "\x00", "\x0b"],
    ids=["ansi-red", "ansi-bold-green", "ansi-reset", "bell", "nul", "vertical-tab"],
)
@pytest.mark.parametrize("secret", [OPENAI_KEY, LEGACY_KEY], ids=["sk-proj", "legacy"])
async def test_a_key_after_a_control_character_or_an_ansi_code_is_found(
    before: str, secret: str
) -> None:
    tx = request_tx({"model": "m", "messages": [{"role": "user", "content": before + secret}]})
    with pytest.raises(PolicyBlocked):
        await policy().apply(tx)
    text = f"x {before}{secret} y"
    for parts in splits(text, 2):
        out, _ = await redacted_stream_text(text, parts)
        assert out.endswith("[REDACTED] y") and secret[8:] not in out, (parts, out)


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["block", "redact"])
async def test_a_key_after_a_json_escape_ending_in_a_letter_is_found(action: str) -> None:
    # As the client wrote it: "\u001b" (ESC, ends in a letter) and "\u0041" ("A").
    for escaped in ("\\u001b", "\\u0041", "\\n", "\\u000b"):
        body = '{"model": "m", "messages": [{"role": "user", "content": "k ' + escaped
        body += OPENAI_KEY + '"}]}'
        tx = Transaction(
            request=ProxyRequest("POST", "/chat/completions", b"", {}, body.encode()),
            services=None,
        )
        if action == "block":
            with pytest.raises(PolicyBlocked):
                await policy().apply(tx)
            continue
        await policy(action="redact").apply(tx)
        content = orjson.loads(tx.request.body)["messages"][0]["content"]
        assert content.endswith("[REDACTED]") and OPENAI_KEY[8:] not in content


PEM_BODY = "\n".join(["MIIEowIBAAKCAQEAx9Rk2Fq3Y+abc/def" * 2] * 6)
PEM = f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----"
ENCRYPTED_PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n"
    f"DEK-Info: DES-EDE3-CBC,AB12CD34EF56\n\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----"
)
PGP = (
    "-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: GnuPG v2\nComment: made for a test\n\n"
    f"{PEM_BODY}\n=ab12\n-----END PGP PRIVATE KEY BLOCK-----"
)


@pytest.mark.anyio
@pytest.mark.parametrize("key", [PEM, ENCRYPTED_PEM, PGP], ids=["pem", "encrypted-pem", "pgp"])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json-in-arguments"])
async def test_a_private_key_is_redacted_whole(key: str, as_json: bool) -> None:
    text = f"Here it is:\n{key}\nKeep it safe."
    if as_json:  # inside tool-call arguments: JSON text, its newlines written \n
        text = orjson.dumps({"key": key, "note": "Keep it safe."}).decode()
    tx = request_tx({"model": "m", "messages": [{"role": "user", "content": text}]})
    await policy(action="redact").apply(tx)
    content = orjson.loads(tx.request.body)["messages"][0]["content"]
    for line in [*PEM_BODY.splitlines(), "END", "Proc-Type", "Version", "=ab12"]:
        assert line not in content
    assert "Keep it safe." in content and content.count("[REDACTED]") == 1
    if not as_json:
        assert content == "Here it is:\n[REDACTED]\nKeep it safe."


@pytest.mark.anyio
@pytest.mark.parametrize("key", [PEM, PGP], ids=["pem", "pgp"])
@pytest.mark.parametrize("size", [1, 5, 13])
async def test_a_private_key_split_across_many_deltas_never_leaks_its_body(
    key: str, size: int
) -> None:
    text = f"Here it is:\n{key}\nKeep it safe."
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    out, _ = await redacted_stream_text(text, parts)
    assert out == "Here it is:\n[REDACTED]\nKeep it safe."
    # Blocked: nothing of the body went out before the error.
    p = policy()
    transform = p.stream_transform(transaction({}))
    released = ""
    with pytest.raises(PolicyBlocked):
        for part in parts:
            released += text_of(await transform.on_chunk(chunk(part)))
        await transform.on_end()
    assert PEM_BODY[:20] not in released


def test_the_prefilter_is_derived_from_the_patterns() -> None:
    secrets = policy().secrets
    assert secrets.literals is not None
    # Every default key begins with one of the literals the patterns gave.
    for kind, secret in SECRETS.items():
        match = secrets.regex.search(f"x {secret} y")
        assert match is not None and secrets.kind(match) == kind
        assert any(match.group().startswith(literal) for literal in secrets.literals)
    assert set(secrets.literals) >= {"sk-", "AKIA", "ghp_", "xapp-", "AIza", "glpat-"}
    assert "-----BEGIN " in secrets.literals


@pytest.mark.anyio
async def test_custom_patterns_get_a_derived_prefilter() -> None:
    p = policy(patterns=[r"secret-\d{4}", r"(?:dev|ops)-token-[0-9a-f]{8}"])
    assert sorted(p.secrets.literals or ()) == ["dev-token-", "ops-token-", "secret-"]
    assert p.secrets.is_quiet("plain words, nothing more")
    assert not p.secrets.is_quiet("ends in secr")
    text = "mine: ops-token-0123abcd and secret-1234."
    for parts in splits(text, 2):
        out, _ = await run_stream(
            p.__class__(p.Config(patterns=p.custom_patterns, action="redact"), {}),
            [*map(chunk, parts), chunk(finish="stop")],
        )
        assert text_of(out) == "mine: [REDACTED] and [REDACTED]."
    # A pattern with no literal start: no prefilter, every text is scanned.
    loose = policy(patterns=[r"\d{4}-secret", r"secret-\d{4}"])
    assert loose.secrets.literals is None
    with pytest.raises(PolicyBlocked):
        await loose.apply(request_tx({"messages": [{"role": "user", "content": "1234-secret"}]}))


@pytest.mark.anyio
@pytest.mark.parametrize(
    "payload",
    [
        {"model": "m", "messages": [], "metadata": {OPENAI_KEY: "x"}},
        {
            "model": "m",
            "messages": [],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {OPENAI_KEY: {}}},
                    },
                }
            ],
        },
        {"model": OPENAI_KEY, "messages": []},
    ],
    ids=["metadata-key", "tool-schema-property", "model"],
)
async def test_object_keys_and_the_model_are_scanned(payload: dict[str, Any]) -> None:
    with pytest.raises(PolicyBlocked):
        await policy().apply(request_tx(payload))
    tx = request_tx(payload)
    await policy(action="redact").apply(tx)
    assert OPENAI_KEY.encode() not in tx.request.body
    assert b"[REDACTED]" in tx.request.body


@pytest.mark.anyio
async def test_object_keys_of_a_buffered_answer_are_scanned() -> None:
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}]}
    answer["metadata"] = {"note": {OPENAI_KEY: 1}}
    tx = request_tx()
    tx.response = ProxyResponse(200, {}, orjson.dumps(answer))
    with pytest.raises(PolicyBlocked):
        await policy().apply(tx)
    tx.response = ProxyResponse(200, {}, orjson.dumps(answer))
    await policy(action="redact").apply(tx)
    assert orjson.loads(tx.response.body)["metadata"] == {"note": {"[REDACTED]": 1}}


def percent_encoded(text: str) -> str:
    return "".join(f"%{ord(char):02X}" for char in text)


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["block", "redact"])
@pytest.mark.parametrize(
    ("where", "parts"),
    [
        ("request path", {"path": f"/files/{OPENAI_KEY}/content"}),
        ("request path", {"path": f"/files/{percent_encoded(OPENAI_KEY)}"}),
        ("request query", {"query": f"token={OPENAI_KEY}".encode()}),
        ("request query", {"query": f"token={percent_encoded(OPENAI_KEY)}".encode()}),
        (
            "request query",
            {
                "query": ("t=" + percent_encoded(percent_encoded("sk-"))).encode()
                + OPENAI_KEY[3:].encode()
            },
        ),
        ("request headers", {"headers": {"x-debug": f"key={OPENAI_KEY}"}}),
        (
            "request headers",
            {"headers": {"referer": f"https://x/?k={percent_encoded(OPENAI_KEY)}"}},
        ),
        ("request headers", {"headers": {"cookie": f"session={OPENAI_KEY}"}}),
        (
            "request headers",
            {"headers": {"x-data": '{"k": "\\u0073\\u006b-' + OPENAI_KEY[3:] + '"}'}},
        ),
        ("request headers", {"headers": {f"x-{OPENAI_KEY}": "1"}}),
    ],
    ids=[
        "path",
        "path-percent-encoded",
        "query",
        "query-percent-encoded",
        "query-encoded-twice",
        "header-value",
        "header-percent-encoded",
        "cookie",
        "header-json-escaped",
        "header-name",
    ],
)
async def test_a_secret_in_the_path_query_or_headers_blocks_even_when_redacting(
    action: str, where: str, parts: dict[str, Any]
) -> None:
    tx = request_tx(**parts)
    with pytest.raises(PolicyBlocked) as caught:
        await policy(action=action).apply(tx)
    assert OPENAI_KEY not in caught.value.message
    assert [(d.action, d.detail) for d in tx.decisions] == [
        ("blocked", f"openai_api_key in the {where}")
    ]


@pytest.mark.anyio
async def test_the_client_credential_headers_are_not_scanned() -> None:
    headers = {
        "authorization": f"Bearer {OPENAI_KEY}",
        "x-api-key": SECRETS["anthropic_api_key"],
        "api-key": OPENAI_KEY,
        "content-type": "application/json",
    }
    tx = request_tx(headers=headers)
    await policy().apply(tx)
    assert tx.decisions == []


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["block", "redact"])
async def test_a_secret_in_the_response_headers_blocks(action: str) -> None:
    tx = request_tx()
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}
    tx.response = ProxyResponse(200, {"x-echo": f"Bearer {OPENAI_KEY}"}, orjson.dumps(answer))
    with pytest.raises(PolicyBlocked) as caught:
        await policy(action=action).apply(tx)
    assert "response headers" in caught.value.message and OPENAI_KEY not in caught.value.message


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["block", "redact"])
async def test_deep_json_is_walked_without_recursion(action: str) -> None:
    depth = 1000  # orjson parses up to 1024 levels; Python recurses 1000 deep
    nested: Any = {OPENAI_KEY: f"a {OPENAI_KEY}"}
    for _ in range(depth):
        nested = [nested]
    deep = b"[" * depth + orjson.dumps({OPENAI_KEY: "v"}) + b"]" * depth
    body = b'{"model": "m", "messages": [], "deep": ' + deep + b"}"
    tx = Transaction(
        request=ProxyRequest("POST", "/chat/completions", b"", {}, body), services=None
    )
    p = policy(action=action)
    if action == "block":
        with pytest.raises(PolicyBlocked):
            await p.apply(tx)
        return
    assert p.scan_value(tx, nested, "request")[1] is True
    inner = nested
    for _ in range(depth):
        inner = inner[0]
    assert inner == {"[REDACTED]": "a [REDACTED]"}


# --- tool-call arguments streamed as JSON text: escapes read as the client reads them ----


def _arguments_out(action: str, text: str, cuts: list[int]) -> str:
    from luthien_control.policies.secrets import _ArgumentsScanner

    policy = LeakedApiKeyDetection(LeakedApiKeyDetection.Config(action=action), {})  # type: ignore[arg-type]
    tx = Transaction(request=ProxyRequest("POST", "/messages", b"", {}, b"{}"), services=None)
    scanner = _ArgumentsScanner(policy, tx)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    return "".join(scanner.feed(piece) for piece in pieces) + scanner.flush()


ESCAPED_KEY = "".join(f"\\u{ord(c):04x}" for c in "sk-proj-") + "Aa1Bb2Cc3Dd4Ee5Ff6Gg7Hh8"


@pytest.mark.parametrize("seed", range(40))
def test_escaped_key_in_streamed_arguments_is_redacted_at_every_split(seed: int) -> None:
    import random

    text = '{"path": "a\\"b", "token": "x ' + ESCAPED_KEY + ' y", "n": [1, "\\u00e9"]}'
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
    out = _arguments_out("redact", text, cuts)
    assert orjson.loads(out) == {"path": 'a"b', "token": "x [REDACTED] y", "n": [1, "\u00e9"]}


@pytest.mark.parametrize("seed", range(20))
def test_arguments_without_a_secret_go_out_exactly_as_they_came(seed: int) -> None:
    import random

    text = '{"cmd": "echo \\"hi\\"\\n", "s": "sk-\\u0041", "t": "caf\\u00e9 \\\\"}'
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 10)))
    assert _arguments_out("redact", text, cuts) == text


def test_escaped_key_in_streamed_arguments_blocks_in_block_mode() -> None:
    text = '{"token": "' + ESCAPED_KEY + '"}'
    with pytest.raises(PolicyBlocked):
        _arguments_out("block", text, [5, 13, 30])


def test_scrub_leaves_no_key_one_decoding_deeper_than_another() -> None:
    """The first decoded form that spells a key is redacted, and so is what it leaves:
    a second key percent-encoded once more than the first, or JSON-escaped inside it,
    does not survive in the text that is stored or logged."""
    secrets = default_secrets()
    second = "sk-proj-" + "Z9y8X7w6V5u4T3s2R1q0P9o8N7m6"
    for text in (
        f"%73{OPENAI_KEY[1:]} and %2573{second[1:]}",
        f"a=%2573{OPENAI_KEY[1:]}&b=%73{second[1:]}",
        f"%73{OPENAI_KEY[1:]} then \\u0073{second[1:]}",
    ):
        scrubbed = secrets.scrub(text)
        assert all(secrets.search(form) is None for form in field_forms(scrubbed)), scrubbed
        assert scrubbed.count(REDACTED) == 2, scrubbed
    assert secrets.scrub("nothing %41 here \\n") == "nothing %41 here \\n"
