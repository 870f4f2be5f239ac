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
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from luthien_control.exceptions import PolicyConfigError
from luthien_control.policies import registry
from luthien_control.policies.base import Policy

_POLICY_KEYS = ("type", "config")


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
    """Build the policy (and its members) that ``data`` defines; ``path`` is its place."""
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
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyConfigError(
            f"cannot read policy file {str(file)!r}: {exc.strerror or exc}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise PolicyConfigError(
            f"cannot read policy file {str(file)!r}: not UTF-8 text ({exc.reason})"
        ) from exc
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


def parse_text(text: str, fmt: Literal["json", "yaml"], source: str) -> Any:
    """The data in a JSON or YAML policy text; syntax errors name the line."""
    if not text.strip():
        raise PolicyConfigError(f"policy {source!r} is empty")
    if fmt == "json":
        try:
            return json.loads(text, object_pairs_hook=_no_duplicate_keys)
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
    except yaml.YAMLError as exc:
        raise PolicyConfigError(f"invalid YAML in {source!r}: {exc}") from exc
    if data is None:
        raise PolicyConfigError(f"policy {source!r} is empty")
    return data


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
    """``yaml.SafeLoader`` that rejects a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
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
