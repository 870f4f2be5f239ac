"""Opening a connection to a backend: its addresses, a race between them, the egress
proxy, TLS.

- A host name's addresses come from ``getaddrinfo`` and are reused for ``dns_ttl``
  seconds (``BACKEND_DNS_TTL``; 0: asked for every connection). A failed resolution is
  not kept, and neither is an answer none of whose addresses could be reached.
- Several addresses race as RFC 8305 ("happy eyeballs") says: the next attempt starts
  250 ms after the previous one, or at once when it fails, without waiting for it to end;
  the first connected wins and the others are closed. A black-holed first address costs
  250 ms, not the whole connect timeout, and once: the address that answered goes
  first in the cache until DNS is asked again.
- The egress proxy comes from ``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY`` and
  ``NO_PROXY`` (either case), read by ``urllib.request.getproxies_environment()`` and
  matched by ``urllib.request.proxy_bypass_environment()``, as curl and httpx read them.
  An ``https://`` backend is reached through ``CONNECT host:port`` and TLS inside the
  tunnel; an ``http://`` backend gets its requests in absolute form
  (``GET http://host/path``) on a connection to the proxy. The proxy's credentials
  (``http://user:password@proxy:3128``) go as ``Proxy-Authorization: Basic`` and are
  shown nowhere.
- TLS trusts the system store (``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` honoured), or only
  ``BACKEND_CA_BUNDLE`` when set, and shows ``BACKEND_CLIENT_CERT`` to a backend that asks
  for a client certificate.

Everything here runs inside the client's connect timeout.
"""

from __future__ import annotations

import asyncio
import base64
import http
import ipaddress
import os
import re
import socket
import ssl
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from luthien_control.exceptions import BackendUnreachable, ConfigurationError
from luthien_control.settings import Network
from luthien_control.upstream.urls import display_url

HAPPY_EYEBALLS_DELAY = 0.25  # RFC 8305's "Connection Attempt Delay"
MAX_HEAD_BYTES = 64 * 1024  # the largest response head taken, a proxy's included
Address = tuple[int, tuple[Any, ...]]  # (family, sockaddr)
_SSL_SOURCE = re.compile(r" \(_ssl\.c:[0-9]+\)$")  # where in CPython: of no use to anyone
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})[ \r]")
# Which variable a proxy came from, per key of getproxies_environment(), for messages.
_VARIABLES = {"https": "HTTPS_PROXY", "http": "HTTP_PROXY", "all": "ALL_PROXY"}


class Proxy:
    """An egress proxy (an ``http://`` URL, the scheme optional as curl allows)."""

    __slots__ = ("authorization", "host", "port", "shown")

    def __init__(self, url: str, variable: str) -> None:
        if "://" not in url:
            url = f"http://{url}"
        self.shown = f"{display_url(url)} ({variable})"  # never its credentials
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:  # its text may quote part of the password: not kept as the cause
            raise ConfigurationError(f"invalid {variable}: {display_url(url)}") from None
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigurationError(
                f"invalid {variable}: {display_url(url)}: only http:// proxies are supported"
            )
        self.host = parts.hostname
        self.port = port or 80
        self.authorization: str | None = None
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.authorization = "Basic " + base64.b64encode(credentials.encode()).decode()

    def header(self) -> str:
        """The ``Proxy-Authorization`` line of a request to this proxy, or nothing."""
        if self.authorization is None:
            return ""
        return f"proxy-authorization: {self.authorization}\r\n"


class Proxies:
    """Which backends go through which proxy."""

    __slots__ = ("_bypass", "_http", "_https")

    def __init__(self, environment: Mapping[str, str]) -> None:
        def chosen(key: str) -> Proxy | None:
            for name in (key, "all"):
                if environment.get(name):
                    return Proxy(environment[name], _VARIABLES[name])
            return None

        self._https = chosen("https")
        self._http = chosen("http")
        self._bypass = {"no": environment["no"]} if environment.get("no") else None

    def __bool__(self) -> bool:
        return self._https is not None or self._http is not None

    def describe(self) -> str:
        """The proxies in force, for the start-up log (never their credentials)."""
        parts = []
        if self._https is not None:
            parts.append(f"https:// backends through {self._https.shown}")
        if self._http is not None:
            parts.append(f"http:// backends through {self._http.shown}")
        if self._bypass is not None:
            parts.append(f"except NO_PROXY={self._bypass['no']}")
        return ", ".join(parts)

    def for_origin(self, tls: bool, host: str, port: int) -> Proxy | None:
        proxy = self._https if tls else self._http
        if proxy is None or self._bypass is None:
            return proxy
        # NO_PROXY entries may name a port ("host:8443"); an IPv6 host is matched bare.
        named = host if ":" in host else f"{host}:{port}"
        # Documented since Python 2, missing from typeshed.
        if urllib.request.proxy_bypass_environment(named, self._bypass):  # type: ignore[attr-defined]
            return None
        return proxy


def tls_context(network: Network) -> ssl.SSLContext:
    """The TLS context for backends; a file that cannot be loaded is a
    ``ConfigurationError`` naming its setting."""
    try:
        context = ssl.create_default_context(
            cafile=str(network.ca_bundle) if network.ca_bundle else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"invalid BACKEND_CA_BUNDLE: cannot load {network.ca_bundle}: {_reason(exc)}"
        ) from None
    if network.client_key is not None and network.client_cert is None:
        raise ConfigurationError("BACKEND_CLIENT_KEY is set without BACKEND_CLIENT_CERT")
    if network.client_cert is not None:
        try:
            context.load_cert_chain(network.client_cert, network.client_key, password=_no_password)
        except (OSError, ssl.SSLError, _PasswordNeeded) as exc:
            files = ", ".join(str(f) for f in (network.client_cert, network.client_key) if f)
            raise ConfigurationError(
                f"invalid BACKEND_CLIENT_CERT: cannot load {files}: {_reason(exc)}"
            ) from None
    return context


def check_network(network: Network) -> None:
    """Raise the ``ConfigurationError`` a backend client on ``network`` would raise."""
    Proxies(network.proxies)
    if network.ca_bundle or network.client_cert or network.client_key:
        tls_context(network)


class _PasswordNeeded(Exception):
    def __str__(self) -> str:
        return "the key is encrypted; give it unencrypted"


def _no_password() -> str:
    # Without a callback, OpenSSL would ask for the password on the terminal.
    raise _PasswordNeeded


def _reason(exc: BaseException) -> str:
    reason = (isinstance(exc, OSError) and exc.strerror) or str(exc) or type(exc).__name__
    return _SSL_SOURCE.sub("", reason)


class Connector:
    """Opens connections: addresses cached, raced, through the proxy, with TLS."""

    __slots__ = ("_network", "_resolved", "_tls", "dns_ttl", "proxies")

    def __init__(self, network: Network) -> None:
        self.dns_ttl = network.dns_ttl
        self.proxies = Proxies(network.proxies)
        self._network = network
        # Files of the operator's are loaded now, so that a bad one stops the start; the
        # system store only when a backend is first reached over TLS.
        custom = network.ca_bundle or network.client_cert or network.client_key
        self._tls = tls_context(network) if custom else None
        self._resolved: dict[tuple[str, int], tuple[float, list[Address]]] = {}

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = tls_context(self._network)
        return self._tls

    async def connect(
        self,
        factory: Any,
        *,
        host: str,
        port: int,
        tls: bool,
        literal: Address | None,
        proxy: Proxy | None,
        url: str,
    ) -> Any:
        """A connected protocol from ``factory`` to ``host:port`` (``literal``: its
        address when ``host`` is an IP), over TLS if ``tls``, through ``proxy`` if any.
        Errors are ``OSError`` (the caller words them) or ``BackendUnreachable``."""
        loop = asyncio.get_running_loop()
        if proxy is None:
            sock = await self._open(host, port, literal)
        else:
            try:
                sock = await self._open(proxy.host, proxy.port, None)
            except OSError as exc:
                raise BackendUnreachable(
                    f"cannot connect to the egress proxy {proxy.shown} for "
                    f"{display_url(url)}: {_reason(exc)}"
                ) from exc
            if tls:
                try:
                    await _tunnel(loop, sock, proxy, host, port, url)
                except BaseException:
                    sock.close()
                    raise
        try:
            _, protocol = await loop.create_connection(
                factory,
                sock=sock,
                ssl=self._tls_context() if tls else None,
                server_hostname=host if tls else None,
            )
        except BaseException:
            sock.close()  # a no-op once the transport has it: it closes it itself
            raise
        return protocol

    async def _open(self, host: str, port: int, literal: Address | None) -> socket.socket:
        addresses = [literal] if literal is not None else await self._addresses(host, port)
        try:
            sock, winner = await race(addresses, HAPPY_EYEBALLS_DELAY)
        except OSError:
            self._resolved.pop((host, port), None)  # none answered: ask DNS again next time
            raise
        cached = self._resolved.get((host, port))
        if cached is not None and cached[1][0] != winner and winner in cached[1]:
            # The address that answered goes first until DNS is asked again: an address
            # that does not answer costs one attempt delay per TTL, not per connection.
            ordered = [winner, *(address for address in cached[1] if address != winner)]
            self._resolved[(host, port)] = (cached[0], ordered)
        return sock

    async def _addresses(self, host: str, port: int) -> list[Address]:
        """From the cache, or from ``getaddrinfo`` (in a thread) once the cached answer
        is ``dns_ttl`` seconds old."""
        loop = asyncio.get_running_loop()
        key = (host, port)
        cached = self._resolved.get(key)
        if cached is not None and loop.time() < cached[0]:
            return cached[1]
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        addresses = _interleave([(family, address) for family, _, _, _, address in infos])
        if self.dns_ttl > 0:
            self._resolved[key] = (loop.time() + self.dns_ttl, addresses)
        return addresses


def _interleave(addresses: list[Address]) -> list[Address]:
    """The families taking turns, in the resolver's order otherwise (RFC 8305, section 4):
    a family that does not work costs one attempt delay, not one per address."""
    families: dict[int, list[Address]] = {}
    for address in addresses:
        families.setdefault(address[0], []).append(address)
    if len(families) < 2:
        return addresses
    queues = list(families.values())
    return [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)]


def literal_address(host: str, port: int) -> Address | None:
    """The address of an IP literal (no DNS), or None for a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, port))


async def race(addresses: Sequence[Address], delay: float) -> tuple[socket.socket, Address]:
    """A connected socket to the first of ``addresses`` that answers (RFC 8305, section
    5): one attempt starts every ``delay`` seconds, or as soon as the previous one failed;
    the first to connect wins and every other attempt is cancelled or closed. Returns
    the socket and the address it reached."""
    loop = asyncio.get_running_loop()
    if len(addresses) == 1:
        return await _open_socket(loop, addresses[0]), addresses[0]
    attempts: list[asyncio.Task[socket.socket]] = []
    reached: dict[asyncio.Task[socket.socket], Address] = {}
    errors: list[BaseException] = []
    winner: socket.socket | None = None
    try:
        for number, address in enumerate(addresses, 1):
            attempt = loop.create_task(_open_socket(loop, address))
            attempts.append(attempt)
            reached[attempt] = address
            last = number == len(addresses)
            deadline = loop.time() + delay
            while winner is None:
                pending = {attempt for attempt in attempts if not attempt.done()}
                if not pending:
                    break
                timeout = None if last else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for finished in done:
                    error = finished.exception()
                    if error is not None:
                        errors.append(error)
                    elif winner is None:
                        winner, winning = finished.result(), reached[finished]
                if not last:
                    break  # the delay is over, or an attempt failed: the next one now
            if winner is not None:
                return winner, winning
        first = errors[0]
        if all(str(error) == str(first) for error in errors) or not isinstance(first, OSError):
            raise first
        raise OSError(f"Multiple exceptions: {', '.join(str(error) for error in errors)}")
    finally:
        for attempt in attempts:
            if not attempt.done():
                attempt.cancel()  # it closes its socket
            elif (
                not attempt.cancelled()
                and attempt.exception() is None
                and attempt.result() is not winner
            ):
                attempt.result().close()


async def _open_socket(loop: asyncio.AbstractEventLoop, address: Address) -> socket.socket:
    family, sockaddr = address
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, sockaddr)
    except OSError as exc:
        sock.close()
        if exc.errno is None:
            raise
        # The same words on every event loop (asyncio's own say "Connect call failed
        # (address)"), and the subclass of the errno: ConnectionRefusedError, ...
        raise OSError(exc.errno, os.strerror(exc.errno)) from None
    except BaseException:
        sock.close()
        raise
    return sock


async def _tunnel(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    proxy: Proxy,
    host: str,
    port: int,
    url: str,
) -> None:
    """``CONNECT host:port`` on ``sock``; returns once the proxy has answered 2xx. Only
    the head is read: nothing may follow it before the TLS handshake, which the client
    starts."""
    if not host.isascii():
        host = host.encode("idna").decode("ascii")
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = f"CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n{proxy.header()}\r\n"
    await loop.sock_sendall(sock, request.encode("ascii"))
    head = b""
    while b"\r\n\r\n" not in head:
        if len(head) > MAX_HEAD_BYTES:
            raise BackendUnreachable(
                f"the egress proxy {proxy.shown} sent an answer head larger than "
                f"{MAX_HEAD_BYTES} bytes to CONNECT {authority} ({display_url(url)})"
            )
        data = await loop.sock_recv(sock, 16384)
        if not data:
            raise BackendUnreachable(
                f"the egress proxy {proxy.shown} closed the connection to CONNECT "
                f"{authority} ({display_url(url)})"
            )
        head += data
    status = _STATUS_LINE.match(head)
    if status is None:
        raise BackendUnreachable(
            f"the egress proxy {proxy.shown} sent an invalid answer to CONNECT {authority} "
            f"({display_url(url)})"
        )
    code = int(status.group(1))
    if not 200 <= code < 300:
        # The proxy's own reason phrase is not shown: it is its text, not ours.
        try:
            phrase = f" {http.HTTPStatus(code).phrase}"
        except ValueError:
            phrase = ""
        raise BackendUnreachable(
            f"the egress proxy {proxy.shown} refused CONNECT {authority}: {code}{phrase} "
            f"({display_url(url)})"
        )
    if not head.endswith(b"\r\n\r\n"):
        raise BackendUnreachable(
            f"the egress proxy {proxy.shown} sent bytes after its answer to CONNECT "
            f"{authority} ({display_url(url)})"
        )


__all__ = [
    "HAPPY_EYEBALLS_DELAY",
    "MAX_HEAD_BYTES",
    "Connector",
    "Proxies",
    "Proxy",
    "check_network",
    "literal_address",
    "race",
    "tls_context",
]
