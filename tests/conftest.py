"""Fixtures: a real server on a loopback port, real WebSocket clients, a real
SQLite file under tmp_path."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from rtserver.app import Application, make_app
from rtserver.client import Client
from rtserver.config import Config, LoggingConfig, parse_config
from rtserver.hub import Hub
from rtserver.log import configure_logging
from rtserver.protocol import Notification
from rtserver.stores.base import StoreError

from .mongo_support import NxServer

SECRET = "test-secret-0123456789-0123456789-abcdef"

configure_logging(LoggingConfig(format="json", level="info"), cache=False)


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A test config: SQLite under tmp_path, test routes on, quiet periodic jobs."""
    raw: dict[str, Any] = {
        "server": {"test_routes": True, "ping_interval": 0, "shutdown_timeout": 2},
        "auth": {"secret": SECRET},
        "store": {"data_dir": str(tmp_path), "cleanup_interval": 0},
        "logging": {"metrics_interval": 0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_config(raw)


class Running:
    """A started server and helpers to talk to it."""

    def __init__(self, app: Application, server: HTTPServer, port: int) -> None:
        self.app = app
        self.hub: Hub = app.hub
        self.server = server
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/ws"
        self.clients: list[Client] = []

    def token(self, user_id: str, role: str = "user", ttl: float = 3600, **grants: Any) -> str:
        return self.hub.auth.mint(user_id, role, ttl, **grants)  # type: ignore[arg-type]

    async def connect(self, headers: dict[str, str] | None = None) -> Client:
        client = await Client.connect(self.ws_url, headers=headers)
        self.clients.append(client)
        return client

    async def user(
        self, user_id: str, last_id: str | None = None, *, receipts: bool = True
    ) -> Client:
        """A connected client registered as ``user_id``."""
        client = await self.connect()
        await client.register(self.token(user_id), last_id=last_id, receipts=receipts)
        return client

    async def replays_done(self, timeout: float = 5.0) -> None:
        """Wait until no session is still replaying its backlog (pushes are
        held meanwhile)."""
        deadline = time.monotonic() + timeout
        while any(c.replaying for c in self.hub.sessions):
            assert time.monotonic() < deadline, "a replay did not end"
            await asyncio.sleep(0.005)

    async def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if method in ("POST", "PUT") and data is None:
            data = b""
        resp: HTTPResponse = await AsyncHTTPClient().fetch(
            self.base + path,
            method=method,
            body=data,
            headers=hdrs,
            raise_error=False,
            allow_nonstandard_methods=True,
        )
        text = resp.body.decode() if resp.body else ""
        try:
            return resp.code, json.loads(text) if text else None
        except json.JSONDecodeError:
            return resp.code, text

    async def stop(self) -> None:
        for client in self.clients:
            await client.close()
        self.server.stop()
        await self.app.shutdown(timeout=2)
        await self.server.close_all_connections()


StartServer = Callable[..., Awaitable[Running]]


def hold_writes(server: Running, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Hold the store's batch writes (a slow disk or a distant database) until
    the returned event is set; pushes and reads go on meanwhile."""
    store = server.hub.store
    write = store.insert_many
    gate = asyncio.Event()

    async def held(notifications: Sequence[Notification]) -> list[StoreError | None]:
        await gate.wait()
        return await write(notifications)

    monkeypatch.setattr(store, "insert_many", held)
    return gate


@pytest.fixture
async def start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    """``await start_server(config=None, extra_plugins=(), **sections)`` -> Running."""
    started: list[Running] = []

    async def start(
        config: Config | None = None,
        extra_plugins: Sequence[tuple[str, object]] = (),
        **sections: dict[str, Any],
    ) -> Running:
        cfg = config or make_config(tmp_path, **sections)
        app = make_app(cfg, plugins=extra_plugins)
        await app.startup()
        sockets = bind_sockets(0, "127.0.0.1")
        port = sockets[0].getsockname()[1]
        server = app.make_server()
        server.add_sockets(sockets)
        running = Running(app, server, port)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop()


@pytest.fixture
async def server(start_server: StartServer) -> Running:
    return await start_server()


def replace_section(config: Config, section: str, **values: Any) -> Config:
    return config.replace(**{section: msgspec.structs.replace(getattr(config, section), **values)})


@pytest.fixture(scope="module")
def nx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NxServer]:
    """One nx-27017 (a MongoDB wire-protocol server) for a test module."""
    server = NxServer(tmp_path_factory.mktemp("nx"))
    server.start()
    yield server
    server.stop()
