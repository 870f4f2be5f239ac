"""Strict decoding at the edges: a body is read as its client or backend reads it, or refused.

A policy can only judge what it reads. A body that the proxy reads one way and a client
or backend another would carry past the policies what they never saw: a UTF-8 byte order
mark or UTF-16, which Python's ``json`` accepts and orjson refuses; a key given twice,
where orjson keeps the last value and another parser the first; a gzip body nobody
undid. So while a policy that reads content is in force (``Policy.tree_reads_content``,
``Transaction.reads_content``), the edges decode strictly:

- a request body (``decode_request``): a ``Content-Encoding`` of gzip or deflate is
  undone, bounded by ``MAX_REQUEST_BYTES`` (413 beyond it), any other is refused; then
  the body must be strict JSON whatever its content type (400), except a
  ``multipart/form-data`` upload on one of the upload routes (``UPLOAD_ROUTE``), which
  goes on as bytes. The backend gets the decoded body, without ``Content-Encoding``:
  what the policies read is what is sent.
- a buffered answer (``decode_response``): compression undone, bounded by
  ``MAX_RESPONSE_BYTES``, and sent on without ``Content-Encoding``; a body whose content
  type says JSON, or that looks like JSON, must be strict JSON (502, ``BackendBroken``).
- a streamed answer: compression undone piece by piece (``decoded_stream``, always: the
  relay never forwards a stream's ``Content-Encoding``); for the relay to call on each
  event, ``strict_event_data`` (its data must be strict JSON) and, on the first bytes,
  ``check_stream_start``.

Strict JSON is what orjson accepts (UTF-8 without a byte order mark; no ``NaN`` or
``Infinity``; no lone surrogate, escaped or not; no number too large for a double) with
no object that repeats a key. With no policy that reads content in force, bodies pass
as they came (``Message.payload`` then parses leniently, for the proxy's own needs).
"""

from __future__ import annotations

import codecs
import json
import re
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import orjson

from luthien_control.exceptions import BackendBroken, MalformedRequest, RequestTooLarge
from luthien_control.transaction import Transaction

DEFAULT_PIECE = 64 * 1024  # the most a decompressor gives out at once (bounds memory)

# Routes whose bodies are uploads (files, audio, images), relayed as bytes when they
# are multipart/form-data; relative to the API root, as ``ProxyRequest.path``.
UPLOAD_ROUTE = re.compile(
    r"/(?:files|uploads/[^/?]+/parts|audio/(?:transcriptions|translations)"
    r"|images/(?:edits|variations))/?"
)

_BOMS = (b"\xef\xbb\xbf", b"\xfe\xff", b"\xff\xfe")  # UTF-8, UTF-16 (32-LE starts FF FE)
_JSON_WHITESPACE = b" \t\r\n"
_JSON_WHITESPACE_TEXT = " \t\r\n"
_UTF8_NAMES = frozenset({"utf-8", "utf8"})


class DecodingError(ValueError):
    """A body cannot be decoded strictly; the message completes "the body ..."."""


class TooLarge(DecodingError):
    """A body decompresses to more than its limit."""


# --- content codings ------------------------------------------------------------------


def content_codings(headers: Mapping[str, str]) -> list[str]:
    """The ``Content-Encoding`` codings in the order they were applied (identity left out)."""
    value = headers.get("content-encoding")
    if not value:
        return []
    codings = [coding.strip().lower() for coding in value.split(",")]
    return [coding for coding in codings if coding and coding != "identity"]


class _Inflater:
    """One gzip or deflate coding undone. Deflate is zlib data, or raw deflate when the
    first bytes are not a zlib header (as httpx, the OpenAI SDK's client, reads it)."""

    __slots__ = ("coding", "first", "zlib")

    def __init__(self, coding: str) -> None:
        if coding in ("gzip", "x-gzip"):
            self.zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self.zlib = zlib.decompressobj()
        else:
            raise DecodingError(
                f"has Content-Encoding {coding!r}: only gzip and deflate are undone"
            )
        self.coding = coding
        self.first = coding == "deflate"

    def decompress(self, data: bytes, limit: int) -> bytes:
        try:
            out = self.zlib.decompress(data, limit)
        except zlib.error as exc:
            if not self.first:
                raise DecodingError(f"is not valid {self.coding} data ({exc})") from None
            self.zlib = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate
            self.first = False
            return self.decompress(data, limit)
        self.first = False
        return out


class StreamDecompressor:
    """Undoes a chain of content codings (``content_codings``) piece by piece.

    ``feed`` gives out the decompressed bytes in pieces of at most ``piece`` bytes, so a
    small input that inflates enormously never sits in memory at once; ``close`` says
    whether the compressed data ended properly. Data after the end of the compressed
    stream (a second gzip member, which some clients read and others ignore) and
    truncated data are errors. Raises ``DecodingError``.
    """

    __slots__ = ("_piece", "_stages")

    def __init__(self, codings: list[str], piece: int = DEFAULT_PIECE) -> None:
        self._stages = [_Inflater(coding) for coding in reversed(codings)]
        self._piece = piece

    def feed(self, data: bytes) -> Iterator[bytes]:
        return self._through(0, data)

    def _through(self, stage: int, data: bytes) -> Iterator[bytes]:
        if stage == len(self._stages):
            yield data
            return
        inflater = self._stages[stage]
        piece = self._piece
        while True:
            if inflater.zlib.eof:
                if data or inflater.zlib.unused_data:
                    raise DecodingError("has data after the end of its compressed stream")
                return
            out = inflater.decompress(data, piece)
            data = inflater.zlib.unconsumed_tail
            if out:
                yield from self._through(stage + 1, out)
            # A full piece may leave output inside zlib even with no input left.
            if not data and len(out) < piece and not inflater.zlib.eof:
                return

    def close(self) -> None:
        """Raise ``DecodingError`` unless every coding's compressed stream ended."""
        for inflater in self._stages:
            if not inflater.zlib.eof:
                raise DecodingError(f"ends before its {inflater.coding} stream does")


def decompress(body: bytes, codings: list[str], limit: int) -> bytes:
    """``body`` with ``codings`` undone; ``TooLarge`` beyond ``limit`` bytes (checked as
    the pieces come, so a decompression bomb never inflates past it)."""
    decompressor = StreamDecompressor(codings, piece=min(limit + 1, DEFAULT_PIECE))
    parts: list[bytes] = []
    size = 0
    for part in decompressor.feed(body):
        size += len(part)
        if size > limit:
            raise TooLarge(f"is larger than {limit} bytes once decompressed")
        parts.append(part)
    decompressor.close()
    return b"".join(parts)


# --- strict JSON ------------------------------------------------------------------------


def looks_like_json(data: bytes) -> bool:
    """An object or array as a client's JSON reader finds it: Python's ``json`` (which
    the OpenAI and Anthropic SDKs call on any body, whatever its content type) reads
    bytes in the encoding ``json.detect_encoding`` tells from the first bytes (UTF-8,
    after a byte order mark, UTF-16 or UTF-32 with or without one) and skips any amount
    of whitespace before the value. So neither a long run of whitespace nor UTF-16 hides
    a JSON body here."""
    encoding = json.detect_encoding(data)
    if encoding in ("utf-8", "utf-8-sig"):
        head = data[3:] if encoding == "utf-8-sig" else data
        return head.lstrip(_JSON_WHITESPACE)[:1] in (b"{", b"[")
    # Decoded a piece at a time: only the whitespace before the first character counts.
    decoder = codecs.getincrementaldecoder(encoding)("replace")
    for start in range(0, len(data) + 1, DEFAULT_PIECE):
        piece = data[start : start + DEFAULT_PIECE]
        text = decoder.decode(piece, final=len(piece) < DEFAULT_PIECE)
        text = text.lstrip(_JSON_WHITESPACE_TEXT)
        if text:
            return text[0] in "{["
    return False


def strict_json(data: bytes) -> Any:
    """``data`` as strict JSON, or ``DecodingError`` saying why not. orjson itself refuses
    a byte order mark, UTF-16 and UTF-32 (they are told apart only in the error path, to
    keep the usual event at one parse and one comparison)."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if data.startswith(_BOMS[0]):
            raise DecodingError("starts with a UTF-8 byte order mark") from None
        if data.startswith(_BOMS) or b"\x00" in data[:4]:
            raise DecodingError("is UTF-16 or UTF-32: JSON must be UTF-8") from None
        raise DecodingError(f"is not valid JSON ({exc})") from None
    try:
        if type(payload) is dict and orjson.dumps(payload) == data:
            return payload  # compact JSON written back byte for byte: no member dropped
    except orjson.JSONEncodeError:
        pass  # deeper than orjson writes: has_duplicate_keys takes the slow way
    if has_duplicate_keys(data, payload):
        # The key is not named: it may be the very text a policy would refuse to echo.
        raise DecodingError("has an object with a repeated key")
    return payload


def has_duplicate_keys(data: bytes, payload: Any) -> bool:
    """Whether some object in the JSON text ``data`` repeats a key; ``payload`` is what
    orjson parsed from it (one value per key).

    Exact, and cheap. ``orjson.dumps(payload)`` writes every key it kept once: when that
    is ``data`` itself (the compact JSON that httpx, and so the OpenAI and Anthropic
    SDKs, and JavaScript's ``JSON.stringify`` write), no member was dropped. Otherwise
    colons are counted: outside strings the text has one per object member, and orjson
    writes one per key kept and never escapes one inside a string; so, unless the text
    spells a colon as an escape (``\\u003a``), it has as many colons as orjson's exactly
    when no member was dropped (a dropped member takes at least its own colon with it).
    The rare text with such an escape, or nested deeper than orjson writes (254
    levels), goes to the standard library's parser, which shows every object's members.
    """
    try:
        written = orjson.dumps(payload)
    except orjson.JSONEncodeError:
        return _has_duplicate_keys_slowly(data)
    if written == data:
        return False
    if b"\\u003" in data:
        return _has_duplicate_keys_slowly(data)
    return written.count(b":") != data.count(b":")


class _RepeatedKey(Exception):
    pass


def _no_repeated_key(pairs: list[tuple[str, Any]]) -> None:
    if len({key for key, _ in pairs}) != len(pairs):
        raise _RepeatedKey


def _has_duplicate_keys_slowly(data: bytes) -> bool:
    try:
        json.loads(data, object_pairs_hook=_no_repeated_key)
    except _RepeatedKey:
        return True
    except RecursionError:
        raise DecodingError("is nested too deeply") from None
    return False


def _media_type(headers: Mapping[str, str]) -> tuple[str, str | None]:
    """The content type's media type (lower case) and its charset parameter, if any."""
    media, *params = headers.get("content-type", "").split(";")
    charset = None
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return media.strip().lower(), charset


def _check_charset(charset: str | None) -> None:
    if charset is not None and charset not in _UTF8_NAMES:
        raise DecodingError(f"declares charset {charset!r}: JSON must be UTF-8")


# --- the edges ------------------------------------------------------------------------


def decode_request_body(
    headers: Mapping[str, str], body: bytes, *, path: str, limit: int
) -> tuple[bytes, Any]:
    """The request body as the backend is to get it (compression undone) and its strict
    JSON; ``None`` for an empty body or an upload relayed as bytes.

    Raises ``MalformedRequest`` (400) or ``RequestTooLarge`` (413).
    """
    if not body:
        return body, None
    try:
        codings = content_codings(headers)
        if codings:
            body = decompress(body, codings, limit)
        media, charset = _media_type(headers)
        if media == "multipart/form-data" and UPLOAD_ROUTE.fullmatch(path):
            return body, None
        _check_charset(charset)
        try:
            return body, strict_json(body)
        except DecodingError as exc:
            if looks_like_json(body):
                raise
            raise DecodingError(f"{exc}; {_ONLY_JSON}") from None
    except TooLarge as exc:
        raise RequestTooLarge(f"the request body {exc}") from None
    except DecodingError as exc:
        raise MalformedRequest(f"the request body {exc}") from None


_ONLY_JSON = (
    "while a policy that reads content is in force, the proxy takes JSON bodies only "
    "(and multipart/form-data uploads on the upload routes)"
)


def decode_request(tx: Transaction) -> None:
    """Decode ``tx.request``'s body strictly (``decode_request_body``), in place: the
    backend gets the decoded body without ``Content-Encoding``, and the record keeps it."""
    request = tx.request
    if not request.body:
        return
    limit = tx.services.settings.max_request_bytes
    body, payload = decode_request_body(
        request.headers, request.body, path=request.path, limit=limit
    )
    if body is not request.body:
        request.headers.pop("content-encoding", None)
        tx.trail.request_body = body
    request.set_body(body, payload)


def decode_response_body(
    headers: Mapping[str, str], body: bytes, *, limit: int
) -> tuple[bytes, Any]:
    """A buffered answer's body as the client is to get it (compression undone) and its
    JSON: strict JSON when its content type says JSON or it looks like JSON (an object
    or array); otherwise the JSON it holds if it is strict JSON, else ``None`` (text,
    audio: no JSON to read).

    Raises ``BackendBroken`` (502).
    """
    if not body:
        return body, None
    try:
        codings = content_codings(headers)
        if codings:
            body = decompress(body, codings, limit)
        media, charset = _media_type(headers)
        # The OpenAI SDK parses a body as JSON when its type ends in "json", and tries
        # to when it does not: what looks like JSON is read as JSON.
        if media.endswith("json") or looks_like_json(body):
            _check_charset(charset)
            return body, strict_json(body)
    except DecodingError as exc:
        raise BackendBroken(f"the backend's answer {exc}") from None
    try:
        return body, strict_json(body)
    except DecodingError:
        return body, None


def decode_response(tx: Transaction, headers: dict[str, str], body: bytes) -> bytes:
    """A buffered backend answer's body as the policies are to read it: decoded strictly
    (``decode_response_body``) while a policy that reads content is in force, else as it
    came. When its compression was undone, ``Content-Encoding`` leaves ``headers``."""
    if not tx.reads_content:
        return body
    limit = tx.services.settings.max_response_bytes
    decoded, _ = decode_response_body(headers, body, limit=limit)
    if decoded is not body:
        headers.pop("content-encoding", None)
    return decoded


def decoded_stream(headers: dict[str, str], source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A streamed answer's bytes with its compression undone as they arrive
    (``StreamDecompressor``; ``BackendBroken`` when they cannot be), and
    ``Content-Encoding`` taken out of ``headers``. Unencoded, ``source`` itself."""
    try:
        codings = content_codings(headers)
        if not codings:
            return source
        decompressor = StreamDecompressor(codings)
    except DecodingError as exc:
        raise BackendBroken(f"the backend's stream {exc}") from None
    del headers["content-encoding"]
    return _decompressed(source, decompressor)


async def _decompressed(
    source: AsyncIterator[bytes], decompressor: StreamDecompressor
) -> AsyncIterator[bytes]:
    try:
        async for data in source:
            for piece in decompressor.feed(data):
                yield piece
        decompressor.close()
    except DecodingError as exc:
        raise BackendBroken(f"the backend's stream {exc}") from None


def strict_event_data(payload: bytes) -> Any:
    """A stream event's data field (``Chunk.payload``) as strict JSON: ``None`` when it
    is empty (a comment, a bare ``event:``), else ``BackendBroken`` unless it is strict
    JSON. The caller deals with ``[DONE]`` first."""
    if not payload:
        return None
    try:
        return strict_json(payload)
    except DecodingError as exc:
        raise BackendBroken(f"an event of the backend's stream {exc}") from None


def check_stream_start(data: bytes) -> None:
    """The first bytes of a stream: ``BackendBroken`` on a byte order mark, which an
    EventSource client skips while the proxy's SSE decoder would not see the event."""
    if data.startswith(_BOMS):
        raise BackendBroken("the backend's stream starts with a byte order mark")


__all__ = [
    "UPLOAD_ROUTE",
    "DecodingError",
    "StreamDecompressor",
    "check_stream_start",
    "content_codings",
    "decode_request",
    "decode_request_body",
    "decode_response",
    "decode_response_body",
    "decoded_stream",
    "decompress",
    "has_duplicate_keys",
    "looks_like_json",
    "strict_event_data",
    "strict_json",
]
