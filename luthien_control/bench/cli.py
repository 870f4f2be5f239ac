"""``luthien-control bench``: the proxy against the direct call to the mock, interleaved.

Starts the mock backend and the proxy (the realistic chain) on loopback ports, or
measures an already running proxy (``--target``); checks that requests really reach the
backend once each; then runs every scenario against both sides, round after round, in a
load-generator process of its own. Progress goes to stderr, the table to stdout,
everything to a JSON file. A missed target is a figure, never a failure: the exit status
is non-zero only for a broken run (2: bad flags, 1: a server or the load generator
failed, 130: interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from luthien_control.bench import report, scan
from luthien_control.bench.load import APIS
from luthien_control.bench.plan import (
    DEFAULT_DURATION,
    DEFAULT_ROUNDS,
    DEFAULT_STREAMS,
    KINDS,
    QUICK_STREAMS,
    Plan,
)
from luthien_control.bench.processes import BenchError
from luthien_control.bench.procfs import core_split
from luthien_control.bench.runner import Bench

PROG = "luthien-control bench"
DEFAULT_JSON = "bench-results.json"
DEFAULT_MOCK_URL = "http://127.0.0.1:9000/v1"
LOOPBACK = ("http://127.0.0.1:", "http://localhost:", "http://[::1]:")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Measure the proxy against the direct call to the mock backend "
        "(interleaved rounds, medians) and print the figures next to the targets.",
    )
    add = parser.add_argument
    add("--rounds", type=int, default=None, help=f"interleaved rounds (default {DEFAULT_ROUNDS})")
    add(
        "--duration",
        type=float,
        default=None,
        help=f"seconds per measurement (default {DEFAULT_DURATION:g})",
    )
    add(
        "--quick",
        action="store_true",
        help="a run of a few seconds for CI: one round, short measurements and streams, "
        f"{QUICK_STREAMS} open streams",
    )
    add(
        "--streams",
        type=int,
        default=None,
        help=f"open streams of the large memory test (default {DEFAULT_STREAMS})",
    )
    add(
        "--only",
        default=None,
        metavar="KINDS",
        help=f"comma-separated scenario kinds to run, of: {', '.join(KINDS)}",
    )
    add(
        "--api",
        default=None,
        metavar="APIS",
        help=f"comma-separated APIs to measure, of: {', '.join(APIS)} (default: both; "
        "with --target: chat). The Messages API is measured streamed only",
    )
    add(
        "--json",
        type=Path,
        default=Path(DEFAULT_JSON),
        help=f"where to write the results (default {DEFAULT_JSON})",
    )
    add(
        "--target",
        default=None,
        metavar="URL",
        help="measure this already running OpenAI-compatible proxy instead (base URL with "
        "/v1); it must forward to the mock at --mock-url, x-mock-* headers included",
    )
    add("--target-key", default="", help="the client API key the target expects")
    add(
        "--target-pid",
        type=int,
        default=None,
        help="the target's process id, to read its memory and CPU time from /proc",
    )
    add(
        "--mock-url",
        default=None,
        metavar="URL",
        help="use this running mock backend (base URL with /v1) instead of starting one "
        f"(default with --target: {DEFAULT_MOCK_URL})",
    )
    add("--mock-key", default=None, help="the API key that mock expects, if any")
    return parser


def _check(args: argparse.Namespace) -> set[str] | None:
    """Flag mistakes as ``BenchError``; returns the ``--only`` kinds (None: all)."""
    for name in ("rounds", "streams"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name} must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise BenchError("--duration must be positive")
    if args.target is None and (args.target_pid is not None or args.target_key):
        raise BenchError("--target-key and --target-pid go with --target")
    for name in ("target", "mock_url"):
        url = getattr(args, name)
        if url is not None and not url.startswith(LOOPBACK):
            # All benchmark traffic stays on this machine.
            raise BenchError(f"--{name.replace('_', '-')} must be a loopback http:// URL")
    if args.api is None:
        # An external target is an OpenAI-compatible proxy unless told otherwise.
        args.apis = ("chat",) if args.target is not None else APIS
    else:
        apis = {api.strip() for api in args.api.split(",") if api.strip()}
        if not apis or apis - set(APIS):
            raise BenchError(f"--api takes APIs among {', '.join(APIS)}")
        args.apis = tuple(api for api in APIS if api in apis)
    if args.only is None:
        return None
    only = {kind.strip() for kind in args.only.split(",") if kind.strip()}
    unknown = only - set(KINDS)
    if unknown or not only:
        raise BenchError(f"--only takes kinds among {', '.join(KINDS)}")
    return only


def main(argv: list[str]) -> int:
    """Run the benchmark; 0 when it ran (whatever the figures), non-zero when it broke."""
    args = build_parser().parse_args(argv)
    try:
        only = _check(args)
    except BenchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    plan = Plan.from_args(args)
    if not plan.scenarios(only):
        print(f"{PROG}: error: no scenario of --only is measured on --api", file=sys.stderr)
        return 2
    try:
        with _interrupt_on_sigterm():
            document = _run(args, plan, only)
    except BenchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    report.write_json(args.json, document)
    print(report.render_table(document))
    print(f"\nresults written to {args.json}")
    return 0


def _run(args: argparse.Namespace, plan: Plan, only: set[str] | None) -> dict[str, Any]:
    started = time.monotonic()
    _raise_file_limit(4 * plan.streams + 1024)
    load_cores, server_cores = core_split()
    if load_cores is not None:
        # The orchestrator only waits and samples; it stays off the servers' core.
        os.sched_setaffinity(0, load_cores)
    scenarios = plan.scenarios(only)
    with tempfile.TemporaryDirectory(prefix="luthien-bench-") as workdir:
        bench = Bench(plan, Path(workdir), (load_cores, server_cores), started)
        try:
            proxy_info = bench.start(
                mock_url=args.mock_url or (DEFAULT_MOCK_URL if args.target else None),
                mock_key=args.mock_key,
                target=args.target,
                target_key=args.target_key,
                target_pid=args.target_pid,
            )
            bench.verify()
            rounds = bench.run(scenarios)
        finally:
            bench.stop()
    summary = report.summarize(rounds, scenarios)
    targets = report.evaluate(summary)
    leak_scan = None
    if args.target is None:  # a figure of this project's code, measured in this process
        bench.progress(
            "leak scan: CPU per chunk of 1 KB streams and of a 1 MB stream, chat and Messages"
        )
        leak_scan = scan.measure()
        targets += report.leak_scan_verdicts(leak_scan)
    notes = []
    for label, figures in (("chat", leak_scan), ("Messages", (leak_scan or {}).get("messages"))):
        if leak_scan is not None and figures is not None:
            passed, chunks = figures["large_chunks_passed"], leak_scan["chunks"]
            if passed < chunks:
                notes.append(
                    f"leak scan, {label}: the 1 MB stream was stopped after {passed:,} of "
                    f"{chunks:,} chunks, at {scan.BUDGET:g} times the CPU of all the 1 KB "
                    "streams; its figures are over those chunks, lower bounds"
                )
    if load_cores is None:
        notes.append("one core only: the load generator shares it with the servers")
    if bench.proxy.pid is None:
        notes.append("no --target-pid: the target's memory and CPU time were not measured")
    if args.target and any(s["kind"] in ("open", "pool") for s in scenarios.values()):
        notes.append(
            "an external target is not restarted before the memory scenarios, nor before "
            "each round of the pool burst (only the first round's 'before' is before any "
            "burst)"
        )
    return {
        "version": 1,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cores": os.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_generator_cores": list(load_cores) if load_cores else None,
            "server_cores": list(server_cores) if server_cores else None,
        },
        "config": {**asdict(plan), "only": sorted(only) if only else None},
        "proxy": proxy_info,
        "direct": {"url": bench.direct.url},
        "verification": {"problems": bench.problems},
        "idle_rss_mb": bench.idle_rss_mb,
        "idle_rss": bench.idle_rss,
        "peak_rss_mb": _peak(rounds),
        "scenarios": scenarios,
        "summary": summary,
        "targets": targets,
        "leak_scan": leak_scan,
        "rounds": rounds,
        "notes": notes,
        "wall_s": time.monotonic() - started,
    }


def _peak(rounds: list[report.Round]) -> dict[str, float | None]:
    """The highest RSS sampled of each side's server over the whole run."""
    peaks: dict[str, float | None] = {}
    for side in ("direct", "proxy"):
        values = [
            m[side]["rss_max_mb"]
            for r in rounds
            for m in r.values()
            if side in m and m[side]["rss_max_mb"] is not None
        ]
        peaks[side] = max(values) if values else None
    return peaks


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM takes the same path as Ctrl-C, so that every process is cleaned up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_file_limit(needed: int) -> None:
    """Every open stream holds sockets in three processes; they inherit this limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
