"""``make_app(config)``: wires everything once.

app = make_app(config)
await app.startup()          # open the store, run plugin startup hooks
server = app.make_server()  # then server.listen(8888) or .add_sockets(...)
...
await app.shutdown()         # close sessions (1001), flush, close the store
"""

from __future__ import annotations

import asyncio
import gc
import random
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tornado.web
from tornado.httpserver import HTTPServer

from rtserver.config import Config, StartupError
from rtserver.hub import Hub
from rtserver.log import get_logger
from rtserver.plugins import Plugins
from rtserver.stores import Store, make_store
from rtserver.web import (
    ConnectionHandler,
    Dispatcher,
    Endpoint,
    HealthHandler,
    MetricsHandler,
    NotFoundHandler,
    ReadyHandler,
    StaticHandler,
    log_access,
)
from rtserver.websocket import Server

CLIENT_JS = (Path(__file__).resolve().parent / "static" / "rtclient.js").resolve()

log = get_logger("rtserver")


class Application(tornado.web.Application):
    """A Tornado application that also owns the hub and the plugins."""

    hub: Hub
    plugins: Plugins
    endpoint: Endpoint

    def make_server(self) -> HTTPServer:
        """The HTTP server for this app as the config describes it (TLS,
        X-Forwarded-For, body limit), serving ``/ws`` through rtserver's own
        WebSocket code unless ``server.websocket`` is ``tornado``."""
        srv = self.hub.config.server
        return Server(
            self,
            ssl_options=ssl_context(srv.tls_cert, srv.tls_key),
            xheaders=srv.xheaders,
            max_body_size=srv.max_body_bytes,
            idle_connection_timeout=60,
            endpoint=self.endpoint if srv.websocket == "rtserver" else None,
            handshake_timeout=srv.handshake_timeout,
            metrics=self.hub.metrics,
        )

    async def startup(self) -> None:
        await self.hub.start()
        await self.plugins.call_async("rtserver_startup", hub=self.hub)
        # Everything built so far lives as long as the process: keep it out of
        # the garbage collector's full passes (gc.freeze), which otherwise
        # rescan it every time and stall every connection while they run.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*self.hub.config.server.gc_thresholds)
        log.info("server.started", plugins=self.plugins.names(), events=sorted(self.plugins.events))

    async def shutdown(self, timeout: float | None = None) -> None:
        """Tell every client to reconnect elsewhere (close 1001 with a jittered
        ``reconnect`` hint), let plugins finish, flush and close the store."""
        hub = self.hub
        hub.shutting_down = True
        timeout = hub.config.server.shutdown_timeout if timeout is None else timeout
        conns = list(hub.sessions)
        window_ms = int(hub.config.server.reconnect_window * 1000)
        for conn in conns:
            # The reason (at most 123 bytes) carries the hint; the delays are
            # spread evenly over the window so clients do not return at once.
            delay_ms = random.randint(0, window_ms)
            conn.close(1001, f"server shutting down; reconnect_after_ms={delay_ms}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout / 2
        while len(hub.sessions) and loop.time() < deadline:  # noqa: ASYNC110 (brief poll)
            await asyncio.sleep(0.02)
        try:
            await asyncio.wait_for(
                self.plugins.call_async("rtserver_shutdown", hub=hub), timeout / 2
            )
        except TimeoutError:
            log.warning("shutdown.plugins_timeout")
        await hub.stop()
        log.info("server.stopped", closed_sessions=len(conns))


def make_app(
    config: Config,
    *,
    plugins: Sequence[tuple[str, object]] = (),
    store: Store | None = None,
) -> Application:
    """Build the application: hub, store, plugins (enabled entry points plus
    ``plugins`` given here as ``(name, module_or_object)``), routes."""
    hub = Hub(config, store or make_store(config.store))
    loaded = Plugins(config, extra=plugins)
    endpoint = Endpoint(hub, loaded, Dispatcher(hub, loaded))
    base: dict[str, Any] = {"hub": hub}
    handlers: list[Any] = [
        (r"/ws", ConnectionHandler, {"endpoint": endpoint}),
        (r"/healthz", HealthHandler, base),
        (r"/readyz", ReadyHandler, base),
        (r"/metrics", MetricsHandler, base),
        # The browser client; in a checkout rtserver/static/rtclient.js links to
        # clients/js/rtclient.js (its npm home), so serve from where it really is.
        (r"/static/(rtclient\.js)", StaticHandler, {**base, "path": str(CLIENT_JS.parent)}),
    ]
    for _, route in loaded.routes:
        handlers.append(
            tornado.web.url(route.pattern, route.handler, {**base, **route.kwargs}, name=route.name)
        )
    server = config.server
    app = Application(
        handlers,
        default_handler_class=NotFoundHandler,
        default_handler_args=base,
        websocket_max_message_size=server.max_frame_bytes,
        xheaders=server.xheaders,
        log_function=_log_request,
    )
    app.hub = hub
    app.plugins = loaded
    app.endpoint = endpoint

    def delivered(user_id: str, ids: list[str], connection: Any) -> None:
        loaded.notify(
            "rtserver_delivered", hub=hub, user_id=user_id, ids=ids, connection=connection
        )

    hub.sending.notification_filters = loaded.notification_filters(hub)
    hub.topics.authorizers = loaded.topic_authorizers(hub)
    if loaded.implemented("rtserver_delivered"):
        hub.delivered.delivered_listeners.append(delivered)
    return app


def make_metrics_app(hub: Hub) -> tornado.web.Application:
    """``GET /metrics`` without a token, for ``server.metrics_port``."""
    return tornado.web.Application(
        [(r"/metrics", MetricsHandler, {"hub": hub, "public": True})],
        default_handler_class=NotFoundHandler,
        default_handler_args={"hub": hub},
        log_function=_log_request,
    )


def ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise StartupError(
            f"server.tls_cert: cannot load {cert} (key {key or cert}): {err.strerror or err};"
            " give PEM files rtserver's user can read"
        ) from None
    return ctx


def _log_request(handler: tornado.web.RequestHandler) -> None:
    request = handler.request
    log_access(
        request.method or "",
        request.path,
        handler.get_status(),
        request.request_time(),
        request.remote_ip,
    )
