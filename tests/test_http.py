"""The HTTP API for other services, over a real socket."""

from __future__ import annotations

import asyncio

import pytest

from .conftest import Running, StartServer


class TestSend:
    async def test_publisher_sends_and_live_sessions_count(self, server: Running) -> None:
        """POST /api/notifications/{user} answers 201 with the notification and N reached."""
        tab1, tab2 = await server.user("ann"), await server.user("ann")
        status, body = await server.http(
            "POST",
            "/api/notifications/ann",
            {"message": "Case updated", "case_id": 7},
            token=server.token("svc", "publisher"),
        )
        assert status == 201
        assert body["delivered"] == 2
        assert body["notification"]["case_id"] == 7
        for tab in (tab1, tab2):
            assert (await tab.next("notification"))["id"] == body["notification"]["id"]

    async def test_live_push_is_stored_delivered_in_one_write(self, server: Running) -> None:
        """To a live session the notification is pushed first and its row is
        written already delivered: no separate mark-delivered write follows."""
        tab = await server.user("ann", receipts=False)
        status, body = await server.http(
            "POST",
            "/api/notifications/ann",
            {"message": "Case updated"},
            token=server.token("svc", "publisher"),
        )
        assert status == 201 and body["delivered"] == 1
        assert (await tab.next("notification"))["id"] == body["notification"]["id"]
        stored = await server.hub.store.get("ann", body["notification"]["id"])
        assert stored is not None and stored.delivered_at is not None
        await asyncio.sleep(0.05)
        registry = server.hub.metrics.registry
        assert registry.get_sample_value("rtserver_store_seconds_count", {"op": "insert"}) == 1
        assert (
            registry.get_sample_value("rtserver_store_seconds_count", {"op": "mark_delivered"})
            is None
        )

    async def test_offline_user_gets_it_stored(self, server: Running) -> None:
        """With no live session the notification is stored (delivered 0) for later."""
        status, body = await server.http(
            "POST",
            "/api/notifications/zed",
            {"message": "later"},
            token=server.token("svc", "admin"),
        )
        assert (status, body["delivered"]) == (201, 0)
        stored = await server.hub.get_notifications_for_user("zed")
        assert [n.message for n in stored] == ["later"]

    @pytest.mark.parametrize(
        ("token_role", "status", "code"),
        [(None, 401, "unauthorized"), ("user", 403, "forbidden")],
    )
    async def test_send_needs_publisher(
        self, server: Running, token_role: str | None, status: int, code: str
    ) -> None:
        """No token is 401; a user token is 403; nothing is stored."""
        token = server.token("mallory", token_role) if token_role else None
        got, body = await server.http(
            "POST", "/api/notifications/ann", {"message": "x"}, token=token
        )
        assert got == status
        assert body["error"]["code"] == code and body["error"]["message"]
        assert await server.hub.get_notifications_for_user("ann") == []

    @pytest.mark.parametrize(
        ("payload", "status", "fragment"),
        [
            (b"{not json", 400, "invalid JSON"),
            (b"[]", 400, "JSON object"),
            (b'{"type": "info"}', 400, "message"),
            (b'{"message": "x", "type": "loud"}', 400, "type"),
            (b'{"message": "x", "id": "forged"}', 400, "id"),
            (b'{"message": "' + b"x" * 20000 + b'"}', 413, "limit"),
        ],
    )
    async def test_bad_bodies(
        self, server: Running, payload: bytes, status: int, fragment: str
    ) -> None:
        """Invalid notification bodies get a clear error and are not stored."""
        got, body = await server.http(
            "POST", "/api/notifications/ann", raw=payload, token=server.token("svc", "publisher")
        )
        assert got == status
        assert fragment in body["error"]["message"]
        assert await server.hub.get_notifications_for_user("ann") == []


class TestSessionMessages:
    async def test_message_to_a_session(self, server: Running) -> None:
        """POST /api/sessions/{id}/messages reaches that session only."""
        tab = await server.user("bea")
        status, body = await server.http(
            "POST",
            f"/api/sessions/{tab.session_id}/messages",
            {"message": "restart soon"},
            token=server.token("svc", "publisher"),
        )
        assert (status, body) == (200, {"delivered": 1})
        assert await tab.next("message") == {"message": "restart soon"}

    async def test_unknown_session_is_404(self, server: Running) -> None:
        """A session that is not connected is 404."""
        status, body = await server.http(
            "POST",
            "/api/sessions/nope/messages",
            {"message": "x"},
            token=server.token("svc", "publisher"),
        )
        assert status == 404 and body["error"]["code"] == "not_found"


class TestBroadcast:
    async def test_admin_broadcasts(self, server: Running) -> None:
        """POST /api/broadcast (admin) reaches every session."""
        a, b = await server.user("a"), await server.user("b")
        status, body = await server.http(
            "POST",
            "/api/broadcast",
            {"message": "maintenance", "type": "warning"},
            token=server.token("root", "admin"),
        )
        assert (status, body) == (200, {"delivered": 2})
        assert (await a.next("notification"))["broadcast"] is True
        assert (await b.next("notification"))["message"] == "maintenance"

    @pytest.mark.parametrize("role", ["user", "publisher"])
    async def test_non_admin_cannot_broadcast(self, server: Running, role: str) -> None:
        """Only admin broadcasts."""
        status, body = await server.http(
            "POST", "/api/broadcast", {"message": "x"}, token=server.token("p", role)
        )
        assert status == 403 and body["error"]["code"] == "forbidden"


class TestHistory:
    async def test_owner_reads_own_history(self, server: Running) -> None:
        """GET /api/users/{id}/notifications with unread_only and limit."""
        for i in range(3):
            await server.hub.send_notification("cat", {"message": str(i)})
        status, body = await server.http(
            "GET",
            "/api/users/cat/notifications?unread_only=true&limit=2",
            token=server.token("cat"),
        )
        assert status == 200
        assert [n["message"] for n in body["notifications"]] == ["2", "1"]

    async def test_other_users_history_is_forbidden(self, server: Running) -> None:
        """A user cannot read someone else's notifications."""
        await server.hub.send_notification("cat", {"message": "secret"})
        status, _ = await server.http(
            "GET", "/api/users/cat/notifications", token=server.token("dog")
        )
        assert status == 403

    async def test_publisher_reads_any_history(self, server: Running) -> None:
        """Publishers and admins may read any user's history."""
        await server.hub.send_notification("cat", {"message": "m"})
        status, body = await server.http(
            "GET", "/api/users/cat/notifications", token=server.token("svc", "publisher")
        )
        assert status == 200 and len(body["notifications"]) == 1

    async def test_bad_limit(self, server: Running) -> None:
        """limit outside 1..500 is a 400."""
        status, body = await server.http(
            "GET", "/api/users/cat/notifications?limit=9999", token=server.token("cat")
        )
        assert status == 400 and "limit" in body["error"]["message"]


class TestTestRoute:
    async def test_seed_test_route_needs_no_token(self, server: Running) -> None:
        """The seed's curl example works where test routes are enabled."""
        tab = await server.user("user123")
        status, body = await server.http(
            "POST",
            "/api/test/notification/user123",
            {"message": "Test notification", "type": "info"},
        )
        assert status == 201 and body["delivered"] == 1
        assert (await tab.next("notification"))["message"] == "Test notification"

    async def test_absent_when_disabled(self, start_server: StartServer) -> None:
        """With test_routes off the route does not exist."""
        srv = await start_server(server={"test_routes": False})
        status, body = await srv.http("POST", "/api/test/notification/u", {"message": "x"})
        assert status == 404 and body["error"]["code"] == "not_found"


class TestErrors:
    async def test_unknown_route_is_json_404(self, server: Running) -> None:
        """Unknown paths answer the JSON error shape."""
        status, body = await server.http("GET", "/nope")
        assert status == 404 and body["error"]["code"] == "not_found"

    async def test_health_and_ready(self, server: Running) -> None:
        """/healthz and /readyz answer 200 while the store is open."""
        assert (await server.http("GET", "/healthz"))[0] == 200
        status, body = await server.http("GET", "/readyz")
        assert status == 200 and body["store"] == "ok"

    async def test_metrics_need_admin(self, server: Running) -> None:
        """/metrics is Prometheus text for admins only."""
        assert (await server.http("GET", "/metrics"))[0] == 401
        assert (await server.http("GET", "/metrics", token=server.token("u")))[0] == 403
        status, text = await server.http("GET", "/metrics", token=server.token("root", "admin"))
        assert status == 200 and "rtserver_connections" in text


class TestBatch:
    async def test_batch_stores_and_delivers_each(self, server: Running) -> None:
        """POST /api/notifications takes a list; each item is stored and pushed."""
        a, b = await server.user("ba"), await server.user("bb")
        items = [
            {"user_id": "ba", "notification": {"message": "one"}},
            {"user_id": "bb", "notification": {"message": "two", "k": 1}},
            {"user_id": "nobody", "notification": {"message": "three"}},
        ]
        status, body = await server.http(
            "POST", "/api/notifications", items, token=server.token("svc", "publisher")
        )
        assert status == 201
        assert [r["delivered"] for r in body["results"]] == [1, 1, 0]
        assert (await a.next("notification"))["message"] == "one"
        assert (await b.next("notification"))["k"] == 1
        assert [n.message for n in await server.hub.get_notifications_for_user("nobody")] == [
            "three"
        ]

    async def test_one_bad_item_refuses_the_batch(self, server: Running) -> None:
        """A bad item is named and nothing of the batch is stored."""
        items = [
            {"user_id": "ok", "notification": {"message": "fine"}},
            {"user_id": "ok", "notification": {"type": "info"}},
        ]
        status, body = await server.http(
            "POST", "/api/notifications", items, token=server.token("svc", "publisher")
        )
        assert status == 400 and body["error"]["message"].startswith("[1]: notification.message")
        assert await server.hub.get_notifications_for_user("ok") == []

    async def test_batch_needs_publisher_and_bounds(self, server: Running) -> None:
        """Users cannot batch-send; empty or oversized batches are refused."""
        assert (await server.http("POST", "/api/notifications", [], token=server.token("u")))[
            0
        ] == 403
        token = server.token("svc", "publisher")
        assert (await server.http("POST", "/api/notifications", [], token=token))[0] == 400
        big = [{"user_id": "u", "notification": {"message": "x"}}] * 1001
        assert (await server.http("POST", "/api/notifications", big, token=token))[0] == 400
