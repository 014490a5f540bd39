"""Tornado handlers: the WebSocket at /ws, the JSON API base class, health.

The WebSocket handler owns nothing but the socket: frames are decoded by
``protocol``, dispatched by a dictionary lookup into the plugins' handlers,
and every reply goes out through ``Delivery``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import inspect
import socket
import time
from asyncio import Future
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import structlog
import tornado.web
import tornado.websocket
from tornado.iostream import IOStream, SSLIOStream, StreamBufferFullError, StreamClosedError
from tornado.websocket import WebSocketProtocol, WebSocketProtocol13, _WebSocketParams

from rtserver.auth import Claims, require_role
from rtserver.config import Role
from rtserver.hub import Hub
from rtserver.idempotency import Answer, Keys, body_fingerprint, check_key
from rtserver.limits import TokenBucket
from rtserver.log import get_logger
from rtserver.plugins import EventContext, Plugins, Registered
from rtserver.protocol import (
    BAD_REQUEST,
    CLOSE_TIMEOUT,
    FORBIDDEN,
    INTERNAL_ERROR,
    NOT_REGISTERED,
    UNAUTHORIZED,
    UNAVAILABLE,
    UNKNOWN_EVENT,
    UNSUPPORTED,
    ProtocolError,
    check_shape,
    close_frame_fault,
    close_payload,
    decode_data,
    decode_frame,
    decode_json,
    encode_json,
    salvage_id,
)
from rtserver.sessions import Connection, Stream, Transport
from rtserver.stores.base import StoreError

T = TypeVar("T")
log = get_logger("rtserver")
_access = get_logger("tornado.access")

_ANY_OBJECT = dict[str, Any]


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Exact origins, or ``scheme://*.example.com`` wildcards (any depth of
    subdomain, not the bare domain)."""
    origin = origin.lower().rstrip("/")
    for pattern in allowed:
        pattern = pattern.lower().rstrip("/")
        if pattern == "*" or origin == pattern:
            return True
        if "*" in pattern:
            p, o = urlsplit(pattern), urlsplit(origin)
            if p.scheme == o.scheme and fnmatch.fnmatchcase(o.netloc, p.netloc):
                return True
    return False


class Dispatcher:
    """Frame -> handler -> reply. One per server; stateless per frame."""

    def __init__(self, hub: Hub, plugins: Plugins) -> None:
        self.hub = hub
        self.events: dict[str, Registered] = plugins.events
        self.delivery = hub.delivery
        self.metrics = hub.metrics
        self._timers = {
            name: hub.metrics.handler_seconds.labels(reg.plugin, name)
            for name, reg in self.events.items()
        }
        self._frames_in = {name: hub.metrics.frames_in.labels(name) for name in self.events}
        self._frames_unknown = hub.metrics.frames_in.labels("_unknown")

    def error(self, conn: Connection, frame_id: Any, err: ProtocolError) -> None:
        self.metrics.errors.labels(err.code).inc()
        self.delivery.reply(conn, frame_id, "error", err.as_data())

    async def dispatch(self, conn: Connection, text: str, bucket: TokenBucket) -> None:
        """Handle one text frame; never raises."""
        frame_id: Any = None
        conn.in_dispatch = True
        if conn.user_id is not None:
            # Each frame runs in its own task; bind once per frame so every
            # event a handler logs carries the user (session_id is inherited).
            structlog.contextvars.bind_contextvars(user_id=conn.user_id)
        try:
            self.hub.limits.check_frame(bucket)
            try:
                frame = decode_frame(text)
            except ProtocolError:
                frame_id = salvage_id(text)
                raise
            frame_id = frame.id
            reg = self.events.get(frame.event)
            if reg is None:
                self._frames_unknown.inc()
                raise ProtocolError(UNKNOWN_EVENT, f"unknown event {frame.event!r}")
            self._frames_in[frame.event].inc()
            spec = reg.spec
            if spec.requires_registration and not conn.registered:
                raise ProtocolError(NOT_REGISTERED, "register first")
            if spec.role is not None:
                require_role(conn.role, spec.role)
            if spec.schema is None:
                data = decode_data(frame.data, _ANY_OBJECT)
                limits = self.hub.config.limits
                check_shape(data, max_depth=limits.max_depth, max_fields=limits.max_fields)
            else:
                data = decode_data(frame.data, spec.schema)
            ctx = EventContext(self.hub, conn, frame.event, frame_id)
            t0 = time.perf_counter()
            try:
                result = spec.handler(ctx, data)
                if inspect.isawaitable(result):
                    result = await result
            finally:
                self._timers[frame.event].observe(time.perf_counter() - t0)
            if frame_id is not None:
                self.delivery.reply(conn, frame_id, "ack", result or {})
        except ProtocolError as err:
            self.error(conn, frame_id, err)
        except StoreError as err:
            log.warning("store.unavailable", error=str(err))
            self.error(
                conn, frame_id, ProtocolError(UNAVAILABLE, "the store is unavailable; try again")
            )
        except Exception:
            log.exception("handler.failed")
            self.error(
                conn,
                frame_id,
                ProtocolError(INTERNAL_ERROR, "the server failed to handle this event"),
            )
        finally:
            conn.in_dispatch = False
            for callback in conn.take_after_reply():
                callback()


class Endpoint:
    """What a WebSocket means to the hub, whichever code speaks the protocol:
    Tornado's ``WebSocketHandler`` (``ConnectionHandler``) or rtserver's own
    (``rtserver.websocket``). One per server; the per-connection state is the
    ``Connection`` and its frame bucket."""

    def __init__(self, hub: Hub, plugins: Plugins, dispatcher: Dispatcher) -> None:
        self.hub = hub
        self.plugins = plugins
        self.dispatcher = dispatcher
        self.allowed_origins = hub.config.server.allowed_origins
        #: Plain-TCP connections accepted that have not sent their request
        #: yet: they count toward ``limits.max_connections``.
        self.handshakes = 0

    def refusal(self) -> ProtocolError | None:
        """Why an upgrade must be refused now (shutting down, a server-wide
        cap), or None. Takes a token from the new-connections bucket."""
        try:
            if self.hub.shutting_down:
                raise ProtocolError(UNAVAILABLE, "server is shutting down", status=503)
            self.hub.limits.check_connection(len(self.hub.sessions) + self.handshakes)
        except ProtocolError as err:
            return err
        return None

    def origin_allowed(self, origin: str) -> bool:
        """For a cross-origin browser request: is ``origin`` configured?"""
        allowed = origin_allowed(origin, self.allowed_origins)
        if not allowed:
            log.warning("connection.origin_refused", origin=origin)
        return allowed

    def open(
        self,
        transport: Transport,
        remote_ip: str | None,
        stream: Stream | None,
        sock: socket.socket | None,
    ) -> Connection:
        """The upgrade is done: a Connection, known to the hub, hooks fired."""
        hub = self.hub
        conn = Connection(
            transport,
            remote_ip,
            outbox=hub.delivery.outbox,
            session_id=hub.sessions.new_session_id(),
        )
        conn.last_seen = time.monotonic()
        if stream is not None:
            stream.max_write_buffer_size = hub.config.server.max_outbound_bytes
            conn.attach(stream, sock)
        conn.on_slow = self._on_slow
        conn.on_gone = self._gone
        conn.on_finished = hub.connection_finished
        hub.sessions.add(conn)
        hub.metrics.connections_total.inc()
        structlog.contextvars.bind_contextvars(session_id=conn.session_id)
        log.info("connection.opened", remote_ip=conn.remote_ip)
        self._fire("rtserver_connect", conn)
        return conn

    def message(
        self, conn: Connection, bucket: TokenBucket, message: str | bytes
    ) -> Coroutine[Any, Any, None] | None:
        """One inbound message; an awaitable when its handler is still running
        (the next message of this connection waits for it)."""
        if conn.closed:
            return None
        conn.last_seen = time.monotonic()
        if isinstance(message, bytes):
            self.dispatcher.error(
                conn,
                None,
                ProtocolError(UNSUPPORTED, "binary frames are not supported; send JSON text"),
            )
            return None
        return self.dispatcher.dispatch(conn, message, bucket)

    def _on_slow(self, conn: Connection) -> None:
        self.hub.metrics.slow_disconnects.inc()
        log.warning(
            "connection.slow_client",
            user_id=conn.user_id,
            limit=self.hub.config.server.max_outbound_bytes,
        )

    def _fire(self, hook: str, conn: Connection) -> None:
        try:
            results = self.plugins.notify(hook, hub=self.hub, connection=conn)
        except Exception:
            log.exception("hook.failed", hook=hook)
            return
        for result in results:
            if inspect.isawaitable(result):
                self.hub.spawn(_awaitable(result))

    def _gone(self, conn: Connection) -> None:
        """Once per connection, when it stops being usable."""
        self.hub.connection_gone(conn)
        code, reason = conn.peer_close()
        log.info(
            "connection.closed",
            user_id=conn.user_id,
            code=code,
            reason=conn.close_reason or reason,
            seconds=round(time.time() - conn.connected_at, 3),
        )
        self._fire("rtserver_disconnect", conn)


class StrictProtocol(WebSocketProtocol13):
    """Tornado's RFC 6455 code, failing a connection as rtserver's own does:
    a close frame saying why (1002, or 1007 for text that is not UTF-8, in
    a text message or a close reason) and a clean end of TCP, instead of a
    reset; and close codes a peer may not send are protocol errors."""

    _failure: tuple[int, str] = (1002, "protocol error")

    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None:
        if self.client_terminated:
            return None
        if opcode == 0x1:
            self._message_bytes_in += len(data)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self._fail(1007, "text frames must be UTF-8")
                return None
            return self._run_callback(self.handler.on_message, text)
        if opcode == 0x8:
            fault = close_frame_fault(data)
            if fault is not None:
                self._fail(*fault)
                return None
        return super()._handle_message(opcode, data)

    def _fail(self, code: int, reason: str) -> None:
        self._failure = (code, reason)
        self._abort()

    def _abort(self) -> None:
        """A protocol error (else a dead stream or a close timeout: Tornado's
        own abort): say why, stop reading frames, end our side of TCP after
        the close frame and read what the peer still sends until it closes
        (closing with unread input would reset the connection)."""
        stream = self.stream
        if stream is None or stream.closed() or self.server_terminated:
            super()._abort()
            return
        handler = self.handler
        assert isinstance(handler, ConnectionHandler)
        if handler.conn is not None:
            handler.conn.flush()  # what was written before goes first
        self.client_terminated = self.server_terminated = True
        code, reason = self._failure
        try:
            written = self._write_frame(True, 0x8, close_payload(code, reason))
        except StreamClosedError:
            super()._abort()
            return
        linger(stream, written)


_lingering: set[asyncio.Task[None]] = set()


def linger(stream: IOStream, written: Awaitable[None]) -> None:
    """After the last answer on a connection (a close frame failing a
    WebSocket, a 413): once it is written, end our side of TCP, read and drop
    what the peer still sends until it closes (at most ``CLOSE_TIMEOUT``),
    then close. Closing with unread input would send a reset, which can
    reach the peer before the answer and lose it."""
    task = asyncio.get_running_loop().create_task(_linger(stream, written))
    _lingering.add(task)
    task.add_done_callback(_lingering.discard)


async def _linger(stream: IOStream, written: Awaitable[None]) -> None:
    # Each way this ends (the peer closes, resets, or outlasts CLOSE_TIMEOUT)
    # ends the same: the stream closed.
    try:
        with contextlib.suppress(StreamClosedError, OSError, TimeoutError):
            await written
            sock = stream.socket  # None once the peer has closed
            if sock is not None and not isinstance(stream, SSLIOStream):
                sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(CLOSE_TIMEOUT):
                while True:
                    await stream.read_bytes(65536, partial=True)
    finally:
        stream.close()


class ConnectionHandler(tornado.websocket.WebSocketHandler):
    """``/ws`` through Tornado's WebSocket code: one instance per connection.
    Serves TLS connections and whatever ``rtserver.websocket.Server`` passes
    on (or everything, with ``server.websocket: tornado``)."""

    def initialize(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.conn: Connection | None = None
        self.bucket = endpoint.hub.limits.frame_bucket()

    def check_origin(self, origin: str) -> bool:
        # Tornado 6.6 calls this only for cross-origin browser requests.
        return self.endpoint.origin_allowed(origin)

    def get_compression_options(self) -> None:
        return None  # frames are framed once and shared; no per-socket deflate

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        if self.request.headers.get("Sec-WebSocket-Version") != "13":
            return None
        params = _WebSocketParams(
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            max_message_size=self.max_message_size,
            compression_options=None,
        )
        return StrictProtocol(self, False, params)

    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Refuse before the upgrade when shutting down or over a server-wide cap."""
        err = self.endpoint.refusal()
        if err is not None:
            self.set_status(err.status)
            if "retry_after" in err.extra:
                self.set_header("Retry-After", retry_after(err))
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(encode_json({"error": err.as_data()}))
            return
        await super().get(*args, **kwargs)

    def _stream(self) -> IOStream | None:
        ws = self.ws_connection
        if ws is None or ws.is_closing():
            return None
        return getattr(ws, "stream", None)

    def outbound_bytes(self) -> int:
        buf = getattr(self._stream(), "_write_buffer", None)
        return len(buf) if buf is not None else 0

    def send_ping(self) -> None:
        ws = self.ws_connection
        if ws is not None and not ws.is_closing():
            # A failed ping needs nothing here: the heartbeat reaps a silent peer.
            with contextlib.suppress(StreamClosedError, StreamBufferFullError):
                ws.write_ping(b"")

    def abort(self) -> None:
        ws = self.ws_connection
        stream = getattr(ws, "stream", None) if ws is not None else None
        if stream is not None:
            stream.close()  # on_close follows

    def on_ping(self, data: bytes) -> None:
        # Tornado has answered it already; a pong past the outbound bound
        # raised StreamBufferFullError there, which closes the connection.
        self._control()

    def on_pong(self, data: bytes) -> None:
        if self._control() and self.conn is not None:
            self.conn.alive(time.monotonic())

    def _control(self) -> bool:
        """Control frames count toward the frame rate; a flood closes (1008)."""
        try:
            self.endpoint.hub.limits.check_frame(self.bucket)
        except ProtocolError as err:
            if self.conn is not None:
                self.conn.close(1008, err.message)
            return False
        return True

    def open(self, *args: str, **kwargs: str) -> None:
        stream = self._stream()
        # Direct socket writes only on plain TCP: TLS bytes must go through SSL.
        sock = None if stream is None or isinstance(stream, SSLIOStream) else stream.socket
        self.set_nodelay(True)
        self.conn = self.endpoint.open(self, self.request.remote_ip, stream, sock)

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        if self.conn is None:
            return None
        return self.endpoint.message(self.conn, self.bucket, message)

    def on_close(self) -> None:
        if self.conn is not None:
            self.conn.finished()


def retry_after(err: ProtocolError) -> str:
    """The Retry-After header for a refusal that carries ``retry_after``."""
    return str(max(1, round(err.extra["retry_after"])))


def log_access(method: str, path: str, status: int, seconds: float, remote_ip: str | None) -> None:
    """One HTTP request as a structured event (the query string is left out, so
    a token misplaced in a URL still never reaches the log)."""
    level = "info" if status < 400 else "warning" if status < 500 else "error"
    getattr(_access, level)(
        "http.request",
        method=method,
        path=path,
        status=status,
        ms=round(1000 * seconds, 2),
        remote_ip=remote_ip,
    )


async def _awaitable(result: Awaitable[Any]) -> None:
    await result


class APIHandler(tornado.web.RequestHandler):
    """Base for JSON routes (core and plugins): auth, bodies, errors, CORS.

    Raise ``ProtocolError`` anywhere in a handler to answer
    ``{"error": {"code", "message"}}`` with its status.
    """

    def initialize(self, hub: Hub, **kwargs: Any) -> None:
        self.hub = hub
        self.route_options = kwargs

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        origin = self.request.headers.get("Origin")
        if origin and origin_allowed(origin, self.hub.config.server.allowed_origins):
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Vary", "Origin")

    def options(self, *args: str) -> None:
        """CORS preflight: allowed origins get the methods and headers."""
        origin = self.request.headers.get("Origin")
        if not origin or not origin_allowed(origin, self.hub.config.server.allowed_origins):
            raise ProtocolError(FORBIDDEN, "origin not allowed", status=403)
        self.set_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
        self.set_header(
            "Access-Control-Allow-Headers", "Authorization, Content-Type, Idempotency-Key"
        )
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    # -- helpers for subclasses ------------------------------------------

    def claims(self, role: Role = "user") -> Claims:
        """The bearer token's claims, requiring at least ``role``."""
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ProtocolError(UNAUTHORIZED, "Authorization: Bearer TOKEN required", status=401)
        claims = self.hub.auth.verify(token.strip())
        self.hub.limits.check_http(f"sub:{claims.sub}")
        claims.require(role)
        return claims

    def rate_limit_by_address(self) -> None:
        """For routes without a token: limit by client address."""
        self.hub.limits.check_http(f"ip:{self.request.remote_ip}")

    def body(self, schema: type[T] | None = None) -> Any:
        """The JSON body, validated against ``schema`` when given."""
        raw = self.request.body
        if not raw:
            raise ProtocolError(BAD_REQUEST, "body: a JSON object is required")
        if schema is None:
            return decode_json(raw)
        try:
            return msgspec.json.decode(raw, type=schema)
        except msgspec.ValidationError as err:
            raise ProtocolError(BAD_REQUEST, f"body: {err}") from None
        except msgspec.DecodeError as err:
            raise ProtocolError(BAD_REQUEST, f"invalid JSON: {err}") from None
        except RecursionError:
            raise ProtocolError("too_large", "body: nested too deeply", status=413) from None

    def send(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(encode_json(obj))

    def idempotency_key(self, subject: str) -> str | None:
        """The request's ``Idempotency-Key``, scoped to ``subject`` (the
        token's), or None; ``bad_request`` when malformed."""
        key = self.request.headers.get("Idempotency-Key")
        return None if key is None else Keys.scoped(subject, check_key(key))

    async def send_once(
        self,
        subject: str,
        call: Callable[[str | None], Awaitable[tuple[Any, int]]],
    ) -> None:
        """Answer with ``call(notification_id)`` -> (body, status), once per
        ``Idempotency-Key``: a repeat gets the first answer (see
        ``rtserver.idempotency``). Without a key the id is None (a new one)."""
        key = self.idempotency_key(subject)
        if key is None:
            body, status = await call(None)
            self.send(body, status)
            return

        async def run(ids: Sequence[str]) -> Answer:
            body, status = await call(ids[0])
            return Answer(status, encode_json(body))

        fp = body_fingerprint(self.request.method, self.request.path, self.request.body)
        answer = await self.hub.keys.run(key, fp, [self.hub.new_id()], run)
        if answer.replayed:
            self.set_header("Idempotent-Replayed", "true")
        self.set_status(answer.status)
        self.finish(answer.body)

    # -- errors ----------------------------------------------------------

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ProtocolError | StoreError):
            return
        super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ProtocolError):
            err = exc
        elif isinstance(exc, StoreError) and exc.delivered:
            err = ProtocolError(
                UNAVAILABLE,
                f"the store is unavailable: the notification reached {exc.delivered} live"
                " session(s) but is not stored (not in history, no offline delivery)",
                status=503,
                extra={"delivered": exc.delivered},
            )
        elif isinstance(exc, StoreError):
            err = ProtocolError(
                UNAVAILABLE,
                "the store is unavailable; the notification was not accepted",
                status=503,
            )
        elif isinstance(exc, tornado.web.HTTPError):
            err = ProtocolError(
                "not_found"
                if exc.status_code == 404
                else BAD_REQUEST
                if exc.status_code < 500
                else INTERNAL_ERROR,
                exc.reason or self._reason,
                status=exc.status_code,
            )
        else:
            err = ProtocolError(INTERNAL_ERROR, "internal server error", status=500)
        if err.status in (409, 429) and "retry_after" in err.extra:
            self.set_header("Retry-After", str(max(1, round(err.extra["retry_after"]))))
        self.set_status(err.status)
        self.finish(encode_json({"error": err.as_data()}))


class HealthHandler(APIHandler):
    """``GET /healthz``: the process answers."""

    def get(self) -> None:
        self.send({"status": "ok"})


class ReadyHandler(APIHandler):
    """``GET /readyz``: 200 when the store answers and we are not shutting down."""

    async def get(self) -> None:
        store_ok = await self.hub.store.ping()
        ready = store_ok and not self.hub.shutting_down
        broker = self.hub.broker
        self.send(
            {
                "status": "ready" if ready else "unavailable",
                "store": "ok" if store_ok else "degraded",
                # A node without Redis still serves its own sessions, so it
                # stays in the load balancer; the cluster view says degraded.
                "broker": "none" if not broker.enabled else "ok" if broker.healthy else "degraded",
                "node_id": broker.node_id,
                "buffered": getattr(self.hub.store, "buffered", 0),
                "dead_letters": getattr(self.hub.store, "dead_letters", 0),
                "shutting_down": self.hub.shutting_down,
            },
            200 if ready else 503,
        )


class MetricsHandler(APIHandler):
    """``GET /metrics``: Prometheus text format; an admin token is required
    unless routed with ``public=True`` (the separate ``server.metrics_port``)."""

    def get(self) -> None:
        if not self.route_options.get("public"):
            self.claims("admin")
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.hub.metrics.prometheus())


class NotFoundHandler(APIHandler):
    def prepare(self) -> None:
        super().prepare()
        raise ProtocolError("not_found", f"no route for {self.request.path}", status=404)


class StaticHandler(tornado.web.StaticFileHandler):
    """Static files (``/static/rtclient.js``); takes ``hub`` like every route."""

    def initialize(  # type: ignore[override]
        self, hub: Hub, path: str, default_filename: str | None = None
    ) -> None:
        self.hub = hub
        super().initialize(path, default_filename)

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")
        # A page of an allowed origin (the app's) may import rtclient.js from here.
        origin = self.request.headers.get("Origin")
        if origin and origin_allowed(origin, self.hub.config.server.allowed_origins):
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Vary", "Origin")
