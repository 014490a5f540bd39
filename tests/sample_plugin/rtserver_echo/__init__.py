"""A sample plugin: an ``echo`` event and a ``GET /api/echo/count`` route."""

from __future__ import annotations

from typing import Any

import msgspec

from rtserver.config import Config
from rtserver.plugins import EventContext, EventHandler, Route, hookimpl
from rtserver.web import APIHandler


class Echo(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    times: int = 1


def settings(config: Config) -> dict[str, Any]:
    return config.plugins.settings.get("echo", {})


async def echo(ctx: EventContext, data: Echo) -> dict[str, Any]:
    prefix = settings(ctx.hub.config).get("prefix", "")
    ctx.connection.state["echo.count"] = ctx.connection.state.get("echo.count", 0) + 1
    return {"text": prefix + data.text * data.times, "user_id": ctx.user_id}


class CountHandler(APIHandler):
    def get(self) -> None:
        self.send({"echoes": sum(c.state.get("echo.count", 0) for c in self.hub.sessions)})


@hookimpl
def rtserver_events(config: Config) -> list[EventHandler]:
    return [EventHandler("echo", echo, Echo)]


@hookimpl
def rtserver_routes(config: Config) -> list[Route]:
    return [Route(r"/api/echo/count", CountHandler)]
