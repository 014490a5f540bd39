"""Admin: broadcasts, the session list, disconnects, metrics.

Every route and event here needs the admin role (403 / ``forbidden``).

Routes: ``POST /api/broadcast``, ``GET /api/admin/sessions``,
``DELETE /api/admin/sessions/{id}``, ``GET /api/admin/metrics``,
``GET /api/admin/dead_letters``, ``DELETE /api/admin/dead_letters/{seq}``.
Events: ``admin.broadcast``, ``admin.sessions``, ``admin.disconnect``,
``admin.metrics``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from rtserver.broker import MAX_SESSIONS_PAGE
from rtserver.config import Config
from rtserver.hub import Hub
from rtserver.plugins import EventContext, EventHandler, Route, hookimpl
from rtserver.protocol import BAD_REQUEST, NOT_FOUND, ProtocolError
from rtserver.web import APIHandler


class Broadcast(msgspec.Struct, forbid_unknown_fields=True):
    notification: dict[str, Any]


class Disconnect(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str


class ListSessions(msgspec.Struct, forbid_unknown_fields=True):
    user_id: str | None = None
    cursor: str | None = None
    limit: int = 1000


async def session_list(
    hub: Hub, user_id: str | None, cursor: str | None, limit: int
) -> dict[str, Any]:
    """A page of the sessions on every node of the cluster (just this one
    without a broker), or all of one user's."""
    if not 1 <= limit <= MAX_SESSIONS_PAGE:
        raise ProtocolError(BAD_REQUEST, f"limit: from 1 to {MAX_SESSIONS_PAGE}")
    return await hub.cluster_sessions(user_id, cursor=cursor, limit=limit)


async def disconnect(hub: Hub, session_id: str) -> None:
    if not await hub.disconnect(session_id):
        raise ProtocolError(NOT_FOUND, "no such session", status=404)


async def broadcast_event(ctx: EventContext, data: Broadcast) -> dict[str, Any]:
    return {"delivered": await ctx.hub.send_broadcast_notification(data.notification)}


async def sessions_event(ctx: EventContext, data: ListSessions) -> dict[str, Any]:
    return await session_list(ctx.hub, data.user_id, data.cursor, data.limit)


async def disconnect_event(ctx: EventContext, data: Disconnect) -> dict[str, Any]:
    await disconnect(ctx.hub, data.session_id)
    return {"disconnected": data.session_id}


async def metrics_event(ctx: EventContext, data: dict[str, Any]) -> dict[str, Any]:
    return {"metrics": ctx.hub.get_connection_metrics(), **(await ctx.hub.cluster_metrics())}


class BroadcastHandler(APIHandler):
    """``POST /api/broadcast``: a notification to every registered session,
    once per ``Idempotency-Key``."""

    async def post(self) -> None:
        claims = self.claims("admin")
        payload = self.body()

        async def send(notification_id: str | None) -> tuple[dict[str, Any], int]:
            delivered = await self.hub.send_broadcast_notification(
                payload, notification_id=notification_id
            )
            return {"delivered": delivered}, 200

        await self.send_once(claims.sub, send)


class DeadLettersHandler(APIHandler):
    """``GET /api/admin/dead_letters``: spooled notifications MongoDB refused
    after an outage (oldest first, at most 100), for an operator to read."""

    async def get(self) -> None:
        self.claims("admin")
        spool = getattr(self.hub.store, "spool", None)
        letters = [] if spool is None else await spool.dead_letters()
        self.send(
            {
                "dead_letters": [msgspec.structs.asdict(d) for d in letters],
                "count": 0 if spool is None else spool.dead,
            }
        )


class DeadLetterHandler(APIHandler):
    """``DELETE /api/admin/dead_letters/{seq}``: dealt with; remove it."""

    async def delete(self, seq: str) -> None:
        self.claims("admin")
        spool = getattr(self.hub.store, "spool", None)
        if spool is None or not seq.isdigit() or not await spool.forget_dead_letter(int(seq)):
            raise ProtocolError(NOT_FOUND, "no such dead letter", status=404)
        self.send({"removed": int(seq)})


class SessionsHandler(APIHandler):
    """``GET /api/admin/sessions[?user_id=U][?cursor=C&limit=N]``."""

    async def get(self) -> None:
        self.claims("admin")
        user_id = self.get_query_argument("user_id", None)
        cursor = self.get_query_argument("cursor", None)
        limit = self.get_query_argument("limit", "1000")
        if not limit.isdigit():
            raise ProtocolError(BAD_REQUEST, "limit: a number")
        self.send(await session_list(self.hub, user_id, cursor, int(limit)))


class SessionHandler(APIHandler):
    """``DELETE /api/admin/sessions/{session_id}``: close it (1008), on
    whichever node holds it."""

    async def delete(self, session_id: str) -> None:
        self.claims("admin")
        await disconnect(self.hub, session_id)
        self.send({"disconnected": session_id})


class MetricsJSONHandler(APIHandler):
    """``GET /api/admin/metrics``: ``get_connection_metrics()`` as JSON."""

    async def get(self) -> None:
        self.claims("admin")
        self.send(
            {"metrics": self.hub.get_connection_metrics(), **(await self.hub.cluster_metrics())}
        )


@hookimpl
def rtserver_events(config: Config) -> list[EventHandler]:
    return [
        EventHandler("admin.broadcast", broadcast_event, Broadcast, role="admin"),
        EventHandler("admin.sessions", sessions_event, ListSessions, role="admin"),
        EventHandler("admin.disconnect", disconnect_event, Disconnect, role="admin"),
        EventHandler("admin.metrics", metrics_event, role="admin"),
    ]


@hookimpl
def rtserver_routes(config: Config) -> list[Route]:
    return [
        Route(r"/api/broadcast", BroadcastHandler),
        Route(r"/api/admin/sessions", SessionsHandler),
        Route(r"/api/admin/sessions/([^/]+)", SessionHandler),
        Route(r"/api/admin/metrics", MetricsJSONHandler),
        Route(r"/api/admin/dead_letters", DeadLettersHandler),
        Route(r"/api/admin/dead_letters/([^/]+)", DeadLetterHandler),
    ]
