"""Per-caller rate limit: a leaky bucket kept in PostgreSQL, so every node shares it.

A statement per request would make the limiter one of the costliest parts of a
request. So a process charges the shared bucket ahead, in chunks of about
ALLOWANCE_AHEAD_S worth of the rate (at most half the burst), and spends the chunk
locally; what it has not spent after ALLOWANCE_TTL_S lapses. Every request that is let
through was charged to the shared bucket first, so no node, and no number of nodes
together, lets a caller past its rate; a lapsed token only makes the limit a little
stricter. When a chunk is refused, a single request is tried, so a caller close to its
limit is served exactly as without chunks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from django.conf import settings

from omniva import services

ALLOWANCE_AHEAD_S = 0.05
ALLOWANCE_TTL_S = 1.0
MAX_BUCKETS_HELD = 10_000


@dataclass
class _Allowance:
    tokens: int
    lapses_at: float


class Allowances:
    """This process's unspent, already charged requests, by bucket."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, _Allowance] = {}

    def take(self, bucket: str, *, rate_per_s: float, burst: int) -> float | None:
        """Spend one request of `bucket`: None when allowed, else seconds to wait."""
        now = time.monotonic()
        with self._lock:
            held = self._held.get(bucket)
            if held is not None and held.tokens > 0 and held.lapses_at > now:
                held.tokens -= 1
                return None
        chunk = int(min(rate_per_s * ALLOWANCE_AHEAD_S, burst / 2))
        if chunk > 1 and (
            services.rate_limit_take(bucket=bucket, rate_per_s=rate_per_s, burst=burst, count=chunk)
            is None
        ):
            with self._lock:
                if len(self._held) >= MAX_BUCKETS_HELD:
                    self._held = {b: a for b, a in self._held.items() if a.lapses_at > now}
                self._held[bucket] = _Allowance(chunk - 1, now + ALLOWANCE_TTL_S)
            return None
        return services.rate_limit_take(bucket=bucket, rate_per_s=rate_per_s, burst=burst)

    def forget(self) -> None:
        with self._lock:
            self._held.clear()


allowances = Allowances()


def rate_limit_spend(bucket: str) -> float | None:
    """One request of `bucket` at the configured rate (REST and gRPC share it)."""
    return allowances.take(
        bucket, rate_per_s=settings.OMNIVA_RATE_LIMIT, burst=settings.OMNIVA_RATE_BURST
    )
