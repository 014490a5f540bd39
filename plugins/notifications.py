"""Notifications: read state and history over the WebSocket, sending over HTTP.

Events: ``mark_read``, ``get_notifications`` and ``received`` (delivery receipts).
Routes: ``POST /api/notifications`` (batch), ``POST /api/notifications/{user_id}``, ``POST /api/sessions/{id}/messages``,
``GET /api/users/{user_id}/notifications``,
``GET /api/users/{user_id}/notifications/{id}`` and, where ``server.test_routes``
is on, the test route ``POST /api/test/notification/{user_id}``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from rtserver.auth import Claims
from rtserver.config import Config
from rtserver.idempotency import Answer, Keys, check_key, fingerprint
from rtserver.plugins import EventContext, EventHandler, Route, hookimpl
from rtserver.protocol import BAD_REQUEST, FORBIDDEN, TOO_LARGE, ProtocolError, encode_json
from rtserver.sending import SendResult
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
    """``POST /api/notifications/{user_id}`` (publisher or admin), once per
    ``Idempotency-Key``."""

    async def post(self, user_id: str) -> None:
        claims = self.claims("publisher")
        payload = self.body()

        async def send(notification_id: str | None) -> tuple[dict[str, Any], int]:
            result = await self.hub.send_notification(
                user_id, payload, notification_id=notification_id
            )
            wire = result.notification.to_wire()
            return {"notification": wire, "delivered": result.delivered}, 201

        await self.send_once(claims.sub, send)


class InboxHandler(APIHandler):
    """A route about one user's inbox: the user themself, or a publisher or
    admin acting for the user."""

    def for_user(self, user_id: str) -> Claims:
        claims = self.claims("user")
        if claims.sub != user_id and claims.role == "user":
            raise ProtocolError(FORBIDDEN, "only your own notifications", status=403)
        return claims


class NotificationHandler(InboxHandler):
    """``GET /api/users/{user_id}/notifications/{id}``: was it delivered, when,
    read when; ``DELETE``: remove it (204; the user's sessions get ``deleted``)."""

    async def get(self, user_id: str, notification_id: str) -> None:
        self.for_user(user_id)
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

    async def delete(self, user_id: str, notification_id: str) -> None:
        self.for_user(user_id)
        deleted, _ = await self.hub.delete_notifications(user_id, [notification_id])
        if not deleted:
            raise ProtocolError("not_found", "no such notification", status=404)
        self.set_status(204)
        self.finish()


class UnreadCountHandler(InboxHandler):
    """``GET /api/users/{user_id}/unread_count``."""

    async def get(self, user_id: str) -> None:
        self.for_user(user_id)
        self.send({"unread_count": await self.hub.unread_count(user_id)})


class ReadHandler(InboxHandler):
    """``POST /api/users/{user_id}/notifications/read`` ``{"ids": [...]}`` or
    ``{"all": true}``: as ``mark_read`` (the user's sessions get ``read``)."""

    async def post(self, user_id: str) -> None:
        self.for_user(user_id)
        data = self.body(MarkRead)
        if data.all == (data.ids is not None):
            raise ProtocolError(BAD_REQUEST, "body: give either ids (a list) or all: true")
        cap = self.hub.config.limits.max_ids_per_mark_read
        if data.ids is not None and len(data.ids) > cap:
            raise ProtocolError(TOO_LARGE, f"ids: at most {cap} per request", status=413)
        updated, unread = await self.hub.mark_read(user_id, data.ids)
        self.send({"updated": updated, "unread_count": unread})


class ExportHandler(InboxHandler):
    """``GET /api/users/{user_id}/export``: every stored notification of the
    user, newest first, as one JSON document written a page at a time (an
    access request, however many there are)."""

    async def get(self, user_id: str) -> None:
        self.for_user(user_id)
        self.set_header("Content-Type", "application/json")
        self.set_header(
            "Content-Disposition", f'attachment; filename="notifications-{_filename(user_id)}.json"'
        )
        page = await self.hub.get_notifications_for_user(user_id, limit=MAX_PAGE)
        self.write(b'{"user_id":' + encode_json(user_id) + b',"notifications":[')
        first = True
        while page:
            chunk = b",".join(n.wire_json() for n in page)
            self.write(chunk if first else b"," + chunk)
            first = False
            await self.flush()
            if len(page) < MAX_PAGE:
                break
            page = await self.hub.get_notifications_for_user(
                user_id, limit=MAX_PAGE, before=page[-1].id
            )
        self.finish(b"]}")


def _filename(user_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in user_id)[:100]


class BatchItem(msgspec.Struct, forbid_unknown_fields=True):
    user_id: str
    notification: dict[str, Any]
    #: This item's own key; else, with an ``Idempotency-Key`` header, the
    #: header's key and the item's index.
    idempotency_key: str | None = None


def _item_result(result: SendResult | StoreError) -> dict[str, Any]:
    if isinstance(result, StoreError):
        error = {"code": "unavailable", "message": "not stored; retry it"}
        if result.delivered:
            error["message"] = "not stored, but delivered live"
        return {"error": error, "delivered": result.delivered}
    return {"id": result.notification.id, "delivered": result.delivered}


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
        claims = self.claims("publisher")
        items = self.body(list[BatchItem])
        cap = self.hub.config.limits.max_batch
        if not items or len(items) > cap:
            raise ProtocolError(BAD_REQUEST, f"body: a list of 1 to {cap} items")
        header = self.idempotency_key(claims.sub)
        keys: list[str | None] = []
        for index, item in enumerate(items):
            if item.idempotency_key is not None:
                keys.append(Keys.scoped(claims.sub, check_key(item.idempotency_key)))
            else:
                keys.append(None if header is None else f"{header}#{index}")
        named = [k for k in keys if k is not None]
        if len(set(named)) < len(named):
            raise ProtocolError(BAD_REQUEST, "body: two items have the same idempotency_key")
        if not any(keys):
            results = await self.hub.send_notifications(
                [(i.user_id, i.notification) for i in items]
            )
            out = [_item_result(r) for r in results]
            failed = any(isinstance(r, StoreError) for r in results)
            self.send({"results": out}, 503 if failed else 201)
            return
        await self._post_once(items, keys)

    async def _post_once(self, items: list[BatchItem], keys: list[str | None]) -> None:
        """Items with a key are sent once per key: a repeat gets that item's
        first result (without sending it again), the rest are sent."""
        keyed = [i for i, k in enumerate(keys) if k is not None]
        fps = [fingerprint(items[i].user_id, items[i].notification) for i in keyed]
        ids = self.hub.new_id.take(len(items))
        claimed = await self.hub.keys.claim(
            [keys[i] or "" for i in keyed], fps, [[ids[i]] for i in keyed]
        )
        out: list[dict[str, Any] | None] = [None] * len(items)
        running: list[tuple[int, str]] = []  # (index, key) of keys claimed to run
        refusal = None
        for i, fp, claim in zip(keyed, fps, claimed, strict=True):
            if claim.state == "held":
                refusal = refusal or Keys.refusal(claim, fp)
                if refusal is None:
                    out[i] = msgspec.json.decode(self.hub.keys.replay(claim).body)
            else:
                ids[i] = claim.record.ids[0]
                running.append((i, claim.record.key))
        if refusal is not None:
            await self.hub.keys.settle([(key, None) for _, key in running])
            raise refusal
        todo = [i for i in range(len(items)) if out[i] is None]
        answers: dict[str, Answer | None] = {key: None for _, key in running}
        try:
            results = await self.hub.send_notifications(
                [(items[i].user_id, items[i].notification) for i in todo],
                ids=[ids[i] for i in todo],
            )
            for i, result in zip(todo, results, strict=True):
                out[i] = _item_result(result)
            for i, key in running:
                if "id" in (out[i] or {}):
                    answers[key] = Answer(201, encode_json(out[i]))
        finally:
            await self.hub.keys.settle(list(answers.items()))
        failed = any("error" in (r or {}) for r in out)
        self.send({"results": out}, 503 if failed else 201)


class TestSendHandler(APIHandler):
    """``POST /api/test/notification/{user_id}``: the test route of the module rtserver replaces, no token.

    Only routed where ``server.test_routes`` is true (never in production).
    """

    async def post(self, user_id: str) -> None:
        self.rate_limit_by_address()
        result = await self.hub.send_notification(user_id, self.body())
        self.send(
            {"notification": result.notification.to_wire(), "delivered": result.delivered}, 201
        )


class SessionMessageHandler(APIHandler):
    """``POST /api/sessions/{session_id}/messages`` (publisher or admin), once
    per ``Idempotency-Key``."""

    async def post(self, session_id: str) -> None:
        claims = self.claims("publisher")
        payload = self.body()

        async def send(_: str | None) -> tuple[dict[str, Any], int]:
            delivered = await self.hub.send_direct_message(session_id, payload)
            if not delivered:
                raise ProtocolError("not_found", "no such session", status=404)
            return {"delivered": delivered}, 200

        await self.send_once(claims.sub, send)


class HistoryHandler(InboxHandler):
    """``GET /api/users/{user_id}/notifications?unread_only=true&limit=N&before=ID``
    (the user themself, or a publisher or admin); ``DELETE``: erase every
    stored notification of the user (the user themself or an admin, never a
    publisher), logged as ``privacy.erased``."""

    async def delete(self, user_id: str) -> None:
        claims = self.claims("user")
        if claims.sub != user_id and claims.role != "admin":
            raise ProtocolError(
                FORBIDDEN, "only the user or an admin may erase a user's notifications", status=403
            )
        self.send({"deleted": await self.hub.erase_user(user_id, by=claims.sub)})

    async def get(self, user_id: str) -> None:
        self.for_user(user_id)
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
        Route(r"/api/users/([^/]+)/notifications/read", ReadHandler),
        Route(r"/api/users/([^/]+)/unread_count", UnreadCountHandler),
        Route(r"/api/users/([^/]+)/export", ExportHandler),
        Route(r"/api/users/([^/]+)/notifications/([^/]+)", NotificationHandler),
    ]
    if config.server.test_routes:
        routes.append(Route(r"/api/test/notification/([^/]+)", TestSendHandler))
    return routes
