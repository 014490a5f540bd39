"""Notifications: read state and history over the WebSocket, sending over HTTP.

Events: ``mark_read``, ``get_notifications`` and ``received`` (delivery receipts).
Routes: ``POST /api/notifications`` (batch), ``POST /api/notifications/{user_id}``, ``POST /api/sessions/{id}/messages``,
``GET /api/users/{user_id}/notifications``,
``GET /api/users/{user_id}/notifications/{id}`` and, where ``server.test_routes``
is on, the seed's ``POST /api/test/notification/{user_id}``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from rtserver.config import Config
from rtserver.plugins import EventContext, EventHandler, Route, hookimpl
from rtserver.protocol import BAD_REQUEST, FORBIDDEN, TOO_LARGE, ProtocolError
from rtserver.stores.base import MAX_PAGE, StoreError
from rtserver.web import APIHandler

NotificationId = str


class MarkRead(msgspec.Struct, forbid_unknown_fields=True):
    ids: list[NotificationId] | None = None
    all: bool = False


class Received(msgspec.Struct, forbid_unknown_fields=True):
    ids: list[NotificationId]


class GetNotifications(msgspec.Struct, forbid_unknown_fields=True):
    unread_only: bool = False
    limit: int = 50
    before: NotificationId | None = None


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ProtocolError(BAD_REQUEST, f"limit: must be between 1 and {MAX_PAGE}")


async def mark_read(ctx: EventContext, data: MarkRead) -> dict[str, Any]:
    if data.all == (data.ids is not None):
        raise ProtocolError(BAD_REQUEST, "data: give either ids (a list) or all: true")
    cap = ctx.hub.config.limits.max_ids_per_mark_read
    if data.ids is not None and len(data.ids) > cap:
        raise ProtocolError(TOO_LARGE, f"data.ids: at most {cap} ids per mark_read")
    updated, unread = await ctx.hub.mark_read(ctx.user_id, data.ids, origin=ctx.connection)
    return {"updated": updated, "unread_count": unread}


async def received(ctx: EventContext, data: Received) -> dict[str, Any]:
    """Delivery receipts: no reply unless the frame has an id."""
    cap = ctx.hub.config.limits.max_ids_per_mark_read
    if len(data.ids) > cap:
        raise ProtocolError(TOO_LARGE, f"data.ids: at most {cap} ids per received")
    return {"confirmed": await ctx.hub.confirm_received(ctx.connection, data.ids)}


async def get_notifications(ctx: EventContext, data: GetNotifications) -> dict[str, Any]:
    _check_limit(data.limit)
    found = await ctx.hub.get_notifications_for_user(
        ctx.user_id, data.unread_only, limit=data.limit, before=data.before
    )
    return {"notifications": [n.to_wire() for n in found]}


class SendHandler(APIHandler):
    """``POST /api/notifications/{user_id}`` (publisher or admin)."""

    async def post(self, user_id: str) -> None:
        self.claims("publisher")
        result = await self.hub.send_notification(user_id, self.body())
        self.send(
            {"notification": result.notification.to_wire(), "delivered": result.delivered}, 201
        )


class NotificationHandler(APIHandler):
    """``GET /api/users/{user_id}/notifications/{id}``: was it delivered, when,
    read when. The user themself, or a publisher or admin."""

    async def get(self, user_id: str, notification_id: str) -> None:
        claims = self.claims("user")
        if claims.sub != user_id and claims.role == "user":
            raise ProtocolError(FORBIDDEN, "you may read only your own notifications", status=403)
        n = await self.hub.get_notification(user_id, notification_id)
        wire = n.to_wire()
        self.send(
            {
                "notification": wire,
                "delivered": n.delivered_at is not None,
                "delivered_at": wire["delivered_at"],
                "read": n.read,
                "read_at": wire["read_at"],
            }
        )


class BatchItem(msgspec.Struct, forbid_unknown_fields=True):
    user_id: str
    notification: dict[str, Any]


class BatchHandler(APIHandler):
    """``POST /api/notifications``: ``[{"user_id", "notification"}, ...]``
    (publisher or admin) -> 201 ``{"results": [{"id", "delivered"}, ...]}``.

    Every item is validated before any is stored: one bad item refuses the
    batch (400 naming it). If the store refuses some, the answer is 503 and
    ``results`` says which were accepted (``{"id", "delivered"}``) and which
    were not (``{"error", "delivered"}``: a live session may have got one that
    could not be stored): nothing is dropped silently.
    """

    async def post(self) -> None:
        self.claims("publisher")
        items = self.body(list[BatchItem])
        cap = self.hub.config.limits.max_batch
        if not items or len(items) > cap:
            raise ProtocolError(BAD_REQUEST, f"body: a list of 1 to {cap} items")
        results = await self.hub.send_notifications([(i.user_id, i.notification) for i in items])
        out: list[dict[str, Any]] = []
        failed = 0
        for result in results:
            if isinstance(result, StoreError):
                failed += 1
                error = {"code": "unavailable", "message": "not stored; retry it"}
                if result.delivered:
                    error["message"] = "not stored, but delivered live"
                out.append({"error": error, "delivered": result.delivered})
            else:
                out.append({"id": result.notification.id, "delivered": result.delivered})
        self.send({"results": out}, 503 if failed else 201)


class TestSendHandler(APIHandler):
    """``POST /api/test/notification/{user_id}``: the seed's test route, no token.

    Only routed where ``server.test_routes`` is true (never in production).
    """

    async def post(self, user_id: str) -> None:
        self.rate_limit_by_address()
        result = await self.hub.send_notification(user_id, self.body())
        self.send(
            {"notification": result.notification.to_wire(), "delivered": result.delivered}, 201
        )


class SessionMessageHandler(APIHandler):
    """``POST /api/sessions/{session_id}/messages`` (publisher or admin)."""

    async def post(self, session_id: str) -> None:
        self.claims("publisher")
        delivered = await self.hub.send_direct_message(session_id, self.body())
        if not delivered:
            raise ProtocolError("not_found", "no such session", status=404)
        self.send({"delivered": delivered})


class HistoryHandler(APIHandler):
    """``GET /api/users/{user_id}/notifications?unread_only=true&limit=N&before=ID``.

    The user themself, or a publisher or admin.
    """

    async def get(self, user_id: str) -> None:
        claims = self.claims("user")
        if claims.sub != user_id and claims.role == "user":
            raise ProtocolError(FORBIDDEN, "you may read only your own notifications", status=403)
        unread_only = self.get_query_argument("unread_only", "false").lower() in (
            "1",
            "true",
            "yes",
        )
        try:
            limit = int(self.get_query_argument("limit", "50"))
        except ValueError:
            raise ProtocolError(BAD_REQUEST, "limit: must be an integer") from None
        _check_limit(limit)
        before = self.get_query_argument("before", None)
        found = await self.hub.get_notifications_for_user(
            user_id, unread_only, limit=limit, before=before
        )
        self.send({"notifications": [n.to_wire() for n in found]})


@hookimpl
def rtserver_events(config: Config) -> list[EventHandler]:
    return [
        EventHandler("mark_read", mark_read, MarkRead),
        EventHandler("get_notifications", get_notifications, GetNotifications),
        EventHandler("received", received, Received),
    ]


@hookimpl
def rtserver_routes(config: Config) -> list[Route]:
    routes = [
        Route(r"/api/notifications", BatchHandler),
        Route(r"/api/notifications/([^/]+)", SendHandler),
        Route(r"/api/sessions/([^/]+)/messages", SessionMessageHandler),
        Route(r"/api/users/([^/]+)/notifications", HistoryHandler),
        Route(r"/api/users/([^/]+)/notifications/([^/]+)", NotificationHandler),
    ]
    if config.server.test_routes:
        routes.append(Route(r"/api/test/notification/([^/]+)", TestSendHandler))
    return routes
