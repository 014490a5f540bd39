"""YAML configuration -> frozen, typed config.

Every section is a frozen msgspec Struct that forbids unknown keys, so a typo
stops start-up with one message naming the key (``ConfigError``). String values
may use ``${VAR}`` or ``${VAR:-default}`` to read the environment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from rtserver.protocol import describe_validation_error

DEV_SECRET = "dev-only-insecure-secret-change-me-0123456789"

Role = Literal["user", "publisher", "admin"]

#: The largest ``limits.max_notification_bytes`` allowed.
MAX_NOTIFICATION_BYTES = 2 * 1024 * 1024


class ConfigError(Exception):
    """A configuration problem, with a message that names the offending key."""


class StartupError(Exception):
    """The server cannot start (a port in use, a data directory it cannot
    write, a missing package): one line saying what failed and what to do."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8888
    #: "development" or "production"; production refuses the development secret.
    environment: Literal["development", "production"] = "development"
    #: Enables ``POST /api/test/notification/{user_id}`` (no token needed).
    test_routes: bool = False
    #: Browser origins allowed on /ws and in CORS, e.g. "https://app.example.com"
    #: or "https://*.example.com". Same-origin pages and non-browser clients
    #: always connect.
    allowed_origins: tuple[str, ...] = ()
    #: Trust X-Real-Ip / X-Forwarded-For from a reverse proxy.
    xheaders: bool = False
    #: Largest inbound WebSocket frame; bigger ones close the connection with 1009.
    max_frame_bytes: int = msgspec.field(default=65536)
    #: Largest HTTP request body.
    max_body_bytes: int = 1024 * 1024
    #: A new connection that has not sent its request within this many
    #: seconds is closed; until then it counts toward ``limits.max_connections``.
    handshake_timeout: float = 10.0
    #: WebSocket ping interval and pong timeout, in seconds (0 disables pings).
    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    #: Per-connection bound on bytes waiting to be written; a client that falls
    #: further behind is disconnected (close 1013, "slow client").
    max_outbound_bytes: int = 4 * 1024 * 1024
    #: A request repeated with the same ``Idempotency-Key`` header within
    #: this many seconds gets the first one's answer, without sending again.
    idempotency_ttl: float = 86400.0
    #: A key whose first request neither finished nor failed within this many
    #: seconds (its server died) may be taken by a retry, which runs it again
    #: with the same notification ids (stored once, pushed again: clients
    #: drop duplicates). Until then a retry is answered 409.
    idempotency_lease: float = 30.0
    #: Serve wss:// and https:// with this PEM certificate chain and key.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: A notification pushed to a receipts-session and not confirmed within
    #: this many seconds is pushed to the user's other receipts-sessions.
    receipt_timeout: float = 10.0
    #: Seconds to wait for clients and the store during graceful shutdown.
    shutdown_timeout: float = 10.0
    #: At shutdown clients are told to reconnect after a delay spread evenly
    #: over this many seconds, so they do not all return at once.
    reconnect_window: float = 5.0
    #: Serve ``GET /metrics`` without a token on this separate address (for
    #: a Prometheus on a private network); the main port keeps requiring an
    #: admin token. None: only the main port.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    #: The garbage collector's thresholds (``gc.set_threshold``). Python's
    #: default (700, 10, 10) runs young passes so often under load that
    #: in-flight sends get promoted and trigger full passes over every
    #: connection; 10,000 keeps each young pass short (about a millisecond)
    #: and full passes rare, while cyclic garbage is still reclaimed.
    gc_thresholds: tuple[int, int, int] = (10_000, 10, 10)
    #: Write coalescing: frames for one client wait until an event-loop turn
    #: writes nothing new (an idle loop turns in microseconds), and while every
    #: turn does (a loop at capacity) for at most this many turns and
    #: ``coalesce_max_delay`` seconds, then go out as one write. 0 turns
    #: writes every frame at once.
    coalesce_turns: int = 32
    coalesce_max_delay: float = 0.1
    #: At capacity (the last flush wrote to at least
    #: ``coalesce_busy_connections`` connections, the process used half a
    #: core or more since the flush before, and frames keep coming within
    #: this many seconds of it) frames wait this long, quiet turns or not, so
    #: that each client gets several per write. 0 turns it off.
    coalesce_busy_delay: float = 0.25
    coalesce_busy_connections: int = 1000
    #: Who speaks WebSocket on plain TCP: "rtserver" (its own RFC 6455 code,
    #: several times cheaper per accepted connection) or "tornado" (Tornado's
    #: WebSocketHandler, which always serves TLS and unusual upgrades).
    websocket: Literal["rtserver", "tornado"] = "rtserver"


class AuthConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    #: HMAC secret for HS256 tokens (and for ``run.py token``).
    secret: str | None = None
    #: Accepted algorithms: an explicit allowlist ("none" is never accepted).
    algorithms: tuple[Literal["HS256", "RS256", "ES256"], ...] = ("HS256",)
    #: PEM public key file for RS256/ES256 tokens.
    public_key_file: str | None = None
    #: JWKS file (``{"keys": [...]}``) for RS256/ES256 tokens; the token's
    #: ``kid`` header picks the key.
    jwks_file: str | None = None
    issuer: str | None = None
    audience: str | None = None
    #: Default lifetime of tokens minted by ``run.py token`` and the demo.
    token_ttl: int = 3600
    leeway: float = 5.0
    #: Seconds before a session's token expires that it gets a
    #: ``token_expiring`` push; at expiry, unless refreshed, it is closed (1008).
    expiry_warning: float = 60.0


class StoreConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    backend: Literal["sqlite", "mongodb"] = "sqlite"
    #: SQLite: the database file is ``<data_dir>/<filename>``.
    data_dir: str = "data"
    filename: str = "rtserver.db"
    #: MongoDB connection (issue: production store).
    uri: str | None = None
    database: str = "rtserver"
    collection: str = "notifications"
    #: Notifications older than this are removed (days).
    retention_days: float = 30.0
    #: Read notifications older than this (since being read) are removed; None
    #: keeps them for ``retention_days``.
    read_retention_days: float | None = 7.0
    #: How often the server purges expired notifications (seconds). MongoDB
    #: also expires them by itself through TTL indexes.
    cleanup_interval: float = 600.0
    #: MongoDB: notifications accepted while the database is unreachable are
    #: journaled to ``<data_dir>/mongodb-spool.db`` (synced before the 201) and
    #: replayed in order when it returns, or at the next start. Past this many
    #: bytes spooled the API answers 503.
    spool_max_bytes: int = 256 * 1024 * 1024
    #: MongoDB: retry delays (exponential backoff with full jitter), seconds.
    retry_base: float = 0.1
    retry_max: float = 5.0
    #: MongoDB: how long one operation waits for a reachable server (seconds).
    server_selection_timeout: float = 2.0
    #: MongoDB: how long a request sent waits for its answer (seconds). A
    #: server that stops answering counts as unreachable then: what is being
    #: sent goes to the outage spool (a write that did land is stored once
    #: anyway, by its id).
    operation_timeout: float = 5.0


class LoggingConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    #: "json" (one object per line), "console" (coloured, for people), or
    #: "auto": console on a TTY, JSON otherwise.
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    #: Per-logger levels, e.g. {"tornado.access": "warning"}.
    levels: dict[str, Literal["debug", "info", "warning", "error", "critical"]] = {}
    #: Seconds between ``metrics.snapshot`` log events (0 disables them).
    metrics_interval: float = 60.0


class LimitsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    #: Inbound frames per connection per second, with this much burst.
    frames_per_second: float = 50.0
    frame_burst: int = 100
    #: Largest notification payload accepted (encoded JSON bytes).
    max_notification_bytes: int = 16 * 1024
    #: Deepest nesting accepted in frame data and notification payloads.
    max_depth: int = 8
    #: Most keys in any one object of a payload.
    max_fields: int = 64
    #: Most notifications in one batch (POST /api/notifications).
    max_batch: int = 1000
    #: Most ids in one mark_read.
    max_ids_per_mark_read: int = 500
    #: Open connections one user may hold (tabs, devices).
    max_connections_per_user: int = 100
    #: register frames per user per minute (bursts up to the same number).
    registers_per_minute: float = 120.0
    #: HTTP API requests per second per token subject (per address for the
    #: unauthenticated test route), with twice that as burst.
    http_requests_per_second: float = 5000.0
    #: New WebSocket connections per second, server-wide, with twice that as
    #: burst: blunts reconnect storms while letting a load test open 10,000.
    connections_per_second: float = 5000.0
    #: Open WebSocket connections, server-wide.
    max_connections: int = 50000
    #: Most notifications offline delivery pushes at one register; older
    #: ones stay in the history (get_notifications).
    max_replay: int = 5000
    #: Topics one connection may subscribe to at once.
    max_subscriptions_per_connection: int = 100


class TopicsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    #: Publications each topic keeps for recovery and ``GET .../publications``.
    history_size: int = 100
    #: Seconds a publication is kept.
    history_ttl: float = 3600.0


class BrokerConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    #: "redis" joins a cluster through Redis pub/sub; "none" (or no broker
    #: section at all) is a single process.
    backend: Literal["redis", "none"] = "redis"
    url: str | None = "redis://127.0.0.1:6379/0"
    #: This node's id (letters, digits, ``_`` and ``-``; it starts every
    #: session id of the node); generated when not set.
    node_id: str | None = None
    #: Key and channel prefix, so several clusters can share one Redis.
    prefix: str = "rt"
    #: Seconds without a heartbeat (sent every third of this) after which a
    #: node is dead: its sessions leave the cluster view and answer 404.
    session_ttl: float = 3.0
    #: Seconds to wait for one Redis operation.
    timeout: float = 2.0
    #: Publishes waiting for Redis; past this they are skipped (the receivers'
    #: offline delivery and last_id resume cover them).
    outbox_limit: int = 100000


class PluginsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    #: Names of entry points in the ``rtserver.plugins`` group to load.
    enabled: tuple[str, ...] = ("registration", "notifications", "topics", "admin", "demo")
    #: Free-form settings per plugin, handed to the plugin by name.
    settings: dict[str, dict[str, Any]] = {}


class Config(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    store: StoreConfig = StoreConfig()
    logging: LoggingConfig = LoggingConfig()
    limits: LimitsConfig = LimitsConfig()
    plugins: PluginsConfig = PluginsConfig()
    topics: TopicsConfig = TopicsConfig()
    broker: BrokerConfig | None = None

    def replace(self, **sections: Any) -> Config:
        """A copy with whole sections replaced (tests and CLI overrides)."""
        return msgspec.structs.replace(self, **sections)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, path: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            found = os.environ.get(name)
            if found is not None and found != "":
                return found
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable {name} is not set")

        expanded = _ENV.sub(sub, value)
        # A value that was only a reference to an empty default means "unset".
        return None if expanded == "" and _ENV.fullmatch(value) else expanded
    return value


def parse_config(raw: Any, *, source: str = "<config>") -> Config:
    """Validate a mapping (already read from YAML) into a ``Config``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        config = msgspec.convert(_expand(raw, ""), Config, strict=True)
    except msgspec.ValidationError as err:
        raise ConfigError(f"{source}: {describe_validation_error(err)}") from None
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    check_config(config, source=source)
    return config


def check_config(config: Config, *, source: str = "<config>") -> None:
    """Cross-field rules that a schema cannot say."""
    auth = config.auth
    if "HS256" in auth.algorithms and not auth.secret:
        raise ConfigError(f"{source}: auth.secret: required when HS256 is allowed")
    if {"RS256", "ES256"} & set(auth.algorithms) and not (auth.public_key_file or auth.jwks_file):
        raise ConfigError(
            f"{source}: auth.public_key_file: required for RS256/ES256 (or auth.jwks_file)"
        )
    if config.server.environment == "production":
        if config.server.test_routes:
            raise ConfigError(
                f"{source}: server.test_routes: refused in production (they let anyone"
                " send notifications and mint tokens, and serve the demo)"
            )
        if auth.secret == DEV_SECRET:
            raise ConfigError(
                f"{source}: auth.secret: the development secret is refused in production"
            )
        if auth.secret is not None and len(auth.secret) < 32:
            raise ConfigError(f"{source}: auth.secret: must be at least 32 characters")
    if config.store.backend == "mongodb" and not config.store.uri:
        raise ConfigError(f"{source}: store.uri: required for the mongodb backend")
    for name, value in (
        ("server.port", config.server.port),
        ("server.max_frame_bytes", config.server.max_frame_bytes),
        ("limits.max_notification_bytes", config.limits.max_notification_bytes),
    ):
        if value < 0 or (value == 0 and name != "server.port"):
            raise ConfigError(f"{source}: {name}: must be positive")
    if config.limits.max_notification_bytes > MAX_NOTIFICATION_BYTES:
        # Under BSON's 16 MB per document however the JSON is shaped (a list
        # of small numbers grows about sixfold as BSON).
        raise ConfigError(
            f"{source}: limits.max_notification_bytes: at most {MAX_NOTIFICATION_BYTES}"
            " (2 MiB), so that every store can hold any notification accepted"
        )
    if not 0 < config.server.handshake_timeout <= 300:
        raise ConfigError(f"{source}: server.handshake_timeout: seconds, over 0 and at most 300")
    if not 0 < config.store.operation_timeout <= 300:
        raise ConfigError(f"{source}: store.operation_timeout: seconds, over 0 and at most 300")
    if config.store.spool_max_bytes < 4096:
        raise ConfigError(f"{source}: store.spool_max_bytes: at least 4096")
    if config.server.idempotency_ttl <= 0 or config.server.idempotency_lease <= 0:
        raise ConfigError(
            f"{source}: server.idempotency_ttl and server.idempotency_lease: seconds, over 0"
        )
    if not 0 <= config.server.coalesce_turns <= 1000:
        raise ConfigError(f"{source}: server.coalesce_turns: an integer from 0 to 1000")
    if not 0 < config.server.coalesce_max_delay <= 10:
        raise ConfigError(f"{source}: server.coalesce_max_delay: seconds, over 0 and at most 10")
    if not 0 <= config.server.coalesce_busy_delay <= 10:
        raise ConfigError(f"{source}: server.coalesce_busy_delay: seconds, from 0 to 10")
    if config.server.coalesce_busy_connections < 1:
        raise ConfigError(f"{source}: server.coalesce_busy_connections: an integer, at least 1")
    if min(config.server.gc_thresholds) < 1:
        raise ConfigError(
            f"{source}: server.gc_thresholds: three positive integers (0 would disable collection)"
        )
    broker = config.broker
    if (
        broker is not None
        and broker.node_id is not None
        and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", broker.node_id)
    ):
        raise ConfigError(f"{source}: broker.node_id: 1-64 letters, digits, '_' or '-'")
    if broker is not None and not 0.3 <= broker.session_ttl <= 3600:
        raise ConfigError(f"{source}: broker.session_ttl: seconds, from 0.3 to 3600")
    if not 1 <= config.topics.history_size <= 10000:
        raise ConfigError(f"{source}: topics.history_size: from 1 to 10000")
    if config.topics.history_ttl <= 0:
        raise ConfigError(f"{source}: topics.history_ttl: seconds, over 0")
    unknown = set(config.plugins.settings) - set(config.plugins.enabled)
    if unknown:
        raise ConfigError(f"{source}: plugins.settings.{sorted(unknown)[0]}: plugin is not enabled")


def load_config(path: str | Path | None) -> Config:
    """Read a YAML file (or the built-in defaults when ``path`` is None)."""
    if path is None:
        return parse_config({"auth": {"secret": DEV_SECRET}}, source="<defaults>")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{p}: cannot read config: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: invalid YAML: {err}") from None
    return parse_config(raw, source=str(p))
