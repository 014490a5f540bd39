"""Counters and histograms on one registry per server.

Prometheus (``GET /metrics``) and JSON (``get_connection_metrics()``, the
periodic ``metrics.snapshot`` log event) read the same registry, so the two
never disagree. Counts are incremented once per operation, never per socket
inside a fan-out loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import generate_latest

from rtserver.protocol import ERROR_CODES

#: The names ``RateLimits`` counts refusals under (``rtserver_rate_limited{limit}``).
RATE_LIMITS = (
    "frames",
    "connections_per_user",
    "registers",
    "http",
    "connections",
    "max_connections",
)

_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """Every metric rtserver exports; see docs/operations.md for meanings."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge("rtserver_connections", "Open WebSocket connections", registry=r)
        self.connections_total = Counter(
            "rtserver_connections_accepted", "WebSocket connections accepted", registry=r
        )
        self.connections_peak = Gauge(
            "rtserver_connections_peak", "Most connections open at once", registry=r
        )
        self.registered_users = Gauge(
            "rtserver_registered_users", "Users with at least one session", registry=r
        )
        self.sessions = Gauge("rtserver_sessions", "Registered sessions", registry=r)
        self.frames_in = Counter(
            "rtserver_frames_in", "Client frames received, by event", ["event"], registry=r
        )
        self.frames_out = Tally(
            "rtserver_frames_out", "Frames written to clients, by event", "event"
        )
        r.register(self.frames_out)
        self.errors = Counter(
            "rtserver_errors", "Error replies sent, by code", ["code"], registry=r
        )
        self.handler_seconds = Histogram(
            "rtserver_handler_seconds",
            "Event handler latency, by plugin and event",
            ["plugin", "event"],
            buckets=_FAST,
            registry=r,
        )
        self.deliveries = Tally(
            "rtserver_deliveries",
            "Frames delivered to sessions, by kind (user, session, broadcast, topic)",
            "kind",
        )
        r.register(self.deliveries)
        self.notifications = Counter(
            "rtserver_notifications", "Notifications accepted and stored", registry=r
        )
        self.publications = Counter(
            "rtserver_publications", "Topic publications accepted and stored", registry=r
        )
        self.subscriptions = Gauge(
            "rtserver_subscriptions", "Topic subscriptions of this node's sessions", registry=r
        )
        self.confirmed = Counter(
            "rtserver_receipts_confirmed",
            "Notifications confirmed by a receipts-session",
            registry=r,
        )
        self.resends = Counter(
            "rtserver_receipts_resent",
            "Unconfirmed notifications pushed again to another session",
            registry=r,
        )
        self.requeued = Counter(
            "rtserver_requeued",
            "Notifications sent to a session without receipts that ended before"
            " the kernel took them: undelivered again, offered at the next register",
            registry=r,
        )
        self.confirm_seconds = Histogram(
            "rtserver_receipt_seconds",
            "From push to receipt, for receipts-sessions",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0),
            registry=r,
        )
        self.store_seconds = Histogram(
            "rtserver_store_seconds",
            "Store operation latency, by operation",
            ["op"],
            buckets=_FAST,
            registry=r,
        )
        self.store_errors = Counter(
            "rtserver_store_errors", "Failed store operations, by operation", ["op"], registry=r
        )
        self.slow_disconnects = Counter(
            "rtserver_slow_client_disconnects",
            "Sessions closed because their outbound queue was full",
            registry=r,
        )
        self.accept_pauses = Counter(
            "rtserver_accept_pauses",
            "Times accepting paused because descriptors or memory ran out",
            registry=r,
        )
        self.rate_limited = Counter(
            "rtserver_rate_limited",
            "Requests refused by a rate limit, by limit",
            ["limit"],
            registry=r,
        )
        self.outbound_bytes = Gauge(
            "rtserver_outbound_queue_bytes", "Bytes waiting in all outbound queues", registry=r
        )
        self.outbound_max = Gauge(
            "rtserver_outbound_queue_max_bytes",
            "Bytes waiting in the fullest outbound queue",
            registry=r,
        )
        self.socket_writes = _LiveCounter(
            "rtserver_socket_writes",
            "Writes to client sockets; one carries several frames when coalesced",
        )
        r.register(self.socket_writes)
        self.held_flushes = _LiveCounter(
            "rtserver_held_flushes",
            "Flushes held for coalesce_busy_delay because the server was at capacity",
        )
        r.register(self.held_flushes)
        self.store_buffered = Gauge(
            "rtserver_store_buffered",
            "Notifications accepted but waiting for an unreachable store",
            registry=r,
        )
        self.store_dead_letters = Gauge(
            "rtserver_store_dead_letters",
            "Notifications MongoDB refused when the outage spool was replayed, not yet"
            " removed by an operator (GET /api/admin/dead_letters)",
            registry=r,
        )
        self.idempotent_replays = Counter(
            "rtserver_idempotent_replays",
            "Requests answered from an earlier request with the same Idempotency-Key",
            registry=r,
        )
        # Known labels start at zero, so that a dashboard shows 0 rather than
        # no data until the first error, refusal or failed write.
        for code in ERROR_CODES:
            self.errors.labels(code)
        for limit in RATE_LIMITS:
            self.rate_limited.labels(limit)
        for op in ("insert", "get", "after", "mark_delivered", "mark_undelivered"):
            self.store_errors.labels(op)

    def bind_gauges(
        self,
        *,
        connections: Callable[[], float],
        peak: Callable[[], float],
        users: Callable[[], float],
        sessions: Callable[[], float],
        outbound: Callable[[], float],
        outbound_max: Callable[[], float],
        store_buffered: Callable[[], float],
        store_dead_letters: Callable[[], float],
        subscriptions: Callable[[], float],
        socket_writes: Callable[[], float],
        held_flushes: Callable[[], float],
    ) -> None:
        """Gauges read live state when scraped instead of being kept in step."""
        self.connections.set_function(connections)
        self.connections_peak.set_function(peak)
        self.registered_users.set_function(users)
        self.sessions.set_function(sessions)
        self.outbound_bytes.set_function(outbound)
        self.outbound_max.set_function(outbound_max)
        self.store_buffered.set_function(store_buffered)
        self.store_dead_letters.set_function(store_dead_letters)
        self.subscriptions.set_function(subscriptions)
        self.socket_writes.read = socket_writes
        self.held_flushes.read = held_flushes

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """All metrics as plain JSON: scalars, or label-value -> number maps;
        histograms give ``{"count", "sum"}`` (per label value when labelled)."""
        out: dict[str, Any] = {}
        for family in self.registry.collect():
            name = family.name.removeprefix("rtserver_")
            for sample in family.samples:
                suffix = sample.name.removeprefix(family.name)
                if suffix in ("_created", "_bucket"):
                    continue
                label = ",".join(str(v) for v in sample.labels.values())
                if family.type == "histogram":
                    key = suffix.lstrip("_")  # count | sum
                    slot = out.setdefault(name, {})
                    if label:
                        slot = slot.setdefault(label, {})
                    slot[key] = sample.value
                elif label:
                    out.setdefault(name, {})[label] = sample.value
                else:
                    out[name + ("_total" if suffix == "_total" else "")] = sample.value
        return out


class Tally:
    """A labelled counter kept as plain integers, for paths too hot for a
    Prometheus counter (which takes a lock per increment); IOLoop thread only,
    exported when scraped."""

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.counts: dict[str, float] = {}

    def inc(self, key: str, n: float = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for key, value in sorted(self.counts.items()):
            family.add_metric([key], value)
        return [family]


class _LiveCounter:
    """A counter kept as a plain number elsewhere (too hot a path for a
    Prometheus counter's lock), read when scraped."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self.read: Callable[[], float] = lambda: 0

    def collect(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation, value=self.read())]
