"""One benchmark run: the two sides, the servers behind them, and the rounds.

Within a round every scenario is measured on both sides, one after the other, the order
alternating. Then, on the same proxy, RSS with 64 open streams after that load; then the
backend pool's burst, on a freshly started proxy each round (its "before" must find a
pool that no burst has grown); the memory scenarios come last, on a freshly started
proxy, because a Python process keeps the memory it once needed and earlier load would
be counted.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from luthien_control.bench.load import LoadSpec
from luthien_control.bench.plan import MEMORY_KINDS, Plan
from luthien_control.bench.processes import (
    LoadGenerator,
    Sample,
    Server,
    policy_document,
    prepare_proxy,
    start_mock,
    start_proxy,
)
from luthien_control.bench.procfs import rss_bytes
from luthien_control.bench.report import Round
from luthien_control.bench.verify import verify, verify_side

MB = 1024 * 1024
GENERATOR_MARGIN = 60.0  # beyond a measurement's own limits, before the run is declared hung


@dataclass(frozen=True, slots=True)
class Side:
    """One end the load generator talks to: the mock directly, or the proxy."""

    name: str
    url: str
    key: str
    pid: int | None


@dataclass
class OwnProxy:
    """The proxy this run started, and how to start it again."""

    server: Server
    env: dict[str, str]


class Bench:
    """The servers, the sides and the load generator of one run (stopped by the caller)."""

    def __init__(
        self,
        plan: Plan,
        workdir: Path,
        cores: tuple[tuple[int, ...] | None, tuple[int, ...] | None],
        started: float,
    ) -> None:
        self.plan = plan
        self.workdir = workdir
        self.load_cores, self.server_cores = cores
        self.started = started
        self.servers: list[Server] = []
        self.generator: LoadGenerator | None = None
        self.own_proxy: OwnProxy | None = None
        self.direct = Side("direct", "", "", None)
        self.proxy = Side("proxy", "", "", None)
        self.problems: list[str] = []
        self.idle_rss_mb: dict[str, float | None] = {}
        # Idle RSS of each side at the start, after the throughput scenarios, and on the
        # fresh proxy of the memory scenarios.
        self.idle_rss: dict[str, dict[str, float | None]] = {}

    def progress(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {text}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.generator is not None:
            self.generator.stop()
        for server in reversed(self.servers):
            server.stop()

    def start(
        self,
        *,
        mock_url: str | None,
        mock_key: str | None,
        target: str | None,
        target_key: str,
        target_pid: int | None,
    ) -> dict[str, Any]:
        """Start the load generator, the mock (unless ``mock_url``) and the proxy (unless
        ``target``); returns a description of the proxy side for the report."""
        self.generator = LoadGenerator(self.workdir, self.load_cores)  # imports meanwhile
        if mock_url is None:
            backend_key = "bench-backend-" + secrets.token_hex(8)
            mock, mock_url = start_mock(self.workdir, api_key=backend_key, cores=self.server_cores)
            self.servers.append(mock)
            self.progress(f"mock backend on {mock_url} (pid {mock.pid})")
            self.direct = Side("direct", mock_url, backend_key, mock.pid)
        else:
            self.direct = Side("direct", mock_url.rstrip("/"), mock_key or "bench", None)
        if target is not None:
            self.proxy = Side("proxy", target.rstrip("/"), target_key, target_pid)
            self.progress(f"target {target}, direct {self.direct.url}")
            return {
                "label": "target",
                "description": f"{target} (already running; must forward to {self.direct.url})",
                "url": target,
                "pid": target_pid,
            }
        client_key = "lc-bench-" + secrets.token_hex(16)
        env = prepare_proxy(
            self.workdir,
            backend_url=self.direct.url,
            backend_key=self.direct.key,
            client_key=client_key,
        )
        server, url = start_proxy(self.workdir, env, cores=self.server_cores)
        self.servers.append(server)
        self.own_proxy = OwnProxy(server, env)
        self.proxy = Side("proxy", url, client_key, server.pid)
        self.progress(f"proxy on {url} (pid {server.pid})")
        return {
            "label": "proxy",
            "description": "luthien-control serve with the realistic chain: "
            + ", ".join(p["type"] for p in policy_document("")["config"]["policies"]),
            "url": url,
            "pid": server.pid,
        }

    def verify(self) -> list[str]:
        """Check that requests of both sides reach the backend once each (see ``verify``)."""
        self.progress("checking that every request reaches the backend once")
        problems = verify(
            self.direct.url,
            self.direct.key,
            self.proxy.url,
            self.proxy.key,
            self.plan.words,
            check_backend_key=self.own_proxy is not None,
            apis=self.plan.apis,
        )
        for problem in problems:
            self.progress(f"verification: {problem}")
        self.problems += problems
        return problems

    def restart_proxy(self, purpose: str = "the memory scenarios") -> None:
        """A fresh proxy process (same database and policy), warmed up: only the proxy we
        started can be restarted; an external target is measured as it is."""
        own = self.own_proxy
        if own is None:
            return
        own.server.stop()
        self.servers.remove(own.server)
        server, url = start_proxy(self.workdir, own.env, cores=self.server_cores)
        self.servers.append(server)
        own.server = server
        self.proxy = replace(self.proxy, url=url, pid=server.pid)
        self.progress(f"fresh proxy for {purpose} on {url} (pid {server.pid})")
        # Warm-up (the backend session's first request is slow) and the same check again.
        try:
            problems = verify_side(
                "proxy",
                url,
                self.proxy.key,
                self.direct.url.removesuffix("/v1"),
                self.direct.key,
                self.plan.words,
            )
        except (OSError, ValueError, KeyError) as exc:
            problems = [f"fresh proxy: verification failed: {exc!r}"]
        for problem in problems:
            self.progress(f"verification: {problem}")
        self.problems += problems

    def run(self, scenarios: dict[str, dict[str, Any]]) -> list[Round]:
        """Every scenario on both sides, round after round; memory scenarios last, on a
        fresh proxy, and each of them through all rounds before the next."""
        rounds: list[Round] = [{} for _ in range(self.plan.rounds)]
        loaded = {n: s for n, s in scenarios.items() if s.get("loaded")}
        pool = {n: s for n, s in scenarios.items() if s["kind"] == "pool"}
        memory = {
            n: s for n, s in scenarios.items() if s["kind"] in MEMORY_KINDS and n not in loaded
        }
        timed = {n: s for n, s in scenarios.items() if n not in {**loaded, **pool, **memory}}
        self.idle_rss_mb = self.idle_rss["start"] = self._idle()
        for index, this_round in enumerate(rounds):
            for position, (name, scenario) in enumerate(timed.items()):
                this_round[name] = self._both(index + position, index, name, scenario)
        if loaded:
            # What the proxy keeps of the load it has just served.
            self.idle_rss["after_load"] = self._idle()
            self._all_rounds(rounds, loaded)
        for name, scenario in pool.items():
            for index, this_round in enumerate(rounds):
                self.restart_proxy(f"the backend pool burst, round {index + 1}")
                this_round[name] = self._both(index, index, name, scenario)
        if memory:
            self.restart_proxy()
            self.idle_rss_mb = self.idle_rss["before_open"] = self._idle()
            self._all_rounds(rounds, memory)
        return rounds

    def _all_rounds(self, rounds: list[Round], scenarios: dict[str, dict[str, Any]]) -> None:
        """Each scenario through all its rounds before the next."""
        for position, (name, scenario) in enumerate(scenarios.items()):
            for index, this_round in enumerate(rounds):
                this_round[name] = self._both(index + position, index, name, scenario)

    def _idle(self) -> dict[str, float | None]:
        return {side.name: _rss_mb(side.pid) for side in (self.direct, self.proxy)}

    def _both(self, turn: int, index: int, name: str, scenario: dict[str, Any]) -> dict[str, Any]:
        # Alternate who goes first, so that neither side always follows the other.
        first = turn % 2 == 0
        measured: dict[str, Any] = {}
        for side in (self.direct, self.proxy) if first else (self.proxy, self.direct):
            for server in self.servers:
                server.check_alive()
            measured[side.name] = self._measure(scenario, side)
            line = _line(name, scenario, side.name, measured[side.name])
            self.progress(f"round {index + 1}/{self.plan.rounds} {line}")
        return measured

    def _measure(self, scenario: dict[str, Any], side: Side) -> dict[str, Any]:
        spec = self.plan.spec(
            scenario["kind"], scenario["clients"], side.url, side.key, scenario.get("api", "chat")
        )
        if scenario["kind"] == "pool":
            before = self._run(spec, side)
            burst = self._run(self.plan.burst_spec(side.url, side.key), side)
            return pool_measurement(before, burst, self._run(spec, side))
        idle_before = _rss_mb(side.pid)
        measured = self._run(spec, side)
        settle = scenario.get("settle")
        if settle:
            # Once every stream has closed and the proxy has been idle a moment: does
            # the memory they took come back?
            time.sleep(settle)
            measured["rss_before_mb"] = idle_before
            measured["rss_after_mb"] = _rss_mb(side.pid)
        return measured

    def _run(self, spec: LoadSpec, side: Side) -> dict[str, Any]:
        assert self.generator is not None
        spec = LoadSpec(**{**asdict(spec), "cpus": self.load_cores})
        limit = spec.stagger + spec.duration + spec.stream_seconds + spec.timeout
        sample = self.generator.measure(
            spec.to_json(), timeout=limit + GENERATOR_MARGIN, watch_pid=side.pid
        )
        return measurement(sample, side)


def measurement(sample: Sample, side: Side) -> dict[str, Any]:
    """The generator's figures plus what was seen of the server: CPU time, and RSS while
    every stream was open (the peak of the whole measurement when that moment was never
    reached, because a stream failed, or fell between two samples)."""
    load = sample.result
    opened, closed = load.get("all_open_at"), load.get("first_closed_at")
    every = [rss for _, rss in sample.rss]
    window = [
        rss
        for at, rss in sample.rss
        if opened is not None and closed is not None and opened <= at <= closed
    ]
    chosen = window or every
    return {
        "server": "mock" if side.name == "direct" else "proxy",
        "load": load,
        "server_cpu_s": sample.cpu_s,
        "server_settle_s": sample.settle_s,
        "rss_open_mb": max(chosen) / MB if chosen else None,
        "rss_max_mb": max(every) / MB if every else None,
        "rss_samples": len(sample.rss),
    }


def pool_measurement(
    before: dict[str, Any], burst: dict[str, Any], after: dict[str, Any]
) -> dict[str, Any]:
    """Non-streamed requests/s before and after a burst, as one measurement: its ``load``
    adds up the three runs' requests and errors (a burst error is named as one) and
    gives both rates; each run's own figures are kept under its name."""
    runs = {"before": before, "burst": burst, "after": after}
    loads = {name: run["load"] for name, run in runs.items()}
    kinds: Counter[str] = Counter()
    warmup: Counter[str] = Counter()
    for name, load in loads.items():
        prefix = "burst: " if name == "burst" else ""
        kinds.update({prefix + kind: n for kind, n in load["error_kinds"].items()})
        warmup.update(load["warmup_errors"])
    rss_max = [run["rss_max_mb"] for run in runs.values() if run["rss_max_mb"] is not None]
    return {
        "server": before["server"],
        "load": {
            "requests": sum(load["requests"] for load in loads.values()),
            "ok": sum(load["ok"] for load in loads.values()),
            "errors": sum(kinds.values()),
            "error_kinds": dict(kinds),
            "warmup_errors": dict(warmup),
            "cpu_share": max(loads["before"]["cpu_share"], loads["after"]["cpu_share"]),
            "requests_per_s_before": loads["before"]["requests_per_s"],
            "requests_per_s_after": loads["after"]["requests_per_s"],
            "burst_ok": loads["burst"]["ok"],
        },
        "runs": runs,
        "server_cpu_s": None,
        "rss_open_mb": None,
        "rss_max_mb": max(rss_max) if rss_max else None,
        "rss_samples": sum(run["rss_samples"] for run in runs.values()),
    }


def _rss_mb(pid: int | None) -> float | None:
    value = rss_bytes(pid) if pid is not None else None
    return value / MB if value is not None else None


def _line(name: str, scenario: dict[str, Any], side: str, m: dict[str, Any]) -> str:
    load = m["load"]
    kind = scenario["kind"]
    if kind == "stream":
        ttft, gap = load["ttft_ms"], load["gap_ms"]
        figures = f"TTFT p50 {_ms(ttft['p50'])} p99 {_ms(ttft['p99'])}, gap p99 {_ms(gap['p99'])}"
    elif kind == "nonstream":
        figures = f"{load['requests_per_s']:,.0f} req/s, p50 {_ms(load['latency_ms']['p50'])}"
    elif kind == "unpaced":
        figures = f"{load['chunks_per_s']:,.0f} chunks/s"
    elif kind == "pool":
        figures = (
            f"{load['requests_per_s_before']:,.0f} req/s, burst of {scenario['burst']:,} "
            f"({load['burst_ok']} ok), then {load['requests_per_s_after']:,.0f} req/s"
        )
    else:
        rss, after = m["rss_open_mb"], m.get("rss_after_mb")
        figures = f"RSS {rss:.1f} MB" if rss is not None else "RSS n/a"
        if after is not None:
            figures += f", {after:.1f} MB once closed"
    errors = load["errors"] + sum(load["warmup_errors"].values())
    return (
        f"{name:<14} {side:<6} {figures}; {load['ok']} ok, {errors} errors; "
        f"generator CPU {load['cpu_share']:.0%}"
    )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"
