"""The backend side: an HTTP/1.1 client with one keep-alive pool per process."""

from luthien_control.upstream.client import BackendClient, BackendResponse

__all__ = ["BackendClient", "BackendResponse"]
