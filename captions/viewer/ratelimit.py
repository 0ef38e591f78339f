"""Per-key request budgets for the viewer server (token bucket), bounded in memory, and bounds on
the live connections it keeps open.

A link that leaks to the internet, or a script that hammers the server, gets a clear 429 with the
time to wait, instead of unlimited LiveKit tokens or transcript reads.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass

MAX_LIVE_PER_LINK = 1000
"""Open live connections on one link: a webinar's link is shared by its whole audience."""
MAX_LIVE_PER_ADDRESS = 100
"""From one address (an office behind one NAT counts as one)."""
MAX_LIVE_VIEWERS = 10_000
MAX_KEYS = 10_000
"""Keys remembered at most; the least recently seen are forgotten first (their bucket is full again)."""


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """`burst` requests at once per key, refilled at `per_minute` a minute."""

    def __init__(self, per_minute: float, burst: int, clock=time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = burst
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str) -> float:
        """Spends one request of `key`'s budget: 0 when allowed, else the seconds until one is."""
        now = self._clock()
        bucket = self._buckets.pop(key, None) or _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        self._buckets[key] = bucket
        while len(self._buckets) > MAX_KEYS:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


class OpenConnections:
    """Open live connections per address and per link (or room, for --open), and in all: opening them
    is rate limited, keeping them open is bounded too."""

    def __init__(self) -> None:
        self.by_address: collections.Counter[str] = collections.Counter()
        self.by_link: collections.Counter[str] = collections.Counter()
        self.total = 0

    def over_limit(self, address: str, link: str) -> str:
        if self.total >= MAX_LIVE_VIEWERS:
            return "This viewer server is full; try again later."
        if self.by_address[address] >= MAX_LIVE_PER_ADDRESS:
            return "Too many viewers open from this address."
        if self.by_link[link] >= MAX_LIVE_PER_LINK:
            return "Too many viewers open on this link."
        return ""

    @contextlib.contextmanager
    def counted(self, address: str, link: str):
        self.by_address[address] += 1
        self.by_link[link] += 1
        self.total += 1
        try:
            yield
        finally:
            self.total -= 1
            for counter, key in ((self.by_address, address), (self.by_link, link)):
                counter[key] -= 1
                if not counter[key]:
                    del counter[key]
