"""rtserver's entry point.

    python run.py [--config FILE] [--host HOST] [--port PORT]
    python run.py token USER_ID [--role user|publisher|admin] [--ttl SECONDS]
                    [--topics 'case:881,thread:*'] [--publish-topics 'thread:*'] [--config FILE]

Parses arguments, loads the config, configures logging, builds the app and
serves until SIGTERM or SIGINT, then shuts down gracefully and exits 0. A bad
config, or anything else that stops it starting (a port in use, a data
directory it cannot write, a missing package, a certificate it cannot load),
prints one line naming what failed and what to do, and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import signal
import socket
import sys
from pathlib import Path

from tornado.netutil import bind_sockets

from rtserver.app import make_app, make_metrics_app
from rtserver.config import Config, ConfigError, StartupError, load_config
from rtserver.log import configure_logging, get_logger
from rtserver.plugins import PluginError
from rtserver.stores import StoreError
from rtserver.websocket import Server

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config" / "default.yaml"


def _config(path: str | None) -> Config:
    chosen = Path(path) if path else DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None
    return load_config(chosen)


async def serve(config: Config) -> None:
    log = get_logger("rtserver")
    srv = config.server
    app = make_app(config)
    server = app.make_server()
    # Bound before the store opens, so a port in use fails at once; nothing
    # is accepted until the app has started. (On a StartupError the process
    # exits, which closes them.)
    sockets = listen(srv.host, srv.port, "server.port")
    metrics_sockets = []
    if srv.metrics_port is not None:
        metrics_sockets = listen(srv.metrics_host, srv.metrics_port, "server.metrics_port")
    try:
        await app.startup()
    except StoreError as err:
        raise StartupError(f"store: {err}; check store.* in the config") from None
    server.add_sockets(sockets)
    metrics_server = None
    if metrics_sockets:
        metrics_server = Server(make_metrics_app(app.hub), metrics=app.hub.metrics)
        metrics_server.add_sockets(metrics_sockets)
        log.info("metrics.listening", url=f"http://{srv.metrics_host}:{srv.metrics_port}/metrics")
    scheme = "https" if srv.tls_cert else "http"
    log.info(
        "server.listening", url=f"{scheme}://{srv.host}:{srv.port}", environment=srv.environment
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("server.stopping")
    server.stop()  # stop accepting; open WebSockets are closed by shutdown()
    await app.shutdown()
    await server.close_all_connections()
    if metrics_server is not None:
        metrics_server.stop()
        await metrics_server.close_all_connections()


def listen(host: str, port: int, key: str) -> list[socket.socket]:
    """Listening sockets for ``host:port``, or ``StartupError`` saying why not."""
    try:
        return bind_sockets(port, host)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            advice = "stop what listens there, or choose another port (--port or the config)"
        elif err.errno == errno.EACCES:
            advice = "ports below 1024 need privileges; choose a port from 1024 up"
        else:
            advice = f"check {key.replace('port', 'host')} and {key}"
        raise StartupError(
            f"{key}: cannot listen on {host}:{port}: {err.strerror or err}; {advice}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "token":
        p = argparse.ArgumentParser(prog="run.py token", description="Print a signed token.")
        p.add_argument("user_id")
        p.add_argument("--role", choices=["user", "publisher", "admin"], default="user")
        p.add_argument("--ttl", type=int, default=None, help="seconds (default auth.token_ttl)")
        p.add_argument(
            "--topics", default="", help="topics it may subscribe to: 'case:881,thread:*'"
        )
        p.add_argument("--publish-topics", default="", help="topics it may publish to")
        p.add_argument("--config", default=None)
        args = p.parse_args(argv[1:])
    else:
        p = argparse.ArgumentParser(
            prog="run.py",
            description="Run the rtserver server.",
            epilog="python run.py token USER_ID [--role ROLE] [--ttl SECONDS] prints a"
            " signed token (python run.py token --help).",
        )
        p.add_argument("--config", default=None, help=f"YAML file (default {DEFAULT_CONFIG.name})")
        p.add_argument("--host", default=None)
        p.add_argument("--port", type=int, default=None)
        args = p.parse_args(argv)
    try:
        config = _config(args.config)
        if argv and argv[0] == "token":
            from rtserver.auth import Authenticator

            topics = [t for t in args.topics.split(",") if t]
            publish = [t for t in args.publish_topics.split(",") if t]
            print(
                Authenticator(config.auth).mint(
                    args.user_id, args.role, args.ttl, topics=topics, publish_topics=publish
                )
            )
            return 0
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        if overrides:
            import msgspec

            config = config.replace(server=msgspec.structs.replace(config.server, **overrides))
        configure_logging(config.logging)
        asyncio.run(serve(config))
    except (ConfigError, PluginError, StartupError) as err:
        print(f"rtserver: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"rtserver: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
