"""The console's Policies pages: the policy in force as a tree, the stored policies and
every version of each, an editor (JSON or YAML) whose errors name the path, putting a
version in force, and a dry run of an edited policy on a recorded transaction
(``replay.py``).

A stored policy is addressed by a query or form field (``name``), never by a path
segment: a name may hold ``/`` or ``..``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal
from urllib.parse import urlencode

import markupsafe
import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from luthien_control.console import PREFIX, Visit, secure
from luthien_control.console.conversation import answer_turns
from luthien_control.exceptions import ClientError, NotFound, PolicyConfigError

SETTING_CHARS = 300  # a setting's value shown in the tree, at most
BODY_CHARS = 64 * 1024  # a dry run's answer shown whole up to this
_TRANSACTION_ID = re.compile(r"[0-9a-f]{32}")


def _render(request: Request, template: str, **context: Any) -> Response:
    console = request.scope["luthien_console"]
    return console.render(request, template, **context)  # type: ignore[no-any-return]


def _services(request: Request) -> Any:
    return request.scope["luthien_console"].services


def _form(request: Request) -> dict[str, str]:
    form: dict[str, str] = request.state.form
    return form


# -- the tree ---------------------------------------------------------------------------


def _is_policy(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("type"), str)
        and set(value)
        <= {
            "type",
            "config",
        }
    )


def tree(definition: Any, path: str = "") -> dict[str, Any]:
    """A policy definition as nested nodes: each policy's type, name and settings (its
    config's values that are not policies, as short JSON), and its member policies with
    the path that leads to them (``policies[2]``, ``cond_to_policy_map[0].policy``).
    Iterative: a tree as deep as the loader allows renders without recursion here."""
    root: dict[str, Any] = {}
    stack: list[tuple[Any, str, dict[str, Any]]] = [(definition, path, root)]
    while stack:
        value, where, node = stack.pop()
        config = value.get("config") if isinstance(value, dict) else None
        config = config if isinstance(config, dict) else {}
        node.update(
            type=str(value.get("type", "?")) if isinstance(value, dict) else "?",
            name=str(config.get("name", "")),
            path=where,
            settings=[],
            children=[],
        )
        # The config's leaves that hold no policy are settings; each policy is a child.
        leaves: list[tuple[Any, str]] = [
            (child, key) for key, child in config.items() if key != "name"
        ]
        pending: list[tuple[Any, str, dict[str, Any]]] = []
        while leaves:
            item, at = leaves.pop(0)
            if _is_policy(item):
                child: dict[str, Any] = {}
                node["children"].append(child)
                # As the loader names it in errors: policies[2].config.policies[0]
                pending.append((item, f"{where}.config.{at}" if where else at, child))
            elif _holds_policy(item):
                if isinstance(item, dict):
                    leaves[:0] = [(v, f"{at}.{k}") for k, v in item.items()]
                else:
                    leaves[:0] = [(v, f"{at}[{i}]") for i, v in enumerate(item)]
            else:
                node["settings"].append((at, _short(item)))
        stack.extend(reversed(pending))
    return root


def tree_html(root: dict[str, Any]) -> markupsafe.Markup:
    """``tree``'s nodes as nested lists, every value escaped; built without recursion
    (a template macro would recurse once per level of the tree)."""
    out: list[str] = ['<ul class="tree">']
    stack: list[dict[str, Any] | None] = [root]
    while stack:
        node = stack.pop()
        if node is None:  # the end of a node's members
            out.append("</ul></li>")
            continue
        esc = markupsafe.escape
        out.append('<li><span class="node">')
        out.append(f'<strong class="type">{esc(node["type"])}</strong>')
        if node["name"]:
            out.append(f' <span class="name">{esc(node["name"])}</span>')
        if node["path"]:
            out.append(f' <code class="path">{esc(node["path"])}</code>')
        out.append("</span>")
        if node["settings"]:
            out.append('<dl class="settings">')
            for key, value in node["settings"]:
                out.append(f"<dt>{esc(key)}</dt><dd><code>{esc(value)}</code></dd>")
            out.append("</dl>")
        if node["children"]:
            out.append("<ul>")
            stack.append(None)
            stack.extend(reversed(node["children"]))
        else:
            out.append("</li>")
    out.append("</ul>")
    return markupsafe.Markup("".join(out))


def _holds_policy(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if _is_policy(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= SETTING_CHARS else text[:SETTING_CHARS] + "…"


def _pretty(definition: Any) -> str:
    return json.dumps(definition, indent=2, ensure_ascii=False)


# -- pages ------------------------------------------------------------------------------


async def policies(request: Request, visit: Visit) -> Response:
    from luthien_control.db.policies import list_policies

    services = _services(request)
    source = services.policy
    current = source.current if source is not None else None
    stored = await list_policies(services.engine)
    return _render(
        request,
        "policies.html",
        title="Policies",
        visit=visit,
        origin=source.origin if source is not None else "",
        from_file=services.settings.policy_filepath is not None,
        top_name=services.settings.top_level_policy_name,
        in_force=tree_html(tree(current.serialize())) if current is not None else None,
        stored=stored,
    )


async def policy(request: Request, visit: Visit) -> Response:
    name = request.query_params.get("name", "")
    version = request.query_params.get("version", "")
    if version and not version.isdigit():
        raise ClientError("'version' must be a version number")
    return await _policy_page(
        request, visit, name, int(version) if version else None, saved=request.query_params
    )


async def _policy_page(
    request: Request,
    visit: Visit,
    name: str,
    version: int | None,
    *,
    saved: Any = None,
    text: str | None = None,
    fmt: str = "json",
    error: str | None = None,
    transaction_id: str = "",
    status: int = 200,
) -> Response:
    from luthien_control.db.models import check_name
    from luthien_control.db.policies import list_versions

    check_name(name, "policy")
    services = _services(request)
    versions = await list_versions(services.engine, name)
    shown = None
    if version is not None:
        shown = next((v for v in versions if v.version == version), None)
        if shown is None:
            raise NotFound(f"the policy {name!r} has no version {version}")
    elif versions:
        shown = next((v for v in versions if v.in_force), versions[0])
    if text is None:
        if shown is not None:
            text = _pretty(shown.definition)
        else:  # a new policy starts from the one in force
            current = services.policy.current if services.policy is not None else None
            text = _pretty(current.serialize()) if current is not None else ""
    return _render(
        request,
        "policy.html",
        status=status,
        title=f"Policy {name}",
        visit=visit,
        name=name,
        versions=versions,
        shown=shown,
        shown_tree=tree_html(tree(shown.definition)) if shown is not None else None,
        text=text,
        fmt=fmt,
        error=error,
        transaction_id=transaction_id,
        saved=(saved or {}).get("saved", ""),
        activated=(saved or {}).get("activated", ""),
        in_force_here=name == services.settings.top_level_policy_name
        and services.settings.policy_filepath is None,
    )


def _edited(form: dict[str, str]) -> tuple[str, Literal["json", "yaml"], Any]:
    """The editor's text, its format, and the policy it defines (``PolicyConfigError``
    naming the path of the first error)."""
    from luthien_control.policies.loader import load_policy, parse_text

    text = form.get("definition", "")
    fmt: Literal["json", "yaml"] = "yaml" if form.get("format") == "yaml" else "json"
    return text, fmt, load_policy(parse_text(text, fmt, "the edited policy"))


async def _refused(
    request: Request, visit: Visit, form: dict[str, str], error: str, status: int = 400
) -> Response:
    """The policy's page again, the editor holding the text as sent, with ``error``."""
    return await _policy_page(
        request,
        visit,
        form.get("name", ""),
        None,
        text=form.get("definition", ""),
        fmt=form.get("format", "json"),
        error=error,
        transaction_id=form.get("transaction", "").strip().lower(),
        status=status,
    )


async def save(request: Request, visit: Visit) -> Response:
    from luthien_control.db.policies import save_policy

    form = _form(request)
    name = form.get("name", "")
    try:
        _text, _fmt, loaded = _edited(form)
        definition = loaded.serialize()
        try:  # what the JSON column will be given (YAML allows keys JSON has not)
            orjson.dumps(definition)
        except TypeError as exc:
            raise PolicyConfigError(f"the edited policy cannot be stored as JSON: {exc}") from exc
    except PolicyConfigError as exc:
        return await _refused(request, visit, form, exc.message)
    stored = await save_policy(
        _services(request).engine,
        name,
        definition,
        by=visit.label,
        activate=form.get("activate") == "1",
    )
    from luthien_control.db.policies import list_versions

    newest = (await list_versions(_services(request).engine, name))[0].version
    query = {"name": name, "saved": str(newest)}
    if stored.version == newest:
        query["activated"] = str(newest)
    return secure(RedirectResponse(f"{PREFIX}/policy?{urlencode(query)}", status_code=303))


async def activate(request: Request, visit: Visit) -> Response:
    from luthien_control.db.policies import activate_version

    form = _form(request)
    name = form.get("name", "")
    version = form.get("version", "")
    if not version.isdigit():
        raise ClientError("'version' must be a version number")
    stored = await activate_version(_services(request).engine, name, int(version))
    query = {"name": name, "activated": str(stored.version)}
    return secure(RedirectResponse(f"{PREFIX}/policy?{urlencode(query)}", status_code=303))


async def dry_run(request: Request, visit: Visit) -> Response:
    from luthien_control.db.transactions import get_transaction
    from luthien_control.replay import replay

    form = _form(request)
    name = form.get("name", "")
    transaction_id = form.get("transaction", "").strip().lower()
    try:
        text, fmt, loaded = _edited(form)
    except PolicyConfigError as exc:
        return await _refused(request, visit, form, exc.message)
    if not _TRANSACTION_ID.fullmatch(transaction_id):
        return await _refused(
            request,
            visit,
            form,
            "Give the id of a recorded transaction (32 hexadecimal digits) to dry-run on.",
        )
    services = _services(request)
    record = await get_transaction(services.engine, transaction_id)
    if record is None:
        return await _refused(
            request, visit, form, f"No transaction {transaction_id} is recorded.", 404
        )
    result = await replay(record, loaded, services.settings, judge_backend=services.judge_backend)
    now = result.record
    body = result.body.decode("utf-8", "replace")
    endpoint = str(record.get("endpoint", ""))
    return _render(
        request,
        "policy_dry_run.html",
        title=f"Dry run of {name}" if name else "Dry run",
        visit=visit,
        name=name,
        text=text,
        fmt=fmt,
        transaction_id=transaction_id,
        then=_side(record, endpoint),
        now=_side(now, endpoint),
        decisions=now.get("decisions") or [],
        body=body[:BODY_CHARS],
        body_cut=len(body) > BODY_CHARS,
        streamed=result.streamed,
    )


def _side(record: dict[str, Any], endpoint: str) -> dict[str, Any]:
    sent = (record.get("response") or {}).get("sent") or {}
    stream = sent.get("stream")
    return {
        "status": record.get("status"),
        "outcome": record.get("outcome"),
        "events": stream.get("chunks") if isinstance(stream, dict) else None,
        "turns": answer_turns(endpoint, sent),
        "error": record.get("error"),
    }
