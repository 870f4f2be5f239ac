"""Giving the memory of a rush back to the system once the proxy is idle.

Python frees objects into its own allocator and the C library's heap (glibc's
``malloc``); both keep freed pages mapped for reuse, so a worker that once held a
thousand streams stays at that size while idle. glibc returns the free pages inside its
heap only when asked: ``malloc_trim(0)``. The recorder's writer asks once each time it
has had nothing to write for ``IDLE_RELEASE_AFTER`` seconds after some traffic
(``recording.DatabaseRecorder``); measured in docs/performance.md.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

IDLE_RELEASE_AFTER = 2.0  # seconds without a finished transaction: the rush is over


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (musl, macOS)."""
    try:  # the symbols the process has loaded already: no library search
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system; True if the C library can (the
    call takes about a millisecond per 100 MB of heap)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
