"""How the backend client opens connections: through an egress proxy on loopback, racing
a black-holed address, with the operator's CA bundle and client certificate, with DNS
answers kept as long as ``BACKEND_DNS_TTL`` says; and the bound on a response head."""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from luthien_control.exceptions import BackendBroken, BackendUnreachable, ConfigurationError
from luthien_control.settings import Limits, Network, Timeouts, load_settings
from luthien_control.upstream import BackendClient
from luthien_control.upstream import connect as connect_module
from luthien_control.upstream.client import _Connection, _Origin
from luthien_control.upstream.connect import (
    MAX_HEAD_BYTES,
    Connector,
    Proxies,
    check_network,
    race,
)
from tests.conftest import python_env
from tests.upstream.test_client import (
    CERT,
    KEY,
    answer,
    answering,
    backend,
    open_fails,
    tls_server_context,
)

pytestmark = pytest.mark.anyio
PASSWORD = "proxy-pass-w0rd"
BASIC = "Basic " + base64.b64encode(f"egress:{PASSWORD}".encode()).decode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def client(
    network: Network | None = None, *, connect: float = 5.0, read: float = 5.0
) -> AsyncIterator[BackendClient]:
    backend_client = BackendClient(Timeouts(connect=connect, read=read), Limits(10), network)
    await backend_client.start()
    try:
        yield backend_client
    finally:
        await backend_client.close()


async def get(c: BackendClient, url: str) -> tuple[int, bytes]:
    async with c.open("GET", url, {}, None) as response:
        return response.status, await response.read()


# --- the egress proxy -------------------------------------------------------------------


class EgressProxy:
    """An HTTP proxy on loopback: ``CONNECT host:port`` tunnels, absolute-form requests
    forwarded to the origin they name; ``refuse`` answers every request with that status
    instead. ``heads`` holds the head of each request it got."""

    def __init__(self, refuse: int | None = None) -> None:
        self.refuse = refuse
        self.heads: list[bytes] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            if self.refuse is not None:
                writer.write(
                    b"HTTP/1.1 %d %s\r\ncontent-length: 0\r\n\r\n"
                    % (self.refuse, PASSWORD.encode())
                )
                await writer.drain()
                return
            method, target, _ = head.split(b" ", 2)
            if method == b"CONNECT":
                host, _, port = target.decode().rpartition(":")
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                origin = target.decode().removeprefix("http://").partition("/")[0]
                host, _, port = origin.rpartition(":")
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
                up_writer.write(head)
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@asynccontextmanager
async def egress_proxy(refuse: int | None = None) -> AsyncIterator[tuple[EgressProxy, str]]:
    proxy = EgressProxy(refuse)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield proxy, f"http://egress:{PASSWORD}@127.0.0.1:{port}"
    finally:
        server.close()
        for task in list(proxy.tasks):
            task.cancel()
        await server.wait_closed()


async def test_an_https_backend_is_reached_through_connect_with_the_proxy_credentials() -> None:
    async with (
        answering(tls=tls_server_context()) as (side, url),
        egress_proxy() as (proxy, proxy_url),
        client(Network(ca_bundle=CERT, proxies={"https": proxy_url})) as c,
    ):
        for _ in range(2):  # the second request reuses the tunnel
            assert await get(c, f"{url}/v1/models") == (200, b'{"ok":true}')
    authority = url.removeprefix("https://")
    assert proxy.heads == [
        f"CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n"
        f"proxy-authorization: {BASIC}\r\n\r\n".encode()
    ]
    # TLS inside the tunnel: the backend got the request, and no proxy credential.
    assert side.requests == [f"GET /v1/models HTTP/1.1\r\nhost: {authority}\r\n\r\n".encode()] * 2


async def test_an_http_backend_gets_absolute_form_requests_through_the_proxy() -> None:
    async with (
        answering() as (side, url),
        egress_proxy() as (proxy, proxy_url),
        client(Network(proxies={"http": proxy_url, "https": "http://127.0.0.1:9"})) as c,
    ):
        assert await get(c, f"{url}/v1/models?a=1") == (200, b'{"ok":true}')
    authority = url.removeprefix("http://")
    sent = (
        f"GET {url}/v1/models?a=1 HTTP/1.1\r\nhost: {authority}\r\n"
        f"proxy-authorization: {BASIC}\r\n\r\n"
    ).encode()
    assert (proxy.heads, side.requests) == ([sent], [sent])


async def test_all_proxy_serves_both_schemes_and_no_proxy_bypasses_it() -> None:
    async with (
        answering(tls=tls_server_context()) as (side, url),
        egress_proxy() as (proxy, proxy_url),
    ):
        port = url.rpartition(":")[2]
        for no_proxy, through in [
            ("example.com,127.0.0.1", False),
            (f"127.0.0.1:{port}", False),
            ("*", False),
            ("127.0.0.2,.example.com", True),
        ]:
            proxy.heads.clear()
            network = Network(ca_bundle=CERT, proxies={"all": proxy_url, "no": no_proxy})
            async with client(network) as c:
                assert await get(c, url) == (200, b'{"ok":true}')
            assert bool(proxy.heads) is through, no_proxy
    assert side.connections == 4


@pytest.mark.parametrize("status", [407, 403, 502])
async def test_a_proxy_that_refuses_the_tunnel_is_unreachable_without_its_credentials(
    status: int,
) -> None:
    async with (
        egress_proxy(refuse=status) as (proxy, proxy_url),
        client(Network(proxies={"https": proxy_url})) as c,
    ):
        with pytest.raises(BackendUnreachable) as caught:
            await get(c, "https://backend.test:8443/v1/models?api_key=k")
    shown = proxy_url.replace(f"egress:{PASSWORD}@", "")
    phrase = {407: "Proxy Authentication Required", 403: "Forbidden", 502: "Bad Gateway"}
    assert caught.value.message == (
        f"the egress proxy {shown} (HTTPS_PROXY) refused CONNECT backend.test:8443: "
        f"{status} {phrase[status]} (https://backend.test:8443/v1/models?api_key=[REDACTED])"
    )
    assert PASSWORD not in repr(caught.value.__cause__)
    assert len(proxy.heads) == 1


async def test_an_unreachable_proxy_is_named_without_its_credentials() -> None:
    async with egress_proxy() as (_, proxy_url):
        pass  # closed again: the port is free now
    async with client(Network(proxies={"https": proxy_url})) as c:
        with pytest.raises(BackendUnreachable) as caught:
            await get(c, "https://backend.test/v1")
    shown = proxy_url.replace(f"egress:{PASSWORD}@", "")
    assert caught.value.message.startswith(
        f"cannot connect to the egress proxy {shown} (HTTPS_PROXY) for https://backend.test/v1: "
    )
    assert PASSWORD not in caught.value.message


def test_the_proxies_come_from_the_environment_as_urllib_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        for variable in (name, name.lower()):
            monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("https_proxy", "proxy.corp:3128")  # no scheme: http://, as curl
    monkeypatch.setenv("NO_PROXY", ".internal, localhost")
    proxies = Proxies(load_settings().network.proxies)
    chosen = proxies.for_origin(True, "api.openai.com", 443)
    assert chosen is not None and (chosen.host, chosen.port) == ("proxy.corp", 3128)
    assert proxies.for_origin(True, "llm.internal", 443) is None
    assert proxies.for_origin(True, "localhost", 8443) is None
    assert proxies.for_origin(False, "api.openai.com", 80) is None  # no HTTP_PROXY


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "ALL_PROXY",
            f"socks5://u:{PASSWORD}@127.0.0.1:1080",
            "invalid ALL_PROXY: socks5://127.0.0.1:1080: only http:// proxies are supported",
        ),
        (
            "HTTPS_PROXY",
            f"http://u:{PASSWORD}@proxy:port",
            "invalid HTTPS_PROXY: http://proxy:port",
        ),
    ],
)
def test_an_unusable_proxy_stops_the_start_without_its_credentials(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        check_network(load_settings().network)
    assert caught.value.message == message


def test_serve_refuses_an_unusable_proxy_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "luthien_control", "serve", "--port", "9"],
        env=python_env(ALL_PROXY=f"socks5://u:{PASSWORD}@127.0.0.1:1080", BACKEND_URL="http://x"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        2,
        "",
        "luthien-control: error: invalid ALL_PROXY: socks5://127.0.0.1:1080: "
        "only http:// proxies are supported\n",
    )


# --- happy eyeballs -----------------------------------------------------------------------


@contextmanager
def black_hole() -> Iterator[int]:
    """A loopback port whose connection attempts hang: a listener with backlog 0 whose
    one queue place is taken and never accepted, so the kernel drops every further SYN."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    try:
        yield port
    finally:
        filler.close()
        listener.close()


def resolve_to(monkeypatch: pytest.MonkeyPatch, *ports: int) -> list[str]:
    """Every name resolves to 127.0.0.1 at ``ports``, in that order; the names asked."""
    loop = asyncio.get_running_loop()
    asked: list[str] = []

    async def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        tcp = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
        return [(socket.AF_INET, *tcp, ("127.0.0.1", port)) for port in ports]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return asked


async def test_a_black_holed_first_address_costs_one_attempt_delay_not_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tried: list[int] = []
    open_socket = connect_module._open_socket

    async def recording(loop: asyncio.AbstractEventLoop, address: Any) -> socket.socket:
        tried.append(address[1][1])
        return await open_socket(loop, address)

    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(b"ok", "connection: close"))  # every request: a new connection

    monkeypatch.setattr(connect_module, "_open_socket", recording)
    with black_hole() as dead:
        async with backend(closing) as (side, url), client(connect=3.0) as c:
            port = int(url.rpartition(":")[2])
            resolve_to(monkeypatch, dead, port)
            for _ in range(2):
                assert await get(c, f"http://backend.test:{port}/v1") == (200, b"ok")
    # The second connection tried the address that had answered first, and only it.
    assert (tried, side.connections) == ([dead, port, port], 2)


async def test_the_first_address_to_connect_wins_and_the_others_are_closed() -> None:
    open_now: list[int] = []
    closed = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_now.append(1)
        await reader.read()  # until the client closes
        open_now.pop()
        writer.close()
        if not open_now:
            closed.set()

    servers = [await asyncio.start_server(hold, "127.0.0.1", 0) for _ in range(3)]
    addresses = [(socket.AF_INET, s.sockets[0].getsockname()) for s in servers]
    try:
        winner, address = await race(addresses, 0.0)  # every attempt at once: all may connect
        assert address in addresses and winner.getpeername() == address[1]
        winner.close()
        await asyncio.wait_for(closed.wait(), 5)  # nothing left open: the losers closed
    finally:
        for server in servers:
            server.close()


async def test_every_address_refused_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    with black_hole() as dead:
        pass  # closed: its port refuses now
    async with client() as c:
        resolve_to(monkeypatch, dead, dead)
        await open_fails(
            c, f"http://backend.test:{dead}/v1", BackendUnreachable, ": Connection refused$"
        )


# --- DNS ------------------------------------------------------------------------------------


async def test_dns_answers_are_kept_for_the_ttl_and_zero_asks_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(b"ok", "connection: close"))  # every request: a new connection

    async with backend(closing) as (_, url):
        port = int(url.rpartition(":")[2])
        asked = resolve_to(monkeypatch, port)
        for ttl, times in [(300.0, 1), (0.0, 3)]:
            asked.clear()
            async with client(Network(dns_ttl=ttl)) as c:
                for _ in range(3):
                    assert await get(c, f"http://backend.test:{port}/v1") == (200, b"ok")
            assert len(asked) == times, ttl


async def test_a_failed_resolution_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    answers: list[Any] = [socket.gaierror(-2, "Name or service not known")]

    async with answering() as (_, url), client() as c:
        port = int(url.rpartition(":")[2])
        tcp = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
        answers.append([(socket.AF_INET, *tcp, ("127.0.0.1", port))])

        async def getaddrinfo(*args: Any, **kwargs: Any) -> Any:
            found = answers.pop(0)
            if isinstance(found, Exception):
                raise found
            return found

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        target = f"http://backend.test:{port}/v1"
        await open_fails(c, target, BackendUnreachable, "Name or service not known")
        assert await get(c, target) == (200, b'{"ok":true}')  # asked again, and answered


def test_the_dns_ttl_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKEND_DNS_TTL", "0")
    assert load_settings().network.dns_ttl == 0
    monkeypatch.setenv("BACKEND_DNS_TTL", "-1")
    with pytest.raises(ConfigurationError, match="invalid BACKEND_DNS_TTL"):
        load_settings()


# --- the response head ----------------------------------------------------------------------


async def test_a_response_head_that_never_ends_is_broken_not_buffered() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        line = b"x-filler: " + b"a" * 1000 + b"\r\n"
        for _ in range(1024):  # 1 MiB at most, then silence: a client that buffers it times out
            if reader.at_eof():
                return  # the client has closed the connection
            writer.write(line)
            await writer.drain()
        await reader.read()

    async with backend(endless) as (_, url), client(read=2.0) as c:
        await open_fails(c, url, BackendBroken, f"head is larger than {MAX_HEAD_BYTES} bytes")


async def test_a_large_head_within_the_bound_is_taken() -> None:
    filler = [f"x-filler-{i}: {'a' * 1000}" for i in range(60)]  # about 60 KB

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(b"ok", *filler))

    async with backend(script) as (_, url), client() as c, c.open("GET", url, {}, None) as r:
        assert (len(r.headers), await r.read()) == (61, b"ok")


# --- TLS: the operator's CA bundle and client certificate --------------------------------------


async def test_a_ca_bundle_is_what_the_client_trusts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    async with answering(tls=tls_server_context()) as (_, url):
        async with client() as c:
            await open_fails(c, url, BackendUnreachable, "certificate verify failed")
        async with client(Network(ca_bundle=CERT)) as c:
            assert await get(c, url) == (200, b'{"ok":true}')


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def client_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, and a client certificate it signed, made with the ``openssl`` command."""
    pki = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
            "-keyout", pki / "ca-key.pem", "-out", pki / "ca.pem")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=luthien-proxy",
            "-keyout", pki / "client-key.pem", "-out", pki / "client.csr")  # fmt: skip
    openssl("x509", "-req", "-in", pki / "client.csr", "-CA", pki / "ca.pem", "-CAkey",
            pki / "ca-key.pem", "-CAcreateserial", "-days", "2",
            "-out", pki / "client.pem")  # fmt: skip
    openssl("pkey", "-in", pki / "client-key.pem", "-aes256", "-passout", "pass:secret",
            "-out", pki / "encrypted-key.pem")  # fmt: skip
    return pki


async def test_a_client_certificate_is_shown_to_a_backend_that_requires_one(
    client_pki: Path,
) -> None:
    server = tls_server_context()
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(client_pki / "ca.pem")
    seen: list[Any] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peercert")["subject"])
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(b"mtls"))
        await writer.drain()

    async with backend(script, tls=server) as (_, url):
        async with client(Network(ca_bundle=CERT)) as c:
            with pytest.raises((BackendBroken, BackendUnreachable)):
                await get(c, url)  # no certificate: the backend hangs up
        mtls = Network(
            ca_bundle=CERT,
            client_cert=client_pki / "client.pem",
            client_key=client_pki / "client-key.pem",
        )
        async with client(mtls) as c:
            assert await get(c, url) == (200, b"mtls")
    assert seen == [((("commonName", "luthien-proxy"),),)]


def test_tls_files_that_do_not_load_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, client_pki: Path, tmp_path: Path
) -> None:
    def fails(message: str, **variables: str | Path) -> None:
        for name in ("BACKEND_CA_BUNDLE", "BACKEND_CLIENT_CERT", "BACKEND_CLIENT_KEY"):
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, str(value))
        with pytest.raises(ConfigurationError) as caught:
            check_network(load_settings().network)
        assert caught.value.message == message

    missing = tmp_path / "missing.pem"
    fails(
        f"invalid BACKEND_CA_BUNDLE: cannot load {missing}: No such file or directory",
        BACKEND_CA_BUNDLE=missing,
    )
    fails(
        f"invalid BACKEND_CLIENT_CERT: cannot load {CERT}, {client_pki / 'client-key.pem'}: "
        "[X509: KEY_VALUES_MISMATCH] key values mismatch",
        BACKEND_CLIENT_CERT=CERT,
        BACKEND_CLIENT_KEY=client_pki / "client-key.pem",
    )
    fails(
        f"invalid BACKEND_CLIENT_CERT: cannot load {client_pki / 'client.pem'}, "
        f"{client_pki / 'encrypted-key.pem'}: the key is encrypted; give it unencrypted",
        BACKEND_CLIENT_CERT=client_pki / "client.pem",
        BACKEND_CLIENT_KEY=client_pki / "encrypted-key.pem",
    )
    fails("BACKEND_CLIENT_KEY is set without BACKEND_CLIENT_CERT", BACKEND_CLIENT_KEY=KEY)
    combined = tmp_path / "combined.pem"
    combined.write_text(CERT.read_text() + KEY.read_text())
    monkeypatch.setenv("BACKEND_CLIENT_CERT", str(combined))  # one PEM holding both
    monkeypatch.delenv("BACKEND_CLIENT_KEY")
    assert load_settings().network.client_cert == combined


async def test_a_chunked_body_s_trailers_are_not_kept() -> None:
    """Trailers are parsed after the head: the head's bound does not hold them, so they
    are not kept at all (they are not forwarded either)."""
    url = "http://backend.test/v1"
    connection = _Connection(_Origin(url, url, Connector(Network())), 5.0)
    connection.begin(url, head_only=False)
    trailer = b"x-trailer: " + b"t" * 1000 + b"\r\n"
    connection.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n")
    connection.data_received(b"0\r\n" + trailer * (2 * MAX_HEAD_BYTES // len(trailer)))
    assert (connection.error, connection.raw_headers) == (
        None,
        [(b"transfer-encoding", b"chunked")],
    )
    connection.data_received(b"\r\n")
    assert (connection.done, await connection.read_chunk()) == (True, b"ok")
