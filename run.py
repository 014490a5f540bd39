"""rtserver's entry point.

    python run.py [--config FILE] [--host HOST] [--port PORT]
    python run.py token USER_ID [--role user|publisher|admin] [--ttl SECONDS] [--config FILE]

Parses arguments, loads the config, configures logging, builds the app and
serves until SIGTERM or SIGINT, then shuts down gracefully and exits 0. A bad
config prints one message naming the key and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from tornado.httpserver import HTTPServer

from rtserver.app import make_app, make_metrics_app
from rtserver.config import Config, ConfigError, load_config
from rtserver.log import configure_logging, get_logger
from rtserver.plugins import PluginError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config" / "default.yaml"


def _config(path: str | None) -> Config:
    chosen = Path(path) if path else DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None
    return load_config(chosen)


async def serve(config: Config) -> None:
    log = get_logger("rtserver")
    app = make_app(config)
    await app.startup()
    srv = config.server
    server = app.make_server()
    server.listen(srv.port, srv.host)
    metrics_server = None
    if srv.metrics_port is not None:
        metrics_server = HTTPServer(make_metrics_app(app.hub))
        metrics_server.listen(srv.metrics_port, srv.metrics_host)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "token":
        p = argparse.ArgumentParser(prog="run.py token", description="Print a signed token.")
        p.add_argument("user_id")
        p.add_argument("--role", choices=["user", "publisher", "admin"], default="user")
        p.add_argument("--ttl", type=int, default=None, help="seconds (default auth.token_ttl)")
        p.add_argument("--config", default=None)
        args = p.parse_args(argv[1:])
    else:
        p = argparse.ArgumentParser(prog="run.py", description="Run the rtserver server.")
        p.add_argument("--config", default=None, help=f"YAML file (default {DEFAULT_CONFIG.name})")
        p.add_argument("--host", default=None)
        p.add_argument("--port", type=int, default=None)
        args = p.parse_args(argv)
    try:
        config = _config(args.config)
        if argv and argv[0] == "token":
            from rtserver.auth import Authenticator

            print(Authenticator(config.auth).mint(args.user_id, args.role, args.ttl))
            return 0
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        if overrides:
            import msgspec

            config = config.replace(server=msgspec.structs.replace(config.server, **overrides))
        configure_logging(config.logging)
        asyncio.run(serve(config))
    except (ConfigError, PluginError) as err:
        print(f"rtserver: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"rtserver: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
