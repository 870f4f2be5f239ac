"""Building a policy tree from its definition: a mapping, a JSON or YAML text, a file.

A definition is ``{"type": NAME, "config": {...}}``. Every error is a
``PolicyConfigError`` whose ``path`` names the place in the tree:

- the root policy is ``""``, its ``type`` is ``type``, its config fields ``config.<field>``;
- a composite's members are named by their place in its config, without ``config.``:
  ``policies[1]``, ``policies[1].policies[0]``, ``cond_to_policy_map[0].policy``,
  ``cond_to_policy_map["<key>"]``, ``default_policy``; so a field of a nested member is
  ``policies[1].policies[0].config.patterns``;
- inside a field, ``.key`` and ``[i]``: ``config.patterns[2]``.

A policy's ``__init__`` raises ``PolicyConfigError`` with a path relative to itself
(``config.patterns[2]``, or a member's ``policies[3]...``); the loader prefixes it with
the policy's own place in the tree.

Whatever a file or a client sends, the loader answers with a ``PolicyConfigError``, never
a ``RecursionError``, a ``ValueError`` or a hang. Every limit is checked before the work
it protects:

- a policy file is read only up to ``MAX_POLICY_FILE_BYTES``;
- a document is refused while it is parsed once it is nested deeper than
  ``MAX_DOCUMENT_DEPTH`` (a scan of the JSON text; a YAML composer that counts levels);
  YAML merge keys (``<<``) are refused;
- the parsed data, whatever its origin (file, database, admin API), is walked without
  recursion before anything is built: at most ``MAX_DOCUMENT_DEPTH`` levels and
  ``MAX_DOCUMENT_VALUES`` values (YAML aliases can make shallow text deep, or small text
  large), JSON values only (64-bit integers, finite numbers; no YAML dates or sets);
- policies are nested at most ``MAX_POLICY_DEPTH`` deep.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from luthien_control.exceptions import PolicyConfigError
from luthien_control.policies import registry
from luthien_control.policies.base import Policy

_POLICY_KEYS = ("type", "config")

MAX_POLICY_FILE_BYTES = 1024 * 1024
"""A policy file larger than this (1 MiB) is refused before it is parsed."""
MAX_DOCUMENT_DEPTH = 200
"""Mappings and lists nested deeper than this are refused: far below Python's recursion
limit, and below the 255 levels that orjson, which stores policies, can write."""
MAX_DOCUMENT_VALUES = 100_000
"""A policy holding more values than this (counted as expanded: a YAML alias counts each
time it is used) is refused."""
MAX_POLICY_DEPTH = 64
"""Policies nested deeper than this (``SerialPolicy`` in ``SerialPolicy`` ...) are refused."""
MIN_INTEGER, MAX_INTEGER = -(2**63), 2**63 - 1
"""Integers outside this (64-bit) range are refused: the database cannot store them."""

# How deep the policy being built stands. Composites build their members through
# ``build_member`` with paths relative to themselves, so the depth cannot be read from
# the path; it is carried along the (single-threaded) build instead.
_policy_depth: ContextVar[int] = ContextVar("policy_depth", default=0)
# A JSON string (possibly unterminated, so that it never ends early) or a bracket.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def join_path(base: str, *parts: str | int) -> str:
    """``base`` extended by field names (``.name``) and list indices (``[i]``)."""
    for part in parts:
        if isinstance(part, int):
            base = f"{base}[{part}]"
        elif base and part.startswith("["):  # pydantic's "[key]": the key itself is wrong
            base = f"{base}{part}"
        elif base:
            base = f"{base}.{part}"
        else:
            base = part
    return base


def within(base: str, relative: str) -> str:
    """A path relative to ``base`` (``config.patterns[2]``) made absolute."""
    if not base or not relative:
        return base or relative
    return f"{base}{relative}" if relative.startswith("[") else f"{base}.{relative}"


def key_path(base: str, key: str) -> str:
    """``base["key"]``: an entry of a mapping whose keys are not names (condition JSON)."""
    return f"{base}[{json.dumps(key)}]"


def type_label(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


def check_keys(data: Mapping[str, Any], keys: tuple[str, str], what: str, path: str) -> None:
    """``data`` has exactly the two ``keys``: an unknown or a missing one is an error at
    its own path (``what``: "a policy", "an entry")."""
    for key in data:
        if key not in keys:
            raise PolicyConfigError(
                f"unknown key {key!r}: {what} has only {keys[0]!r} and {keys[1]!r}",
                path=join_path(path, str(key)),
            )
    for key in keys:
        if key not in data:
            raise PolicyConfigError(f"missing {key!r}", path=join_path(path, key))


def load_policy(data: Any, path: str = "") -> Policy:
    """Build the policy (and its members) that ``data`` defines; ``path`` is its place.

    The whole tree is checked (``check_document``) before its root is built; each member
    is refused once it would stand deeper than ``MAX_POLICY_DEPTH``.
    """
    depth = _policy_depth.get()
    if depth == 0:
        check_document(data, path)
    elif depth >= MAX_POLICY_DEPTH:
        raise PolicyConfigError(
            f"policies nested deeper than {MAX_POLICY_DEPTH} levels (the limit)", path=path
        )
    token = _policy_depth.set(depth + 1)
    try:
        return _build(data, path)
    finally:
        _policy_depth.reset(token)


def _build(data: Any, path: str) -> Policy:
    if not isinstance(data, Mapping):
        raise PolicyConfigError(
            f"a policy must be a mapping with 'type' and 'config', got {type_label(data)}",
            path=path,
        )
    check_keys(data, _POLICY_KEYS, "a policy", path)

    type_name = data["type"]
    if not isinstance(type_name, str):
        raise PolicyConfigError(
            f"must be a string, got {type_label(type_name)}", path=join_path(path, "type")
        )
    raw = data["config"]
    if not isinstance(raw, Mapping):
        raise PolicyConfigError(
            f"must be a mapping, got {type_label(raw)}", path=join_path(path, "config")
        )

    cls = registry.resolve(type_name, join_path(path, "type"))
    raw_config = copy.deepcopy(dict(raw))
    try:
        config = cls.Config.model_validate(raw_config, strict=True)
    except ValidationError as exc:
        raise _translate(exc, join_path(path, "config")) from exc
    try:
        policy = cls(config, raw_config)
    except PolicyConfigError as exc:
        # Raised with a path relative to the policy; give it the absolute one.
        raise PolicyConfigError(exc.reason, path=within(path, exc.path)) from exc.__cause__
    except Exception as exc:  # a custom policy's own failure is still a config error
        raise PolicyConfigError(
            f"{type_name} could not be built: {type(exc).__name__}: {exc}", path=path
        ) from exc
    policy.loaded_as = type_name
    return policy


def build_member(data: Any, path: str) -> Policy:
    """Build a composite's member; ``path`` is relative to the composite (``policies[2]``)."""
    return load_policy(data, path)


def load_policy_text(text: str, fmt: Literal["json", "yaml"], source: str = "<text>") -> Policy:
    """Build the policy defined by a JSON or YAML text; ``source`` names it in errors."""
    return load_policy(parse_text(text, fmt, source))


def load_policy_file(path: str | os.PathLike[str]) -> Policy:
    """Build the policy defined by a file: ``.json`` is JSON, ``.yaml``/``.yml`` YAML,
    anything else JSON if it parses as JSON, else YAML."""
    file = Path(path)
    text = read_policy_file(file)
    suffix = file.suffix.lower()
    if suffix == ".json":
        data = parse_text(text, "json", str(file))
    elif suffix in (".yaml", ".yml"):
        data = parse_text(text, "yaml", str(file))
    else:
        try:
            data = parse_text(text, "json", str(file))
        except PolicyConfigError:
            data = parse_text(text, "yaml", str(file))
    return load_policy(data)


def read_policy_file(file: Path) -> str:
    """The text of a policy file: UTF-8 (a byte-order mark is skipped), at most
    ``MAX_POLICY_FILE_BYTES``; anything else is a ``PolicyConfigError``."""
    try:
        with file.open("rb") as stream:
            raw = stream.read(MAX_POLICY_FILE_BYTES + 1)
    except OSError as exc:
        raise PolicyConfigError(
            f"cannot read policy file {str(file)!r}: {exc.strerror or exc}"
        ) from exc
    except ValueError as exc:  # a path with a NUL character
        raise PolicyConfigError(f"cannot read policy file {str(file)!r}: {exc}") from exc
    if len(raw) > MAX_POLICY_FILE_BYTES:
        raise PolicyConfigError(
            f"cannot read policy file {str(file)!r}: larger than "
            f"{MAX_POLICY_FILE_BYTES} bytes (the limit)"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PolicyConfigError(
            f"cannot read policy file {str(file)!r}: not UTF-8 text "
            f"({exc.reason} at byte {exc.start})"
        ) from exc


def parse_text(text: str, fmt: Literal["json", "yaml"], source: str) -> Any:
    """The data in a JSON or YAML policy text; syntax errors name the line.

    Neither parser goes deeper than ``MAX_DOCUMENT_DEPTH``; the values are checked
    (``check_document``) when the data is loaded as a policy.
    """
    if not text.strip():
        raise PolicyConfigError(f"policy {source!r} is empty")
    if fmt == "json":
        _check_json_depth(text, source)
        try:
            return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_int=_json_integer)
        except json.JSONDecodeError as exc:
            raise PolicyConfigError(
                f"invalid JSON in {source!r} at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from exc
        except _DuplicateKey as exc:
            raise PolicyConfigError(f"invalid JSON in {source!r}: {exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictSafeLoader)  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise PolicyConfigError(f"invalid YAML in {source!r}{where}: {problem}") from exc
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, ...)
        line, column = _line_and_column(text, exc.position)
        character = chr(exc.character) if isinstance(exc.character, int) else exc.character
        raise PolicyConfigError(
            f"invalid YAML in {source!r} at line {line}, column {column}: "
            f"character {character!r} is not allowed"
        ) from exc
    except yaml.YAMLError as exc:
        raise PolicyConfigError(f"invalid YAML in {source!r}: {exc}") from exc
    if data is None:
        raise PolicyConfigError(f"policy {source!r} is empty")
    return data


def check_document(data: Any, path: str = "") -> None:
    """Refuse data that is not a bounded JSON document: nested deeper than
    ``MAX_DOCUMENT_DEPTH``, more than ``MAX_DOCUMENT_VALUES`` values, an integer beyond
    64 bits, a number that is not finite, or a value JSON does not have (a YAML date,
    set or binary); keys are left to the policies' own checks. Iterative, and it stops at
    the first problem, so neither deep nor aliased (even cyclic) data can make it recurse
    or run long."""
    # Entries: (value, depth of the mapping or list holding it, its path as a linked list).
    stack: list[tuple[Any, int, _Link]] = [(data, 0, None)]
    values = 1  # counted as they are queued, so that the stack stays within the limit
    while stack:
        value, depth, link = stack.pop()
        if isinstance(value, Mapping | list):
            if depth >= MAX_DOCUMENT_DEPTH:
                raise PolicyConfigError(
                    f"nested deeper than {MAX_DOCUMENT_DEPTH} levels (the limit)",
                    path=_render(path, link),
                )
            items: list[tuple[str | int, Any]] = (
                [(key if isinstance(key, str) else str(key), item) for key, item in value.items()]
                if isinstance(value, Mapping)
                else list(enumerate(value))
            )
            values += len(items)
            if values > MAX_DOCUMENT_VALUES:
                raise PolicyConfigError(
                    f"more than {MAX_DOCUMENT_VALUES} values (the limit)", path=path
                )
            for key, item in reversed(items):  # popped in document order
                stack.append((item, depth + 1, (link, key)))
        elif isinstance(value, _BigInteger):
            raise PolicyConfigError(
                f"an integer of {value.digits} digits is out of range (64-bit integers only)",
                path=_render(path, link),
            )
        elif value is None or isinstance(value, str | bool):
            continue
        elif isinstance(value, int):
            if not MIN_INTEGER <= value <= MAX_INTEGER:
                raise PolicyConfigError(
                    f"an integer {_abbreviated(value)} is out of range (64-bit integers only)",
                    path=_render(path, link),
                )
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise PolicyConfigError(f"{value} is not a JSON number", path=_render(path, link))
        else:
            hint = "; quote it to make it a string" if isinstance(value, date) else ""
            raise PolicyConfigError(
                f"a {type_label(value)} is not a JSON value{hint}", path=_render(path, link)
            )


_Link = tuple["_Link", str | int] | None


def _render(base: str, link: _Link) -> str:
    """The path a linked list of keys and indices names, after ``base``."""
    parts: list[str | int] = []
    while link is not None:
        link, part = link
        parts.append(part)
    path = base
    for part in reversed(parts):
        if isinstance(part, int) or _NAME.fullmatch(part):
            path = join_path(path, part)
        else:
            path = key_path(path, part)
    return path


def _abbreviated(number: int) -> str:
    if number.bit_length() > 100:  # str() of a huge integer is slow, or refused
        return f"of {number.bit_length()} bits"
    return str(number)


def _line_and_column(text: str, position: int) -> tuple[int, int]:
    line = text.count("\n", 0, position) + 1
    return line, position - text.rfind("\n", 0, position)


def _check_json_depth(text: str, source: str) -> None:
    """Refuse JSON nested deeper than ``MAX_DOCUMENT_DEPTH`` before the (recursive)
    parser sees it: one pass over strings and brackets."""
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        bracket = text[match.start()]
        if bracket in "[{":
            depth += 1
            if depth > MAX_DOCUMENT_DEPTH:
                line, column = _line_and_column(text, match.start())
                raise PolicyConfigError(
                    f"invalid JSON in {source!r} at line {line}, column {column}: "
                    f"nested deeper than {MAX_DOCUMENT_DEPTH} levels (the limit)"
                )
        elif bracket in "]}":
            depth -= 1


class _BigInteger(str):
    """An integer too long for ``int()`` (Python's 4,300-digit limit), kept as its text
    so that ``check_document`` can refuse it with its path."""

    @property
    def digits(self) -> int:
        return len(self.lstrip("+-"))


def _json_integer(text: str) -> int | _BigInteger:
    try:
        return int(text)
    except ValueError:
        return _BigInteger(text)


def _translate(exc: ValidationError, base: str) -> PolicyConfigError:
    """One error for all of pydantic's: at the first one's path, listing the others."""
    errors = [
        (join_path(base, *error["loc"]), error["msg"].removeprefix("Value error, "))
        for error in exc.errors()
    ]
    first_path, first_msg = errors[0]
    rest = [f"{where}: {msg}" for where, msg in errors[1:]]
    return PolicyConfigError("; ".join([first_msg, *rest]), path=first_path)


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated key would silently replace an earlier one (a whole branch, say).
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"duplicate key {key!r}")
        result[key] = value
    return result


class _StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key repeated in one mapping and merge keys
    (``<<``: JSON has none, and they copy, so a few lines could expand exponentially),
    refuses documents nested deeper than ``MAX_DOCUMENT_DEPTH`` (its composer recurses),
    and keeps integers too long for ``int()`` for ``check_document`` to refuse with their
    path."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        if self._depth >= MAX_DOCUMENT_DEPTH:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"nested deeper than {MAX_DOCUMENT_DEPTH} levels (the limit)",
                self.peek_event().start_mark,  # type: ignore[no-untyped-call]
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(
                    None, None, "merge keys (<<) are not supported", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:  # an impossible date (2026-13-45), ...
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {exc}", node.start_mark
            ) from exc


def _construct_integer(loader: _StrictSafeLoader, node: yaml.ScalarNode) -> int | _BigInteger:
    try:
        return loader.construct_yaml_int(node)
    except ValueError:  # beyond int()'s digit limit
        return _BigInteger(loader.construct_scalar(node))


_StrictSafeLoader.add_constructor("tag:yaml.org,2002:int", _construct_integer)
