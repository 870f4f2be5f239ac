"""URLs as the proxy shows and forwards them: without credentials (``display_url``), and
paths that could climb out of a backend's API root refused (``has_dot_segment``)."""

from __future__ import annotations

import re
from urllib.parse import unquote

REDACTED = "[REDACTED]"
# A query parameter whose name holds one of these (any case) carries a credential.
_SECRET_PARAM = re.compile(r"key|token|secret|passw|pwd|auth|sig|credential|session|cookie", re.I)
_HOST_PORT = re.compile(r"(?:\[[0-9A-Fa-f:.]*\]|[^:@\[\]]*)(?::[0-9]*)?")  # a clean authority
_DECODE_ROUNDS = 4  # percent-decodings undone when looking for dot segments (%252e: twice)
_SEPARATORS = re.compile(r"[/\\]")  # a backslash separates segments for some servers
DOT_SEGMENT_REFUSED = (
    "the request path holds a '.' or '..' segment (as written or percent-encoded); "
    "such a path is not forwarded"
)


def display_url(url: str) -> str:
    """``url`` as people may see it, in error messages, records and logs: without its
    userinfo (``user:password@``) or fragment, and with the value of every query parameter
    whose name suggests a credential (``api_key``, ``token``, ``sig``, ``password``, ...)
    replaced by ``[REDACTED]``.

    It never fails, whatever the string: in a URL that does not parse, everything up to
    the last ``@`` may be a password holding ``/``, ``?`` or ``#``, and goes.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    end = len(rest)
    for mark in "/?#":
        found = rest.find(mark)
        if 0 <= found < end:
            end = found
    authority = rest[:end]
    if "@" in authority:
        rest = rest[authority.rindex("@") + 1 :]
    elif "@" in rest and not _HOST_PORT.fullmatch(authority):
        rest = rest[rest.rindex("@") + 1 :]
    rest = rest.partition("#")[0]
    path, question, query = rest.partition("?")
    if question:
        query = "&".join(map(_display_param, query.split("&")))
    return f"{scheme}{separator}{path}{question}{query}"


def _display_param(param: str) -> str:
    name, equals, _ = param.partition("=")
    if equals and _SECRET_PARAM.search(unquote(name)):
        return f"{name}={REDACTED}"
    return param


def has_dot_segment(path: str) -> bool:
    """Whether a backend could read a ``.`` or ``..`` segment in ``path``.

    Such a path is refused, not resolved. Resolving would have to guess how the backend
    reads the path (how many times it percent-decodes, whether ``%2f`` or ``\\``
    separates segments, whether ``..;`` is ``..``), and a wrong guess lets the path climb
    out of the backend's API root (``/v1/../internal``) after the policies judged
    another one. No client of these APIs writes dot segments, so refusing every reading
    costs nothing: the path is percent-decoded until it no longer changes, split at
    ``/`` and ``\\``, and a segment that is ``.`` or ``..`` (before any ``;``) is one. A
    path still changing after ``_DECODE_ROUNDS`` decodings counts as one too.
    """
    if "." not in path and "%" not in path:  # the usual path: nothing to decode
        return False
    decoded = path
    for _ in range(_DECODE_ROUNDS):
        once = unquote(decoded, encoding="latin-1")
        if once == decoded:
            break
        decoded = once
    else:
        return True
    return any(segment.partition(";")[0] in (".", "..") for segment in _SEPARATORS.split(decoded))


__all__ = ["DOT_SEGMENT_REFUSED", "REDACTED", "display_url", "has_dot_segment"]
