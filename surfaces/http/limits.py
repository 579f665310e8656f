"""Per-client rate limits (a token bucket per client id)."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


def retry_after(wait_s: float) -> str:
    """The ``Retry-After`` value for a wait: whole seconds, rounded up, at least 1 (RFC 9110
    10.2.3 allows only a non-negative integer; "0" would invite an immediate retry that is
    refused again)."""
    return str(max(1, math.ceil(wait_s)))


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """``rate_per_minute`` sustained, ``burst`` at once, per client. In memory: one process."""

    def __init__(self, rate_per_minute: float, burst: int, max_clients: int = 100_000) -> None:
        self.rate = rate_per_minute / 60.0
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None:
                if len(self._buckets) >= self.max_clients:  # forget idle clients, bounded memory
                    full = [
                        k for k, b in self._buckets.items() if self._level(b, now) >= self.burst
                    ]
                    for key in full:
                        del self._buckets[key]
                bucket = self._buckets[client] = _Bucket(float(self.burst), now)
            bucket.tokens = self._level(bucket, now)
            bucket.at = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            return (1 - bucket.tokens) / self.rate

    def _level(self, bucket: _Bucket, now: float) -> float:
        return min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
