"""What one benchmark run measures: the scenarios, their sizes and durations.

Every scenario runs against both sides (the mock directly, and the proxy) with the same
``LoadSpec``; only the URL and the key differ.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from luthien_control.bench.load import LoadSpec

DEFAULT_ROUNDS = 3
DEFAULT_DURATION = 5.0
DEFAULT_STREAMS = 1000
QUICK_STREAMS = 200
KINDS = ("stream", "nonstream", "unpaced", "open")
# Scenarios measured on a freshly started proxy, after all the others: memory only grows.
MEMORY_KINDS = ("open",)


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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
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
        )

    @property
    def stream_seconds(self) -> float:
        return (self.chunks - 1) * self.delay_ms / 1000.0

    def scenarios(self, only: set[str] | None) -> dict[str, dict[str, Any]]:
        """Name → kind and clients, in the order they run within a round."""
        found: dict[str, dict[str, Any]] = {}
        if only is None or "stream" in only:
            for clients in self.stream_clients:
                found[f"stream_{clients}"] = {"kind": "stream", "clients": clients}
        if only is None or "nonstream" in only:
            found[f"nonstream_{self.request_clients}"] = {
                "kind": "nonstream",
                "clients": self.request_clients,
            }
        if only is None or "unpaced" in only:
            found[f"unpaced_{self.unpaced_clients}"] = {
                "kind": "unpaced",
                "clients": self.unpaced_clients,
            }
        if only is None or "open" in only:
            found["open_64"] = {"kind": "open", "clients": 64}
            found["open_many"] = {"kind": "open", "clients": self.streams}
        return found

    def spec(self, kind: str, clients: int, url: str, key: str) -> LoadSpec:
        if kind == "stream":
            return LoadSpec(
                url=url,
                key=key,
                clients=clients,
                duration=self.duration,
                # Clients that start together stay in lock-step; spread them over one stream.
                stagger=self.stream_seconds if clients > 1 else 0.0,
                words=self.words,
                chunks=self.chunks,
                delay_ms=self.delay_ms,
            )
        if kind == "nonstream":
            return LoadSpec(url=url, key=key, clients=clients, stream=False, duration=self.duration)
        if kind == "unpaced":
            return LoadSpec(
                url=url,
                key=key,
                clients=clients,
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
