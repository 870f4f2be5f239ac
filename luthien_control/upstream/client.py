"""The backend client: one pooled aiohttp ``ClientSession`` per process.

aiohttp holds steady under concurrency where httpx's pool does not (see
docs/performance.md). The session is created with ``auto_decompress=False`` so the
backend's bytes pass through untouched; a response that is not read to its end is
``close()``d, not released, so the backend really stops generating.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import aiohttp
from multidict import CIMultiDictProxy

from luthien_control.exceptions import (
    BackendBroken,
    BackendTimeout,
    BackendUnreachable,
)
from luthien_control.settings import Limits, Timeouts


@contextmanager
def map_backend_errors(url: str) -> Iterator[None]:
    """Translate aiohttp's errors into the proxy's ``BackendError`` tree (the one place)."""
    try:
        yield
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise BackendTimeout(f"the backend did not answer in time ({url})") from exc
    except aiohttp.ClientConnectorError as exc:
        raise BackendUnreachable(f"cannot connect to the backend at {url}: {exc.os_error}") from exc
    except aiohttp.InvalidURL as exc:
        raise BackendUnreachable(f"invalid backend URL: {url}") from exc
    except aiohttp.ClientPayloadError as exc:
        raise BackendBroken(f"the backend's response was cut short ({url})") from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise BackendBroken(f"the backend closed the connection ({url})") from exc
    except aiohttp.ClientError as exc:
        raise BackendBroken(f"backend error ({url}): {exc}") from exc


class BackendResponse:
    """An open backend response: status and headers now, the body as it arrives."""

    __slots__ = ("_response", "_url", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self._response = response
        self._url = url
        self.status = response.status
        self.headers: CIMultiDictProxy[str] = response.headers

    @property
    def is_event_stream(self) -> bool:
        return self.headers.get("content-type", "").startswith("text/event-stream")

    async def read(self) -> bytes:
        with map_backend_errors(self._url):
            return await self._response.read()

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """The body in pieces as they arrive from the network (never waits to fill a buffer)."""
        content = self._response.content
        with map_backend_errors(self._url):
            while True:
                data = await content.readany()
                if not data:
                    return
                yield data

    def close(self) -> None:
        """Drop the connection: the backend sees the request cancelled."""
        self._response.close()


class BackendClient:
    """Sends requests to backends over one keep-alive pool."""

    def __init__(self, timeouts: Timeouts, limits: Limits) -> None:
        self._timeouts = timeouts
        self._limits = limits
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._limits.pool_size, limit_per_host=0, ttl_dns_cache=300
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self._timeouts.connect, sock_read=self._timeouts.read
            ),
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def open(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> AsyncIterator[BackendResponse]:
        """Send a request; the response stays open inside the block and is closed after it.

        A response whose body was not read to the end (a client disconnect, an error,
        a policy that blocked mid-stream) is closed, which cancels it at the backend.
        """
        if self._session is None:
            raise RuntimeError("BackendClient.start() was not called")
        with map_backend_errors(url):
            response = await self._session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            )
        try:
            yield BackendResponse(response, url)
        except BaseException:
            response.close()
            raise
        finally:
            if not response.closed:
                if response.content.is_eof():
                    response.release()
                else:
                    response.close()


__all__ = ["BackendClient", "BackendResponse", "map_backend_errors"]
