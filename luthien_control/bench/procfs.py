"""What Linux tells about a process: its cores, resident memory and CPU time (``/proc``)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable


def core_split() -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(load generator cores, server cores): one core each when there are two or more.

    The servers share one core however many there are, so that figures from a big
    machine compare with those of the 2-core machines CI runs on.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return (cores[0],), (cores[1],)


def pin(pid: int, cores: Iterable[int] | None) -> None:
    """Pin every thread of ``pid`` (affinity is per thread on Linux) to ``cores``."""
    if cores is None:
        return
    cpu_set = set(cores)
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in threads:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, cpu_set)


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` so far, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Fields after the command name (which may hold spaces): state is field 3, utime 14.
    fields = text[text.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


SETTLE_WINDOW = 0.25  # seconds of near-idle CPU that mean the work of a load is done
SETTLE_QUIET = 0.02  # CPU seconds within a window still counted as idle (2 clock ticks)
SETTLE_LIMIT = 30.0  # at most this long: a process that never goes quiet is read anyway


def settled_cpu_seconds(pid: int, limit: float = SETTLE_LIMIT) -> tuple[float | None, float]:
    """``cpu_seconds`` of ``pid`` once it has gone quiet (at most ``SETTLE_LIMIT`` s), and
    how long that took: the work a load left behind (a proxy's records still queued for
    its writer) counted with the load."""
    started = time.monotonic()
    last = cpu_seconds(pid)
    while last is not None and time.monotonic() - started < limit:
        time.sleep(SETTLE_WINDOW)
        now = cpu_seconds(pid)
        if now is None or now - last <= SETTLE_QUIET:
            return now if now is not None else last, time.monotonic() - started
        last = now
    return last, time.monotonic() - started
