"""What one benchmark run measures: the scenarios, their sizes and durations.

Every scenario runs against both sides (the mock directly, and the proxy) with the same
``LoadSpec``; only the URL and the key differ.

Memory and the backend pool are measured after the rest: RSS with 64 open streams on the
proxy that has just run the throughput scenarios (``open_64_loaded``); non-streamed
requests/s before and after a burst of concurrent requests that grows the backend pool
(``pool_N``, on a fresh proxy each round); then, on a fresh proxy again, RSS with 64 and
with many open streams, and once the many have closed.

Chat completions are measured in every kind of scenario; Anthropic's Messages API in the
streamed ones (``messages_stream_N``, ``messages_unpaced_N``). Beside chat it is paced at
64 clients only, which keeps the full run near five minutes; measured alone
(``--api messages``) it is paced at 1, 16 and 64 clients, as chat is.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from luthien_control.bench.load import APIS, LoadSpec

DEFAULT_ROUNDS = 3
DEFAULT_DURATION = 5.0
DEFAULT_STREAMS = 1000
QUICK_STREAMS = 200
KINDS = ("stream", "nonstream", "unpaced", "open", "pool")
# Scenarios measured on a freshly started proxy, after all the others: memory only grows.
MEMORY_KINDS = ("open",)
# Concurrent non-streamed requests that grow the backend pool, each held back by the mock
# long enough for all of them to be in flight together.
POOL_BURST = 512
POOL_BURST_DELAY_MS = 250.0
# The paced clients of the Messages API beside chat (all of ``stream_clients`` alone).
MESSAGES_BESIDE_CHAT = (64,)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run measures and for how long."""

    rounds: int
    duration: float
    chunks: int
    delay_ms: float
    words: int
    stream_clients: tuple[int, ...]
    request_clients: int
    unpaced_clients: int
    streams: int
    ramp: float
    hold: float
    quick: bool
    apis: tuple[str, ...] = ("chat",)
    settle: float = 3.0  # idle seconds after the many streams closed, before RSS is read
    pool_burst: int = POOL_BURST

    @property
    def messages_stream_clients(self) -> tuple[int, ...]:
        """The paced Messages scenarios: all of chat's when Messages runs alone."""
        return MESSAGES_BESIDE_CHAT if "chat" in self.apis else self.stream_clients

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        apis = tuple(api for api in APIS if api in (getattr(args, "apis", None) or ("chat",)))
        if args.quick:
            return cls(
                rounds=args.rounds or 1,
                duration=args.duration or 0.5,
                chunks=16,
                delay_ms=20.0,
                words=16,
                stream_clients=(1, 16, 64),
                request_clients=32,
                unpaced_clients=32,
                streams=args.streams or QUICK_STREAMS,
                ramp=0.3,
                hold=0.3,
                quick=True,
                apis=apis,
                settle=3.0,
            )
        return cls(
            rounds=args.rounds or DEFAULT_ROUNDS,
            duration=args.duration or DEFAULT_DURATION,
            chunks=64,
            delay_ms=20.0,
            words=64,
            stream_clients=(1, 16, 64),
            request_clients=32,
            unpaced_clients=32,
            streams=args.streams or DEFAULT_STREAMS,
            ramp=1.0,
            hold=2.0,
            quick=False,
            apis=apis,
        )

    @property
    def stream_seconds(self) -> float:
        return (self.chunks - 1) * self.delay_ms / 1000.0

    def scenarios(self, only: set[str] | None) -> dict[str, dict[str, Any]]:
        """Name → kind, clients and API, in the order they run within a round: chat's,
        then the Messages API's, the memory scenarios (chat) last."""
        wanted: list[tuple[str, str, int, str]] = []  # (API, kind, clients, name)
        if "chat" in self.apis:
            wanted += [("chat", "stream", c, f"stream_{c}") for c in self.stream_clients]
            wanted += [
                ("chat", "nonstream", self.request_clients, f"nonstream_{self.request_clients}"),
                ("chat", "unpaced", self.unpaced_clients, f"unpaced_{self.unpaced_clients}"),
            ]
        if "messages" in self.apis:
            wanted += [
                ("messages", "stream", c, f"messages_stream_{c}")
                for c in self.messages_stream_clients
            ]
            unpaced = self.unpaced_clients
            wanted.append(("messages", "unpaced", unpaced, f"messages_unpaced_{unpaced}"))
        if "chat" in self.apis:
            wanted += [
                ("chat", "open", 64, "open_64_loaded"),
                ("chat", "pool", self.request_clients, f"pool_{self.pool_burst}"),
                ("chat", "open", 64, "open_64"),
                ("chat", "open", self.streams, "open_many"),
            ]
        found: dict[str, dict[str, Any]] = {}
        for api, kind, clients, name in wanted:
            if only is None or kind in only:
                found[name] = {"kind": kind, "clients": clients, "api": api}
        if "open_64_loaded" in found:
            # After the throughput scenarios, on the same proxy: not without them.
            if any(s["kind"] in ("nonstream", "unpaced", "stream") for s in found.values()):
                found["open_64_loaded"]["loaded"] = True
            else:
                del found["open_64_loaded"]
        if "open_many" in found:
            found["open_many"]["settle"] = self.settle
        pool = f"pool_{self.pool_burst}"
        if pool in found:
            found[pool]["burst"] = self.pool_burst
        return found

    def burst_spec(self, url: str, key: str) -> LoadSpec:
        """The burst that grows the backend pool: ``pool_burst`` non-streamed requests at
        once, each answered after ``POOL_BURST_DELAY_MS``, so that all are in flight
        together and each holds a backend connection of its own."""
        return LoadSpec(
            url=url,
            key=key,
            clients=self.pool_burst,
            stream=False,
            duration=0.0,
            first_byte_delay_ms=POOL_BURST_DELAY_MS,
            warmup=False,
        )

    def spec(self, kind: str, clients: int, url: str, key: str, api: str = "chat") -> LoadSpec:
        if kind == "stream":
            return LoadSpec(
                url=url,
                key=key,
                clients=clients,
                api=api,
                duration=self.duration,
                # Clients that start together stay in lock-step; spread them over one stream.
                stagger=self.stream_seconds if clients > 1 else 0.0,
                words=self.words,
                chunks=self.chunks,
                delay_ms=self.delay_ms,
            )
        if kind in ("nonstream", "pool"):  # pool: the measurements before and after the burst
            return LoadSpec(url=url, key=key, clients=clients, stream=False, duration=self.duration)
        if kind == "unpaced":
            return LoadSpec(
                url=url,
                key=key,
                clients=clients,
                api=api,
                duration=self.duration,
                words=self.words,
                chunks=self.chunks,
            )
        # open: one long paced stream per client, all open together for ``hold`` seconds.
        length = self.ramp + self.hold + 0.5
        return LoadSpec(
            url=url,
            key=key,
            clients=clients,
            duration=0.0,
            stagger=self.ramp,
            words=self.words,
            chunks=self.chunks,
            delay_ms=round(length * 1000.0 / (self.chunks - 1), 3),
            warmup=False,
        )
