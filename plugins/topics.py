"""Topics over the WebSocket and HTTP (see ``rtserver.topics``).

Events (registered sessions): ``subscribe {topic, last_id?, presence?}``,
``unsubscribe {topic}``, ``publish {topic, data}``, ``presence {topic}``.
Routes (publisher or admin): ``POST /api/topics/{topic}/publications`` (the
body is the data; once per ``Idempotency-Key``),
``GET /api/topics/{topic}/publications?after=ID&limit=N`` and
``GET /api/topics/{topic}/presence``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import msgspec

from rtserver.config import Config
from rtserver.plugins import EventContext, EventHandler, Route, hookimpl
from rtserver.protocol import BAD_REQUEST, ProtocolError
from rtserver.stores.base import MAX_PAGE
from rtserver.web import APIHandler


class Subscribe(msgspec.Struct, forbid_unknown_fields=True):
    topic: str
    last_id: str | None = None
    presence: bool = False


class Topic(msgspec.Struct, forbid_unknown_fields=True):
    topic: str


class Publish(msgspec.Struct, forbid_unknown_fields=True):
    topic: str
    data: Any


async def subscribe(ctx: EventContext, data: Subscribe) -> dict[str, Any]:
    return await ctx.hub.topics.subscribe(
        ctx.connection, data.topic, last_id=data.last_id, presence=data.presence
    )


def unsubscribe(ctx: EventContext, data: Topic) -> dict[str, Any]:
    if not ctx.hub.topics.unsubscribe(ctx.connection, data.topic):
        raise ProtocolError(BAD_REQUEST, f"not subscribed to {data.topic}")
    return {"topic": data.topic}


async def publish(ctx: EventContext, data: Publish) -> dict[str, Any]:
    topics = ctx.hub.topics
    topics.authorize(ctx.connection, data.topic, "publish")
    result = await topics.publish(data.topic, data.data, publisher=ctx.user_id)
    return {"id": result.id}


async def presence(ctx: EventContext, data: Topic) -> dict[str, Any]:
    topics = ctx.hub.topics
    if data.topic not in ctx.connection.topics:
        topics.authorize(ctx.connection, data.topic, "subscribe")
    return await topics.presence(data.topic)


class PublicationsHandler(APIHandler):
    """``POST /api/topics/{topic}/publications`` and ``GET ...?after=ID&limit=N``."""

    async def post(self, topic: str) -> None:
        claims = self.claims("publisher")
        data = self.body()
        topic = unquote(topic)

        async def send(publication_id: str | None) -> tuple[dict[str, Any], int]:
            result = await self.hub.publish(topic, data, publication_id=publication_id)
            return {"id": result.id, "delivered": result.delivered}, 201

        await self.send_once(claims.sub, send)

    async def get(self, topic: str) -> None:
        self.claims("publisher")
        try:
            limit = int(self.get_query_argument("limit", "100"))
        except ValueError:
            raise ProtocolError(BAD_REQUEST, "limit: must be an integer") from None
        if not 1 <= limit <= MAX_PAGE:
            raise ProtocolError(BAD_REQUEST, f"limit: must be between 1 and {MAX_PAGE}")
        after = self.get_query_argument("after", None)
        found = await self.hub.topic_history(unquote(topic), after=after, limit=limit)
        self.send({"publications": found})


class PresenceHandler(APIHandler):
    """``GET /api/topics/{topic}/presence``."""

    async def get(self, topic: str) -> None:
        self.claims("publisher")
        self.send(await self.hub.topic_presence(unquote(topic)))


@hookimpl
def rtserver_events(config: Config) -> list[EventHandler]:
    return [
        EventHandler("subscribe", subscribe, Subscribe),
        EventHandler("unsubscribe", unsubscribe, Topic),
        EventHandler("publish", publish, Publish),
        EventHandler("presence", presence, Topic),
    ]


@hookimpl
def rtserver_routes(config: Config) -> list[Route]:
    return [
        Route(r"/api/topics/([^/]+)/publications", PublicationsHandler),
        Route(r"/api/topics/([^/]+)/presence", PresenceHandler),
    ]
