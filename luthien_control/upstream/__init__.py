"""The backend side: one pooled aiohttp session per process."""

from luthien_control.upstream.client import BackendClient, BackendResponse

__all__ = ["BackendClient", "BackendResponse"]
