"""The operator console: server-rendered pages under ``/admin/``, behind ``ADMIN_API_KEY``.

Everything is rendered on the server (Jinja2, every value escaped: a prompt is hostile
input) and reads without JavaScript; one small script adds what needs it (new
transactions appearing live). Signing in with ``ADMIN_API_KEY`` and a name starts a
session (``db/sessions.py``): an HttpOnly, SameSite=Strict cookie that expires after
``ADMIN_SESSION_LIFETIME`` seconds, stored as a hash in the database so that every
worker knows it and signing out ends it everywhere. Every form that changes something
carries a token derived from the session (``csrf_token``) and its ``Origin`` must be the
console's own. Every answer carries a strict Content-Security-Policy (scripts and styles
from ``/admin/static/`` only, nothing inline), ``no-store`` and ``nosniff``. Without
``ADMIN_API_KEY`` the console is off: every page answers 404.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
import markupsafe
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from luthien_control.app import Services
from luthien_control.exceptions import LuthienError

PREFIX = "/admin"
COOKIE = "lc_console"
FAILED_SIGN_IN_DELAY = 1.0  # seconds before a wrong key is answered (slows guessing)
MAX_FORM_BYTES = 256 * 1024
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # not no-referrer: under it, a browser sends "Origin: null" with its own forms
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}

Page = Callable[[Request, "Visit"], Awaitable[Response]]


class Visit:
    """The signed-in operator behind a request."""

    def __init__(self, token: str, label: str) -> None:
        self.token = token
        self.label = label

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)


def csrf_token(session_token: str) -> str:
    """The token every state-changing form of a session carries: derived from the
    session's secret cookie (which scripts cannot read), so another site cannot know it."""
    return hmac.new(session_token.encode(), b"luthien-console-csrf", hashlib.sha256).hexdigest()


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("luthien_control.console", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["ms"] = _ms
    env.filters["marked"] = marked
    return env


def marked(text: Any) -> markupsafe.Markup:
    """``text`` escaped, with each ``[REDACTED]`` (where a secret was) highlighted."""
    escaped = markupsafe.escape("" if text is None else str(text))
    return markupsafe.Markup(
        escaped.replace("[REDACTED]", markupsafe.Markup('<mark class="redacted">[REDACTED]</mark>'))
    )


def _when(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ms(value: Any) -> str:
    return "" if value is None else f"{float(value):,.1f} ms"


class Console:
    """The console's ASGI app, mounted by ``LuthienProxy`` at ``/admin/``."""

    def __init__(self, services: Services) -> None:
        from luthien_control.console import pages, policies

        self.services = services
        self.templates = _templates()
        routes = [
            Route(f"{PREFIX}/", self._signed_in(pages.overview), methods=["GET"]),
            Route(f"{PREFIX}/sign-in", self.sign_in_form, methods=["GET"]),
            Route(f"{PREFIX}/sign-in", self.sign_in, methods=["POST"]),
            Route(f"{PREFIX}/sign-out", self._signed_in(self.sign_out), methods=["POST"]),
            Route(f"{PREFIX}/traffic", self._signed_in(pages.traffic), methods=["GET"]),
            Route(
                f"{PREFIX}/transactions/{{transaction_id}}",
                self._signed_in(pages.transaction),
                methods=["GET"],
            ),
            Route(
                f"{PREFIX}/transactions/{{transaction_id}}/review",
                self._signed_in(pages.add_review),
                methods=["POST"],
            ),
            Route(f"{PREFIX}/review", self._signed_in(pages.review), methods=["GET"]),
            Route(f"{PREFIX}/keys", self._signed_in(pages.keys), methods=["GET"]),
            Route(f"{PREFIX}/keys", self._signed_in(pages.create_key), methods=["POST"]),
            Route(
                f"{PREFIX}/keys/revoke",
                self._signed_in(pages.revoke_key),
                methods=["POST"],
            ),
            Route(f"{PREFIX}/policies", self._signed_in(policies.policies), methods=["GET"]),
            Route(f"{PREFIX}/policy", self._signed_in(policies.policy), methods=["GET"]),
            Route(f"{PREFIX}/policies/save", self._signed_in(policies.save), methods=["POST"]),
            Route(
                f"{PREFIX}/policies/activate",
                self._signed_in(policies.activate),
                methods=["POST"],
            ),
            Route(
                f"{PREFIX}/policies/dry-run",
                self._signed_in(policies.dry_run),
                methods=["POST"],
            ),
            Route(f"{PREFIX}/static/{{name}}", self.static, methods=["GET"]),
        ]
        # No redirect to the path with or without a slash: it would be built from the
        # request's Host header.
        self.router = Router(routes=routes, redirect_slashes=False, default=self.not_found)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.services.settings.admin_api_key:
            response = self.render(None, "off.html", status=404, title="Console off", visit=None)
            await response(scope, receive, send)
            return
        scope["luthien_console"] = self

        async def send_secured(message: MutableMapping[str, Any]) -> None:
            # Every answer, Starlette's own (a 405) included, carries the headers.
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *(
                        (name.encode(), value.encode())
                        for name, value in SECURITY_HEADERS.items()
                        if name.encode() not in names
                    ),
                ]
            await send(message)

        await self.router(scope, receive, send_secured)

    @property
    def _engine(self) -> Any:
        return self.services.engine

    @property
    def _admin_key(self) -> str:
        return self.services.settings.admin_api_key or ""

    async def not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = self.render(
            request, "error.html", status=404, title="Not found", message="No such page."
        )
        await response(scope, receive, send)

    # -- rendering ------------------------------------------------------------------------

    def render(
        self, request: Request | None, template: str, *, status: int = 200, **context: Any
    ) -> Response:
        context.setdefault("visit", None)
        html = self.templates.get_template(template).render(prefix=PREFIX, **context)
        return secure(HTMLResponse(html, status_code=status))

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        suffix = name[name.rfind(".") :] if "." in name else ""
        folder = resources.files("luthien_control.console") / "static"
        if "/" in name or name.startswith(".") or suffix not in STATIC_TYPES:
            return secure(Response("not found", status_code=404))
        file = folder / name
        if not file.is_file():
            return secure(Response("not found", status_code=404))
        response = Response(file.read_bytes(), media_type=STATIC_TYPES[suffix])
        secure(response)
        response.headers["cache-control"] = "private, max-age=300"
        return response

    # -- sessions -------------------------------------------------------------------------

    def _signed_in(self, page: Page) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            from luthien_control.db.sessions import find_session

            token = request.cookies.get(COOKIE, "")
            found = await find_session(self._engine, token, self._admin_key) if token else None
            if found is None:
                if request.method != "GET":
                    return self.render(
                        request,
                        "sign_in.html",
                        status=403,
                        title="Sign in",
                        error="Your session has ended: sign in again.",
                        next=PREFIX + "/",
                    )
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return secure(
                    RedirectResponse(f"{PREFIX}/sign-in?next={quote(target)}", status_code=303)
                )
            visit = Visit(token, found.label)
            if request.method == "POST":
                form = await read_form(request)
                if not _same_origin(request) or not hmac.compare_digest(
                    form.get("csrf", ""), visit.csrf
                ):
                    return self.render(
                        request,
                        "error.html",
                        status=403,
                        title="Refused",
                        visit=visit,
                        message="This form did not come from this console (a missing or "
                        "wrong CSRF token, or another origin): nothing was changed.",
                    )
                request.state.form = form
            try:
                return await page(request, visit)
            except LuthienError as exc:
                return self.render(
                    request,
                    "error.html",
                    status=exc.status_code,
                    title="Error",
                    visit=visit,
                    message=exc.message,
                )

        return endpoint

    async def sign_in_form(self, request: Request) -> Response:
        return self.render(
            request,
            "sign_in.html",
            title="Sign in",
            error=None,
            next=_local_target(request.query_params.get("next")),
        )

    async def sign_in(self, request: Request) -> Response:
        from luthien_control.db.sessions import start_session

        form = await read_form(request)
        target = _local_target(form.get("next"))
        expected = self.services.settings.admin_api_key or ""
        given = form.get("key", "")
        label = form.get("name", "").strip()
        error = None
        if not _same_origin(request):
            error = "This form did not come from this console."
        elif not hmac.compare_digest(given.encode(), expected.encode()):
            await failed_attempt()
            error = "Wrong admin key."
        elif not label:
            error = "Give your name: it is shown on the reviews you make."
        if error is None:
            try:
                session = await start_session(
                    self._engine,
                    label,
                    self.services.settings.admin_session_lifetime,
                    self._admin_key,
                )
            except LuthienError as exc:
                error = exc.message
        if error is not None:
            return self.render(
                request, "sign_in.html", status=400, title="Sign in", error=error, next=target
            )
        response = secure(RedirectResponse(target, status_code=303))
        response.set_cookie(
            COOKIE,
            session.token,
            max_age=int(self.services.settings.admin_session_lifetime),
            path=PREFIX,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def sign_out(self, request: Request, visit: Visit) -> Response:
        from luthien_control.db.sessions import end_session

        await end_session(self._engine, visit.token, self._admin_key)
        response = secure(RedirectResponse(f"{PREFIX}/sign-in", status_code=303))
        response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
        return response


_FAILURES = asyncio.Lock()


async def failed_attempt() -> None:
    """A wrong admin key, at sign-in or on the admin API: answered after
    ``FAILED_SIGN_IN_DELAY``, one wrong attempt at a time per worker, so that guessing in
    parallel is no faster than guessing in turn. A right key never waits here."""
    async with _FAILURES:
        await asyncio.sleep(FAILED_SIGN_IN_DELAY)


def secure(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (all the console's forms send), at
    most ``MAX_FORM_BYTES``; the last value of a repeated field."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != (
        "application/x-www-form-urlencoded"
    ):
        return {}
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[-1] for name, values in fields.items()}


def _same_origin(request: Request) -> bool:
    """A browser names the page a form was sent from in ``Origin`` (or ``Referer``): it
    must be this console. A request with neither (not a browser) passes this check; the
    CSRF token is still required."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return origin is None
    parts = urlsplit(origin)
    host = request.headers.get("host", "")
    return parts.netloc == host and parts.scheme == request.url.scheme


def _local_target(target: str | None) -> str:
    """Where to go after signing in: a console page only (never another site)."""
    if not target or not target.startswith(PREFIX + "/") or target.startswith("//"):
        return PREFIX + "/"
    if "\\" in target or any(ord(c) < 0x21 for c in target):
        return PREFIX + "/"
    return target
