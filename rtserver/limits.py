"""Rate limiting: token buckets, per key and server-wide.

``RateLimits`` holds every limit of the config in one place; each check raises
``ProtocolError(rate_limited)`` with ``retry_after`` (HTTP 429 with
Retry-After), counts the refusal by limit name and logs it.
"""

from __future__ import annotations

import time

from rtserver.config import LimitsConfig
from rtserver.log import get_logger
from rtserver.metrics import Metrics
from rtserver.protocol import RATE_LIMITED, ProtocolError

log = get_logger("rtserver.limits")


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up.

    ``take()`` returns 0.0 when a token was taken, else the seconds until one
    will be available (the ``retry_after`` a client is told).
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def full(self) -> bool:
        """True when the bucket has refilled to its burst (nothing to remember)."""
        now = time.monotonic()
        return self._tokens + (now - self._stamp) * self.rate >= self.burst

    def take(self, n: float = 1.0) -> float:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= n:
            self._tokens -= n
            return 0.0
        return (n - self._tokens) / self.rate if self.rate > 0 else float("inf")


class KeyedBuckets:
    """One ``TokenBucket`` per key (user, token subject, address), created on
    first use. Buckets that have refilled completely carry no state worth
    keeping, so ``prune`` drops them and memory stays bounded by active keys."""

    def __init__(self, rate: float, burst: float, prune_every: int = 10000) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}
        self._prune_every = prune_every
        self._ops = 0

    def take(self, key: str, n: float = 1.0) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        self._ops += 1
        if self._ops >= self._prune_every:
            self.prune()
        return bucket.take(n)

    def prune(self) -> None:
        self._ops = 0
        for key in [k for k, b in self._buckets.items() if b.full()]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimits:
    """The configured limits, with the state they need."""

    def __init__(self, config: LimitsConfig, metrics: Metrics) -> None:
        self.config = config
        self._metrics = metrics
        self._registers = KeyedBuckets(
            config.registers_per_minute / 60, config.registers_per_minute
        )
        self._http = KeyedBuckets(
            config.http_requests_per_second, 2 * config.http_requests_per_second
        )
        self._connections = TokenBucket(
            config.connections_per_second, 2 * config.connections_per_second
        )

    def refuse(
        self, limit: str, retry_after: float, message: str, **context: object
    ) -> ProtocolError:
        self._metrics.rate_limited.labels(limit).inc()
        log.info("rate_limited", limit=limit, retry_after=round(retry_after, 3), **context)
        return ProtocolError(
            RATE_LIMITED, message, status=429, extra={"retry_after": round(retry_after, 3)}
        )

    def frame_bucket(self) -> TokenBucket:
        """A new connection's own frames-per-second bucket."""
        return TokenBucket(self.config.frames_per_second, self.config.frame_burst)

    def check_frame(self, bucket: TokenBucket) -> None:
        wait = bucket.take()
        if wait:
            raise self.refuse("frames", wait, "too many frames; slow down")

    def check_register(self, user_id: str, open_sessions: int) -> None:
        if open_sessions >= self.config.max_connections_per_user:
            raise self.refuse(
                "connections_per_user",
                5.0,
                f"at most {self.config.max_connections_per_user} connections per user",
                user_id=user_id,
            )
        wait = self._registers.take(user_id)
        if wait:
            raise self.refuse("registers", wait, "too many registers; slow down", user_id=user_id)

    def check_http(self, key: str) -> None:
        wait = self._http.take(key)
        if wait:
            raise self.refuse("http", wait, "too many requests; slow down", key=key)

    def check_connection(self, open_connections: int) -> None:
        """Before a WebSocket upgrade: the server-wide caps."""
        if open_connections >= self.config.max_connections:
            raise self.refuse("max_connections", 5.0, "the server is full; try again later")
        wait = self._connections.take()
        if wait:
            raise self.refuse("connections", wait, "too many new connections; try again shortly")
