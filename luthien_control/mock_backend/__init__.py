"""The built-in mock backend, scripted per request by ``x-mock-*`` headers (or by a
server-wide default scenario), speaking OpenAI's APIs and Anthropic's Messages API.

Used by the proxy's tests, the demo mode and the benchmarks. ``MockBackend`` is the ASGI
app; ``run`` serves it with uvicorn; ``scenario`` documents the directives and the default
scenario, ``content``, ``responses`` and ``messages`` the answers of each API, and
``records`` the request log at ``/_mock/requests``.
"""

from luthien_control.mock_backend.app import MockBackend
from luthien_control.mock_backend.exchange import ConnectionDropped
from luthien_control.mock_backend.server import run

__all__ = ["ConnectionDropped", "MockBackend", "run"]
