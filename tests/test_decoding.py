"""Strict decoding (``luthien_control.decoding``): every rule on its own, then through a
real proxy process, in front of a loopback backend that keeps the raw bytes it received
and answers as each test tells it (gzip, a compressed stream, a repeated key, a bomb).
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest

from luthien_control.decoding import (
    DecodingError,
    StreamDecompressor,
    check_stream_start,
    content_codings,
    decode_request_body,
    decode_response_body,
    decoded_stream,
    decompress,
    has_duplicate_keys,
    looks_like_json,
    strict_event_data,
    strict_json,
)
from luthien_control.exceptions import BackendBroken, MalformedRequest, RequestTooLarge
from luthien_control.policies.base import Policy
from luthien_control.policies.loader import load_policy
from tests.conftest import CLIENT_KEY, ProxyServer, ProxyStarter, serve_in_thread

SECRET = "sk-proj-" + "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2"
LIMIT = 1024 * 1024  # MAX_REQUEST_BYTES and MAX_RESPONSE_BYTES of the proxies below
JSON = {"content-type": "application/json"}
ONLY_JSON = (
    "; while a policy that reads content is in force, the proxy takes JSON bodies only "
    "(and multipart/form-data uploads on the upload routes)"
)


def refused(headers: dict[str, str], body: bytes, path: str = "/chat/completions") -> str:
    with pytest.raises(MalformedRequest) as caught:
        decode_request_body(headers, body, path=path, limit=LIMIT)
    return caught.value.message


def orjson_error(body: bytes) -> str:
    with pytest.raises(orjson.JSONDecodeError) as caught:
        orjson.loads(body)
    return str(caught.value)


# --- content codings ---------------------------------------------------------------------


def test_content_codings_in_the_order_applied_without_identity() -> None:
    assert content_codings({}) == []
    assert content_codings({"content-encoding": "identity"}) == []
    assert content_codings({"content-encoding": "GZip"}) == ["gzip"]
    assert content_codings({"content-encoding": "deflate, gzip,, identity"}) == ["deflate", "gzip"]


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("codings", "encode"),
    [
        (["gzip"], gzip.compress),
        (["x-gzip"], gzip.compress),
        (["deflate"], zlib.compress),
        (["deflate"], raw_deflate),  # as httpx reads "deflate" too
        (["gzip", "deflate"], lambda data: zlib.compress(gzip.compress(data))),
    ],
)
def test_gzip_and_deflate_are_undone(codings: list[str], encode: Any) -> None:
    data = b'{"text": "' + b"abc " * 5000 + b'"}'
    assert decompress(encode(data), codings, LIMIT) == data


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "bogus"])
def test_other_codings_are_refused(coding: str) -> None:
    with pytest.raises(DecodingError, match=f"has Content-Encoding '{coding}'"):
        decompress(b"anything", [coding], LIMIT)


def test_a_decompression_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 * LIMIT))  # 64 MiB in about 64 KB
    with pytest.raises(DecodingError, match=f"is larger than {LIMIT} bytes once decompressed"):
        decompress(bomb, ["gzip"], LIMIT)


def test_exactly_the_limit_is_accepted() -> None:
    assert len(decompress(gzip.compress(b"x" * LIMIT), ["gzip"], LIMIT)) == LIMIT


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (gzip.compress(b"[1]")[:-4], "ends before its gzip stream does"),
        (gzip.compress(b"[1]") + gzip.compress(b"[2]"), "has data after the end"),
        (gzip.compress(b"[1]") + b"junk", "has data after the end"),
        (b"not gzip at all", "is not valid gzip data"),
    ],
    ids=["cut", "two-members", "junk-after", "not-gzip"],  # the bytes hold gzip's mtime
)
def test_truncated_trailing_or_garbled_data_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(DecodingError, match=message):
        decompress(data, ["gzip"], LIMIT)


def test_stream_decompressor_gives_bounded_pieces_whatever_the_split() -> None:
    data = b"".join(b'data: {"n": %d}\n\n' % i for i in range(20_000))
    compressed = gzip.compress(data)
    for step in (1, 7, 4096, len(compressed)):
        decompressor = StreamDecompressor(["gzip"], piece=1000)
        pieces = [
            piece
            for start in range(0, len(compressed), step)
            for piece in decompressor.feed(compressed[start : start + step])
        ]
        decompressor.close()
        assert b"".join(pieces) == data
        assert max(len(piece) for piece in pieces) <= 1000


def test_stream_decompressor_close_refuses_a_cut_stream() -> None:
    decompressor = StreamDecompressor(["gzip"])
    list(decompressor.feed(gzip.compress(b"data: {}\n\n")[:-8]))
    with pytest.raises(DecodingError, match="ends before its gzip stream does"):
        decompressor.close()


# --- strict JSON ----------------------------------------------------------------------------


def test_orjson_refuses_what_it_should() -> None:
    """What strictness leans on: orjson refuses these (Python's json takes the first five)."""
    for body in (
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b"\xef\xbb\xbf{}",
        '{"a": 1}'.encode("utf-16"),
        b'"\\ud800"',  # a lone high surrogate, escaped
        b'"\\udc00"',  # a lone low surrogate, escaped
        b'"\\ud800\\u0041"',  # a high surrogate followed by no low one
        b'"\xed\xa0\x80"',  # a surrogate as (invalid) UTF-8 bytes
        b"1e400",  # beyond a double: Python's json reads inf
        b'{"a": 1} x',
    ):
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(body)
    assert orjson.loads(b'{"a": 1, "a": 2}') == {"a": 2}  # the last value: hence the check


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'\xef\xbb\xbf{"a": 1}', "starts with a UTF-8 byte order mark"),
        ('{"a": 1}'.encode("utf-16"), "is UTF-16 or UTF-32: JSON must be UTF-8"),
        ('{"a": 1}'.encode("utf-16-le"), "is UTF-16 or UTF-32: JSON must be UTF-8"),
        ('{"a": 1}'.encode("utf-16-be"), "is UTF-16 or UTF-32: JSON must be UTF-8"),
        ('{"a": 1}'.encode("utf-32"), "is UTF-16 or UTF-32: JSON must be UTF-8"),
        ('{"a": 1}'.encode("utf-32-be"), "is UTF-16 or UTF-32: JSON must be UTF-8"),
        (b'{"a": 1, "a": 2}', "has an object with a repeated key"),
        (b'{"a": {"b": [{"c": 1, "d": 2, "c": 3}]}}', "has an object with a repeated key"),
    ],
)
def test_strict_json_refuses(body: bytes, message: str) -> None:
    with pytest.raises(DecodingError) as caught:
        strict_json(body)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "body", [b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b'"\\ud800"', b"1e400"]
)
def test_strict_json_refuses_what_orjson_refuses(body: bytes) -> None:
    with pytest.raises(DecodingError) as caught:
        strict_json(body)
    assert str(caught.value) == f"is not valid JSON ({orjson_error(body)})"


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":1,"a":2}',  # compact, as httpx and JSON.stringify write
        b'{"a": 1, "a": 2}',  # spaced
        b'[{"x": "y:z"}, {"x": "y:z", "x": 1}]',  # colons inside strings too
        b'{"k": "\\u003a", "k": 1}',  # an escaped colon in a string
        b'{"a\\u003a": 1, "a:": 2}',  # the same key written two ways
        b'{"a": {"a": 1}, "b": {"c": 1, "\\u0063": 2}}',  # an escaped key
        b'{"b": 0, "a": ' * 300 + b"1" + b', "b": 2}' * 300,  # deeper than orjson writes
    ],
)
def test_repeated_keys_are_found(body: bytes) -> None:
    assert has_duplicate_keys(body, orjson.loads(body))


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b'{"a":1,"b":{"a":1}}',  # the same key in two objects
        b'{"url": "https://x:8080/a:b", "t": "12:30"}',
        b'{"k\\u003a": "v\\u003a\\u003A", "k": 1}',
        b'{\n  "a" : 1 ,\n  "b" : [1, 2]\n}\n',
        b'{"a": ' * 300 + b"1" + b"}" * 300,
    ],
)
def test_no_false_repeated_key(body: bytes) -> None:
    assert not has_duplicate_keys(body, orjson.loads(body))


def test_looks_like_json() -> None:
    assert looks_like_json(b' \n {"a": 1}') and looks_like_json(b"[1]")
    assert looks_like_json(b'\xef\xbb\xbf{"a": 1}')
    for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"):
        assert looks_like_json('{"a": 1}'.encode(encoding)), encoding
    assert not looks_like_json(b"--boundary\r\n")
    assert not looks_like_json(b"hello")
    assert not looks_like_json(b"")


# --- requests --------------------------------------------------------------------------------


def test_a_json_request_is_parsed_once_and_kept_as_it_came() -> None:
    body = b'{"model": "m", "messages": []}'
    decoded, payload = decode_request_body(JSON, body, path="/chat/completions", limit=LIMIT)
    assert decoded is body and payload == {"model": "m", "messages": []}
    assert decode_request_body(JSON, b"", path="/x", limit=LIMIT) == (b"", None)


def test_a_json_request_is_json_whatever_its_content_type() -> None:
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        headers = {"content-type": content_type}
        _, payload = decode_request_body(headers, body, path="/chat/completions", limit=LIMIT)
        assert payload["messages"][0]["content"] == "hi"


def test_a_compressed_request_is_decompressed() -> None:
    body = b'{"input": "' + b"x" * 10_000 + b'"}'
    headers = {**JSON, "content-encoding": "gzip"}
    decoded, payload = decode_request_body(
        headers, gzip.compress(body), path="/embeddings", limit=LIMIT
    )
    assert decoded == body and payload == orjson.loads(body)


def test_request_refusals_say_why() -> None:
    assert refused(JSON, b"\xef\xbb\xbf{}") == (
        "the request body starts with a UTF-8 byte order mark"
    )
    assert refused(JSON, b'{"a": [{"b": 1, "b": 2}]}') == (
        "the request body has an object with a repeated key"
    )
    assert refused({"content-encoding": "br"}, b"\x0b\x01\x80{}\x03") == (
        "the request body has Content-Encoding 'br': only gzip and deflate are undone"
    )
    assert refused({"content-type": "application/json; charset=utf-16"}, b"{}") == (
        "the request body declares charset 'utf-16': JSON must be UTF-8"
    )
    assert refused({"content-type": "text/plain"}, b"hello") == (
        f"the request body is not valid JSON ({orjson_error(b'hello')}){ONLY_JSON}"
    )
    with pytest.raises(RequestTooLarge) as caught:
        bomb = gzip.compress(b"[" + b" " * (2 * LIMIT) + b"]")
        decode_request_body({"content-encoding": "gzip"}, bomb, path="/x", limit=LIMIT)
    assert (
        caught.value.message == f"the request body is larger than {LIMIT} bytes once decompressed"
    )


def test_multipart_passes_as_bytes_on_upload_routes_only() -> None:
    headers = {"content-type": "multipart/form-data; boundary=b"}
    body = b'--b\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b--\r\n'
    for path in ("/files", "/audio/transcriptions", "/uploads/upload_1/parts", "/images/edits"):
        assert decode_request_body(headers, body, path=path, limit=LIMIT) == (body, None)
    for path in ("/chat/completions", "/files/../chat/completions", "/messages", "/custom"):
        assert refused(headers, body, path).startswith("the request body is not valid JSON")


# --- answers ---------------------------------------------------------------------------------


def test_a_compressed_answer_is_decompressed_and_read() -> None:
    body = b'{"choices": [{"message": {"content": "hello"}}]}'
    headers = {**JSON, "content-encoding": "gzip"}
    assert decode_response_body(headers, gzip.compress(body), limit=LIMIT) == (
        body,
        orjson.loads(body),
    )


def test_an_answer_that_is_not_json_is_read_as_nothing() -> None:
    assert decode_response_body({"content-type": "text/plain"}, b"hi", limit=LIMIT) == (
        b"hi",
        None,
    )
    audio = b"ID3\x04\x00\x00" + bytes(range(256))
    assert decode_response_body({"content-type": "audio/mpeg"}, audio, limit=LIMIT) == (
        audio,
        None,
    )
    assert decode_response_body({"content-type": "text/plain"}, b"42", limit=LIMIT) == (b"42", 42)


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        (JSON, b'{"a": 1, "a": 2}', "the backend's answer has an object with a repeated key"),
        (
            {"content-type": "text/plain"},
            b'{"a": 1, "a": 2}',
            "the backend's answer has an object with a repeated key",
        ),
        (JSON, b"\xef\xbb\xbf{}", "the backend's answer starts with a UTF-8 byte order mark"),
        (JSON, b"oops", f"the backend's answer is not valid JSON ({orjson_error(b'oops')})"),
        (
            {**JSON, "content-encoding": "br"},
            b"\x0b",
            "the backend's answer has Content-Encoding 'br': only gzip and deflate are undone",
        ),
        (
            {**JSON, "content-encoding": "gzip"},
            gzip.compress(b"[" + b" " * (2 * LIMIT) + b"]"),
            f"the backend's answer is larger than {LIMIT} bytes once decompressed",
        ),
    ],
)
def test_answer_refusals_are_backend_broken(
    headers: dict[str, str], body: bytes, message: str
) -> None:
    with pytest.raises(BackendBroken) as caught:
        decode_response_body(headers, body, limit=LIMIT)
    assert caught.value.message == message
    assert caught.value.status_code == 502


def test_strict_event_data() -> None:
    assert strict_event_data(b'{"choices": []}') == {"choices": []}
    assert strict_event_data(b"") is None
    for payload, reason in [
        (b'{"a": 1, "a": 2}', "has an object with a repeated key"),
        (NAN, f"is not valid JSON ({orjson_error(NAN)})"),
        (b"[DONE]", f"is not valid JSON ({orjson_error(b'[DONE]')})"),
    ]:
        with pytest.raises(BackendBroken) as caught:
            strict_event_data(payload)
        assert caught.value.message == f"an event of the backend's stream {reason}"
    check_stream_start(b"data: {}\n\n")
    with pytest.raises(BackendBroken, match="starts with a byte order mark"):
        check_stream_start(b"\xef\xbb\xbfdata: {}\n\n")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _pieces(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


@pytest.mark.anyio
async def test_decoded_stream_undoes_compression_as_it_arrives() -> None:
    source = _pieces(b"data: {}\n\n")
    plain = {"content-type": "text/event-stream"}
    assert decoded_stream(plain, source) is source and plain == {
        "content-type": "text/event-stream"
    }
    events = b"".join(b'data: {"n": %d}\n\n' % i for i in range(100))
    compressed = gzip.compress(events)
    headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    stream = decoded_stream(headers, _pieces(compressed[:10], compressed[10:]))
    assert headers == {"content-type": "text/event-stream"}
    assert b"".join([piece async for piece in stream]) == events
    cut = decoded_stream({"content-encoding": "gzip"}, _pieces(compressed[:-5]))
    with pytest.raises(BackendBroken, match="the backend's stream ends before its gzip"):
        _ = [piece async for piece in cut]
    with pytest.raises(BackendBroken, match="the backend's stream has Content-Encoding 'br'"):
        decoded_stream({"content-encoding": "br"}, _pieces())


# --- which trees read content ---------------------------------------------------------------


def policy(*members: dict[str, Any]) -> dict[str, Any]:
    return {"type": "SerialPolicy", "config": {"policies": list(members)}}


PLUMBING = [
    {"type": "ClientApiKeyAuth", "config": {}},
    {"type": "AddApiKeyHeader", "config": {}},
    {"type": "AddApiKeyHeaderFromEnv", "config": {"api_key_env_var_name": "K"}},
    {"type": "SetBackendPolicy", "config": {"backend_url": "http://127.0.0.1:1/v1"}},
    {"type": "NoopPolicy", "config": {}},
    {"type": "SendBackendRequest", "config": {}},
]


def branch(path: str) -> dict[str, Any]:
    condition = {
        "type": "equals",
        "left": {"type": "transaction_path", "path": path},
        "right": {"type": "static", "value": "x"},
    }
    return {
        "type": "BranchingPolicy",
        "config": {"cond_to_policy_map": [{"condition": condition, "policy": PLUMBING[4]}]},
    }


@pytest.mark.parametrize(
    ("member", "reads"),
    [
        (None, False),
        ({"type": "LeakedApiKeyDetection", "config": {}}, True),
        ({"type": "IncrementIntegers", "config": {}}, True),
        ({"type": "ToolCallPolicy", "config": {"denied_tools": ["shell"]}}, True),
        ({"type": "TransactionContextLoggingPolicy", "config": {}}, True),
        ({"type": "ModelNameReplacement", "config": {"model_mapping": {"a": "b"}}}, True),
        ({"type": "tests.test_decoding:HeaderOnly", "config": {}}, False),
        ({"type": "tests.test_decoding:Custom", "config": {}}, True),
        (branch("request.headers.x-team"), False),
        (branch("request.path"), False),
        (branch("request.payload.model"), True),
        (branch("response.body"), True),
    ],
)
def test_a_tree_reads_content_when_one_member_does(
    member: dict[str, Any] | None, reads: bool
) -> None:
    members = [*PLUMBING, member] if member is not None else PLUMBING
    assert load_policy(policy(*members)).tree_reads_content is reads


class Custom(Policy):
    """A custom policy that says nothing: assumed to read content."""

    type_name = "Custom"


class HeaderOnly(Policy):
    type_name = "HeaderOnly"
    reads_content = False


# --- through a real proxy --------------------------------------------------------------------


def gz(data: bytes) -> bytes:
    return gzip.compress(data)


CHAT_ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}
    ],
}


def chat_answer(content: str) -> bytes:
    answer = orjson.loads(orjson.dumps(CHAT_ANSWER))
    answer["choices"][0]["message"]["content"] = content
    return orjson.dumps(answer)


def sse(*contents: str) -> list[bytes]:
    events = [
        b"data: "
        + orjson.dumps(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            }
        )
        + b"\n\n"
        for text in contents
    ]
    return [*events, b"data: [DONE]\n\n"]


def gzip_pieces(events: list[bytes]) -> list[bytes]:
    """One gzip stream, flushed after every event, as a server that streams gzip sends it."""
    compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    pieces = [compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH) for event in events]
    pieces[-1] += compressor.flush()
    return pieces


NOT_JSON = b"{'choices': []}"
JSON_HEADERS = [(b"content-type", b"application/json")]
GZIP_JSON_HEADERS = [*JSON_HEADERS, (b"content-encoding", b"gzip")]
GZIP_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"content-encoding", b"gzip")]

# What the loopback backend answers, by the request's x-answer header: status, headers, and
# the body as one piece or several.
ANSWERS: dict[str, tuple[int, list[tuple[bytes, bytes]], list[bytes]]] = {
    "ok": (200, JSON_HEADERS, [chat_answer("fine")]),
    "gzip": (200, GZIP_JSON_HEADERS, [gz(chat_answer("fine, compressed"))]),
    "gzip-secret": (200, GZIP_JSON_HEADERS, [gz(chat_answer(f"the key is {SECRET}"))]),
    "repeated-key": (200, JSON_HEADERS, [b'{"choices": [], "choices": [{"index": 0}]}']),
    "not-json": (200, JSON_HEADERS, [NOT_JSON]),
    "bomb": (200, GZIP_JSON_HEADERS, [gz(b'{"a": "' + b" " * (8 * LIMIT) + b'"}')]),
    "gzip-stream": (200, GZIP_SSE_HEADERS, gzip_pieces(sse("one ", "two ", "three"))),
    "gzip-stream-secret": (200, GZIP_SSE_HEADERS, gzip_pieces(sse("hi ", f"it is {SECRET}"))),
    "br-stream": (
        200,
        [(b"content-type", b"text/event-stream"), (b"content-encoding", b"br")],
        [b"\x0b\x01\x80data: {}\n\n\x03"],
    ),
}


class RawBackend:
    """A loopback backend: keeps each request as it came (by ``x-test-id``), answers as
    ``x-answer`` says."""

    def __init__(self) -> None:
        self.requests: dict[str, dict[str, Any]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests[headers.get("x-test-id", "")] = {
            "path": scope["path"],
            "headers": headers,
            "body": body,
        }
        status, answer_headers, pieces = ANSWERS[headers.get("x-answer", "ok")]
        if len(pieces) == 1:
            answer_headers = [*answer_headers, (b"content-length", str(len(pieces[0])).encode())]
        await send({"type": "http.response.start", "status": status, "headers": answer_headers})
        for number, piece in enumerate(pieces, 1):
            await send(
                {"type": "http.response.body", "body": piece, "more_body": number < len(pieces)}
            )
            await asyncio.sleep(0.005)  # separate network reads


@pytest.fixture(scope="module")
def raw_backend() -> Iterator[tuple[RawBackend, str]]:
    backend = RawBackend()
    with serve_in_thread(backend) as url:
        yield backend, url


def proxy_policy(backend: str, *, content: bool) -> dict[str, Any]:
    leak = [{"type": "LeakedApiKeyDetection", "config": {}}] if content else []
    return policy(
        {"type": "ClientApiKeyAuth", "config": {}},
        *leak,
        {"type": "AddApiKeyHeader", "config": {}},
        {"type": "SetBackendPolicy", "config": {"backend_url": backend}},
        {"type": "SendBackendRequest", "config": {}},
        *leak,
    )


LIMITS = {"MAX_REQUEST_BYTES": str(LIMIT), "MAX_RESPONSE_BYTES": str(LIMIT)}


@pytest.fixture(scope="module")
def strict_proxy(start_proxy: ProxyStarter, raw_backend: tuple[RawBackend, str]) -> ProxyServer:
    """LeakedApiKeyDetection on both sides: bodies are decoded strictly."""
    return start_proxy(policy=proxy_policy(raw_backend[1], content=True), env=LIMITS)


@pytest.fixture(scope="module")
def plain_proxy(start_proxy: ProxyStarter, raw_backend: tuple[RawBackend, str]) -> ProxyServer:
    """No policy that reads content: bodies pass as they came."""
    return start_proxy(policy=proxy_policy(raw_backend[1], content=False), env=LIMITS)


def post(
    proxy: ProxyServer, body: bytes, headers: dict[str, str], path: str = "/chat/completions"
) -> httpx.Response:
    return httpx.post(
        f"{proxy.api_base}{path}",
        content=body,
        headers={"Authorization": f"Bearer {CLIENT_KEY}", **headers},
        timeout=30,
    )


def error_body(response: httpx.Response, status: int, message: str, code: str) -> None:
    assert response.status_code == status
    assert response.json() == {
        "error": {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "backend_error",
            "param": None,
            "code": code,
            "transaction_id": response.headers["x-luthien-transaction-id"],
        }
    }


NAN = b'{"model": "m", "messages": [], "temperature": NaN}'
INFINITY = b'{"model": "m", "messages": [], "temperature": -Infinity}'
TEXT = {"content-type": "text/plain"}
HOSTILE: list[tuple[str, bytes, dict[str, str], int, str, str]] = [
    (
        "bom",
        b'\xef\xbb\xbf{"model": "m", "messages": []}',
        TEXT,
        400,
        "the request body starts with a UTF-8 byte order mark",
        "invalid_request",
    ),
    (
        "utf-16",
        '{"model": "m", "messages": []}'.encode("utf-16"),
        TEXT,
        400,
        "the request body is UTF-16 or UTF-32: JSON must be UTF-8",
        "invalid_request",
    ),
    (
        "nan",
        NAN,
        TEXT,
        400,
        f"the request body is not valid JSON ({orjson_error(NAN)})",
        "invalid_request",
    ),
    (
        "infinity",
        INFINITY,
        TEXT,
        400,
        f"the request body is not valid JSON ({orjson_error(INFINITY)})",
        "invalid_request",
    ),
    (
        "repeated-key",
        b'{"model": "m", "messages": [{"role": "user", "content": "a", "content": "b"}]}',
        JSON,
        400,
        "the request body has an object with a repeated key",
        "invalid_request",
    ),
    (
        "gzip-bomb",
        gz(b'{"model": "m", "messages": [], "x": "' + b" " * (4 * LIMIT) + b'"}'),
        {**JSON, "content-encoding": "gzip"},
        413,
        f"the request body is larger than {LIMIT} bytes once decompressed",
        "request_too_large",
    ),
    (
        "brotli",
        b"\x0b\x01\x80{}\x03",
        {**JSON, "content-encoding": "br"},
        400,
        "the request body has Content-Encoding 'br': only gzip and deflate are undone",
        "invalid_request",
    ),
]
SECRET_BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": SECRET}]})
SMUGGLED: list[tuple[str, bytes, dict[str, str]]] = [
    ("gzip", gz(SECRET_BODY), {**JSON, "content-encoding": "gzip"}),
    ("text-plain", SECRET_BODY, TEXT),
    ("deflate-text-plain", zlib.compress(SECRET_BODY), {**TEXT, "content-encoding": "deflate"}),
]


@pytest.mark.parametrize(
    ("name", "body", "headers", "status", "message", "code"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_requests_are_refused_and_never_sent(
    strict_proxy: ProxyServer,
    raw_backend: tuple[RawBackend, str],
    name: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    message: str,
    code: str,
) -> None:
    test_id = f"hostile-{name}"
    response = post(strict_proxy, body, {**headers, "x-test-id": test_id})
    error_body(response, status, message, code)
    assert test_id not in raw_backend[0].requests


@pytest.mark.parametrize(("name", "body", "headers"), SMUGGLED, ids=[s[0] for s in SMUGGLED])
def test_a_key_in_an_encoded_or_mistyped_body_is_caught(
    strict_proxy: ProxyServer,
    raw_backend: tuple[RawBackend, str],
    name: str,
    body: bytes,
    headers: dict[str, str],
) -> None:
    test_id = f"smuggled-{name}"
    response = post(strict_proxy, body, {**headers, "x-test-id": test_id})
    assert response.status_code == 403
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("permission_error", "policy_blocked")
    assert SECRET not in response.text
    assert test_id not in raw_backend[0].requests


def test_the_backend_gets_what_was_scanned(
    strict_proxy: ProxyServer, raw_backend: tuple[RawBackend, str]
) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hello"}]}'
    headers = {**JSON, "content-encoding": "gzip", "x-test-id": "decoded"}
    response = post(strict_proxy, gz(body), headers)
    assert response.status_code == 200
    received = raw_backend[0].requests["decoded"]
    assert received["body"] == body
    assert "content-encoding" not in received["headers"]
    record = strict_proxy.record(response.headers["x-luthien-transaction-id"])
    assert record["request"]["received"]["body"] == orjson.loads(body)  # stored readable


@pytest.mark.parametrize(
    ("name", "body", "headers"),
    [(h[0], h[1], h[2]) for h in HOSTILE] + SMUGGLED,
    ids=[h[0] for h in HOSTILE] + [s[0] for s in SMUGGLED],
)
def test_without_a_content_policy_the_same_bytes_pass_untouched(
    plain_proxy: ProxyServer,
    raw_backend: tuple[RawBackend, str],
    name: str,
    body: bytes,
    headers: dict[str, str],
) -> None:
    test_id = f"untouched-{name}"
    response = post(plain_proxy, body, {**headers, "x-test-id": test_id}, path="/echo")
    assert response.status_code == 200
    received = raw_backend[0].requests[test_id]
    assert received["path"] == "/v1/echo"
    assert received["body"] == body
    assert received["headers"].get("content-encoding") == headers.get("content-encoding")


# --- answers through a real proxy


def test_a_compressed_answer_is_decompressed_for_the_policies_and_the_client(
    strict_proxy: ProxyServer,
) -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    response = post(strict_proxy, body, {**JSON, "x-answer": "gzip"})
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    assert response.content == chat_answer("fine, compressed")
    record = strict_proxy.record(response.headers["x-luthien-transaction-id"])
    assert record["response"]["received"]["body"] == orjson.loads(chat_answer("fine, compressed"))


def test_a_key_in_a_compressed_answer_is_caught(strict_proxy: ProxyServer) -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    response = post(strict_proxy, body, {**JSON, "x-answer": "gzip-secret"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "policy_blocked"
    assert SECRET not in response.text


def test_a_key_in_a_compressed_stream_is_caught(strict_proxy: ProxyServer) -> None:
    body = orjson.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    response = post(strict_proxy, body, {**JSON, "x-answer": "gzip-stream-secret"})
    assert SECRET not in response.text
    if response.status_code == 200:  # caught after the stream began: the error event
        assert b'"code":"policy_blocked"' in response.content
        assert b"[DONE]" not in response.content
    else:
        assert response.status_code == 403


@pytest.mark.parametrize("proxy_name", ["strict_proxy", "plain_proxy"])
def test_a_compressed_stream_reaches_the_client_decompressed(
    request: pytest.FixtureRequest, proxy_name: str
) -> None:
    """Always: the relay never forwards a stream's Content-Encoding."""
    proxy: ProxyServer = request.getfixturevalue(proxy_name)
    body = orjson.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    response = post(proxy, body, {**JSON, "x-answer": "gzip-stream"})
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    assert response.content == b"".join(sse("one ", "two ", "three"))


@pytest.mark.parametrize("proxy_name", ["strict_proxy", "plain_proxy"])
def test_a_stream_in_another_coding_is_502(request: pytest.FixtureRequest, proxy_name: str) -> None:
    proxy: ProxyServer = request.getfixturevalue(proxy_name)
    body = orjson.dumps({"model": "m", "stream": True, "messages": []})
    response = post(proxy, body, {**JSON, "x-answer": "br-stream"}, path="/echo")
    message = "the backend's stream has Content-Encoding 'br': only gzip and deflate are undone"
    error_body(response, 502, message, "backend_broken")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("repeated-key", "the backend's answer has an object with a repeated key"),
        ("not-json", f"the backend's answer is not valid JSON ({orjson_error(NOT_JSON)})"),
        ("bomb", f"the backend's answer is larger than {LIMIT} bytes once decompressed"),
    ],
)
def test_an_answer_that_cannot_be_read_strictly_is_502(
    strict_proxy: ProxyServer, answer: str, message: str
) -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    response = post(strict_proxy, body, {**JSON, "x-answer": answer})
    error_body(response, 502, message, "backend_broken")


@pytest.mark.parametrize("answer", ["gzip", "repeated-key", "not-json"])
def test_without_a_content_policy_an_answer_passes_untouched(
    plain_proxy: ProxyServer, answer: str
) -> None:
    _, headers, pieces = ANSWERS[answer]
    with httpx.stream(
        "POST",
        f"{plain_proxy.api_base}/echo",
        content=b"{}",
        headers={"Authorization": f"Bearer {CLIENT_KEY}", **JSON, "x-answer": answer},
        timeout=30,
    ) as response:
        raw = b"".join(response.iter_raw())
    assert response.status_code == 200
    assert raw == pieces[0]
    encoding = dict(headers).get(b"content-encoding")
    assert response.headers.get("content-encoding") == (encoding and encoding.decode())
