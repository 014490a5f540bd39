"""Attacks on authorization, origins, input validation, limits and transport,
each against a real server over real sockets."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.netutil import bind_sockets
from tornado.websocket import WebSocketProtocol13, websocket_connect

from rtserver.app import make_app
from rtserver.client import Client, ClientError

from ..conftest import Running, StartServer, make_config


class TestAuthorization:
    async def test_cross_user_mark_read(self, server: Running) -> None:
        """Marking another user's notification read changes nothing."""
        victim = await server.hub.send_notification("victim", {"message": "private"})
        attacker = await server.user("attacker")
        ack = await attacker.mark_read([victim.notification.id])
        assert ack["updated"] == 0
        assert (await server.hub.get_notifications_for_user("victim", unread_only=True))[
            0
        ].id == victim.notification.id

    async def test_cross_user_history_read(self, server: Running) -> None:
        """A user token cannot read another user's history over HTTP; over the
        WebSocket, history is always the caller's own."""
        await server.hub.send_notification("victim", {"message": "private"})
        status, _ = await server.http(
            "GET", "/api/users/victim/notifications", token=server.token("attacker")
        )
        assert status == 403
        attacker = await server.user("attacker")
        assert await attacker.get_notifications() == []
        with pytest.raises(ClientError) as err:
            await attacker.request("get_notifications", {"user_id": "victim"})
        assert err.value.code == "bad_request"

    async def test_register_as_someone_else(self, server: Running) -> None:
        """register takes the user from the token; there is no field to claim another."""
        client = await server.connect()
        with pytest.raises(ClientError) as err:
            await client.request(
                "register", {"token": server.token("attacker"), "user_id": "victim"}
            )
        assert err.value.code == "bad_request"
        assert server.hub.get_user_sessions("victim") == []

    async def test_user_cannot_send_or_message_sessions(self, server: Running) -> None:
        """User tokens cannot send notifications or address anyone's session."""
        victim = await server.user("victim")
        token = server.token("attacker")
        assert (
            await server.http("POST", "/api/notifications/victim", {"message": "x"}, token=token)
        )[0] == 403
        assert (
            await server.http(
                "POST", f"/api/sessions/{victim.session_id}/messages", {"message": "x"}, token=token
            )
        )[0] == 403
        await asyncio.sleep(0.05)
        assert victim.pending() == []

    @pytest.mark.parametrize("role", ["user", "publisher"])
    async def test_non_admin_broadcast_and_admin_routes(self, server: Running, role: str) -> None:
        """Every admin route and admin event refuses non-admins."""
        token = server.token("x", role)
        for method, path, body in (
            ("POST", "/api/broadcast", {"message": "x"}),
            ("GET", "/api/admin/sessions", None),
            ("DELETE", "/api/admin/sessions/abc", None),
            ("GET", "/api/admin/metrics", None),
            ("GET", "/metrics", None),
        ):
            status, reply = await server.http(method, path, body, token=token)
            assert status == 403, path
            assert reply is None or isinstance(reply, str) or reply["error"]["code"] == "forbidden"
        client = await server.connect()
        await client.register(token)
        for event, data in (
            ("admin.broadcast", {"notification": {"message": "x"}}),
            ("admin.sessions", {}),
            ("admin.disconnect", {"session_id": client.session_id}),
            ("admin.metrics", {}),
        ):
            with pytest.raises(ClientError) as err:
                await client.request(event, data)
            assert err.value.code == "forbidden"


class TestOrigins:
    @pytest.fixture
    async def srv(self, start_server: StartServer) -> Running:
        return await start_server(
            server={"allowed_origins": ["https://app.example.com", "https://*.example.org"]}
        )

    async def connect_with(self, srv: Running, headers: dict[str, str]) -> Client:
        return await srv.connect(headers=headers)

    @pytest.mark.parametrize(
        "origin",
        [
            "https://evil.example",
            "https://app.example.com.evil.io",
            "http://app.example.com",
            "https://example.org",
        ],
    )
    async def test_foreign_origin_refused_before_upgrade(self, srv: Running, origin: str) -> None:
        """A browser from an origin not allowed gets 403 and no WebSocket."""
        with pytest.raises(HTTPClientError) as err:
            await self.connect_with(srv, {"Origin": origin})
        assert err.value.code == 403
        assert len(srv.hub.sessions) == 0

    @pytest.mark.parametrize(
        "origin", ["https://app.example.com", "https://a.example.org", "https://b.c.example.org"]
    )
    async def test_allowed_and_wildcard_origins(self, srv: Running, origin: str) -> None:
        """Exact origins and *.example.org subdomains connect."""
        client = await self.connect_with(srv, {"Origin": origin})
        assert (await client.register(srv.token("o")))["user_id"] == "o"

    async def test_same_origin_and_non_browser_clients(self, srv: Running) -> None:
        """Same-origin pages and clients without Origin still connect."""
        same = await self.connect_with(srv, {"Origin": srv.base})
        plain = await srv.connect()
        for c in (same, plain):
            assert (await c.register(srv.token("s")))["user_id"] == "s"

    async def test_cors_preflight_only_for_allowed(self, srv: Running) -> None:
        """OPTIONS preflight answers allowed origins with CORS headers, others 403."""
        from tornado.httpclient import AsyncHTTPClient

        ok = await AsyncHTTPClient().fetch(
            srv.base + "/api/notifications/u",
            method="OPTIONS",
            headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
            raise_error=False,
        )
        assert ok.code == 204
        assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "Authorization" in ok.headers["Access-Control-Allow-Headers"]
        bad = await AsyncHTTPClient().fetch(
            srv.base + "/api/notifications/u",
            method="OPTIONS",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
            raise_error=False,
        )
        assert bad.code == 403 and "Access-Control-Allow-Origin" not in bad.headers


class TestBadInput:
    async def test_oversized_frame_closes_1009(self, server: Running) -> None:
        """A frame over max_frame_bytes (64 KiB) closes the connection with 1009;
        other sessions carry on."""
        other = await server.user("other")
        client = await server.connect()
        await client.send_raw(json.dumps({"event": "register", "data": {"token": "x" * 70000}}))
        await asyncio.wait_for(client.closed.wait(), 5)
        assert client.close_code == 1009
        assert (await server.hub.send_notification("other", {"message": "ok"})).delivered == 1
        assert (await other.next("notification"))["message"] == "ok"

    async def test_deeply_nested_json(self, server: Running) -> None:
        """Deep nesting gets too_large (not a crash), in frames and in notifications."""
        client = await server.user("deep")
        await client.send_raw(
            '{"event": "get_notifications", "id": 1, "data": ' + "[" * 5000 + "]" * 5000 + "}"
        )
        reply = await client.next()
        assert reply["event"] == "error" and reply["data"]["code"] in ("too_large", "bad_request")
        nested: dict = {"message": "x"}  # type: ignore[type-arg]
        cursor = nested
        for _ in range(20):
            cursor["n"] = {}
            cursor = cursor["n"]
        status, body = await server.http(
            "POST", "/api/notifications/deep", nested, token=server.token("svc", "publisher")
        )
        assert status == 400 or status == 413
        assert body["error"]["code"] == "too_large"
        assert (await client.request("get_notifications")) == {"notifications": []}

    async def test_invalid_utf8_drops_only_that_connection(self, server: Running) -> None:
        """A text frame of invalid UTF-8 fails that connection (RFC 6455 8.1);
        no other session notices."""
        other = await server.user("other")
        client = await server.connect()
        ws = client.ws
        assert ws.protocol is not None
        assert isinstance(ws.protocol, WebSocketProtocol13)
        ws.protocol._write_frame(True, 0x1, b"\xff\xfe\xfd")  # a text frame, not UTF-8
        await asyncio.wait_for(client.closed.wait(), 5)
        assert (await server.hub.send_notification("other", {"message": "fine"})).delivered == 1
        assert (await other.next("notification"))["message"] == "fine"

    async def test_mark_read_id_cap(self, server: Running) -> None:
        """More ids than max_ids_per_mark_read get too_large."""
        client = await server.user("ids")
        with pytest.raises(ClientError) as err:
            await client.request("mark_read", {"ids": [str(i) for i in range(501)]})
        assert err.value.code == "too_large"

    async def test_malformed_flood_while_another_client_receives_all_in_order(
        self, start_server: StartServer
    ) -> None:
        """1,000 malformed frames from one client: each gets an error reply, and
        another client receives every notification, in order."""
        srv = await start_server(limits={"frames_per_second": 100000, "frame_burst": 100000})
        good, bad = await srv.user("good"), await srv.connect()
        garbage = [
            "{",
            "[]",
            '{"event": 1}',
            '{"event": "x", "id": 1.5}',
            "null",
            '{"event": "register", "data": 5}',
        ]

        async def flood() -> None:
            for i in range(1000):
                await bad.send_raw(garbage[i % len(garbage)])

        async def send() -> list[str]:
            ids = []
            for i in range(100):
                ids.append(
                    (await srv.hub.send_notification("good", {"message": str(i)})).notification.id
                )
                await asyncio.sleep(0)
            return ids

        _, sent = await asyncio.gather(flood(), send())
        received = [(await good.next("notification"))["id"] for _ in range(100)]
        assert received == sent
        errors = [await bad.next() for _ in range(1000)]
        assert all(e["event"] == "error" for e in errors)
        assert not bad.closed.is_set()


class TestRateLimits:
    async def test_frame_flood(self, start_server: StartServer) -> None:
        """Past the per-connection frame bucket: rate_limited with retry_after."""
        srv = await start_server(limits={"frames_per_second": 5, "frame_burst": 5})
        client = await srv.user("flood")
        for i in range(10):
            await client.send_raw(json.dumps({"event": "get_notifications", "id": i}))
        replies = [await client.next() for _ in range(10)]
        limited = [r for r in replies if r["event"] == "error"]
        assert len(limited) >= 4
        assert (
            limited[0]["data"]["code"] == "rate_limited" and limited[0]["data"]["retry_after"] > 0
        )
        assert srv.hub.get_connection_metrics()["rate_limited"]["frames"] >= 4

    async def test_register_flood_and_connections_per_user(self, start_server: StartServer) -> None:
        """Per user: registers per minute and open connections are capped."""
        srv = await start_server(limits={"registers_per_minute": 3, "max_connections_per_user": 2})
        a, b = await srv.user("u"), await srv.user("u")
        c = await srv.connect()
        with pytest.raises(ClientError) as err:
            await c.register(srv.token("u"))
        assert err.value.code == "rate_limited" and "connections per user" in err.value.message
        await a.close()
        await b.close()
        await asyncio.sleep(0.1)
        await (await srv.connect()).register(srv.token("u"))  # the third of three a minute
        with pytest.raises(ClientError) as err:
            await (await srv.connect()).register(srv.token("u"))
        assert err.value.code == "rate_limited" and "registers" in err.value.message

    async def test_http_flood_gets_429_with_retry_after(self, start_server: StartServer) -> None:
        """Per token subject on the HTTP API: 429 with Retry-After."""
        srv = await start_server(limits={"http_requests_per_second": 3})
        token = srv.token("svc", "publisher")
        codes = [
            (await srv.http("POST", "/api/notifications/u", {"message": "x"}, token=token))[0]
            for _ in range(10)
        ]
        assert codes[:6] == [201] * 6 and 429 in codes
        from tornado.httpclient import AsyncHTTPClient

        resp = await AsyncHTTPClient().fetch(
            srv.base + "/api/notifications/u",
            method="POST",
            body=b'{"message": "x"}',
            headers={"Authorization": f"Bearer {token}"},
            raise_error=False,
        )
        assert resp.code == 429 and int(resp.headers["Retry-After"]) >= 1
        assert json.loads(resp.body)["error"]["code"] == "rate_limited"

    async def test_connection_storm_and_total_cap(self, start_server: StartServer) -> None:
        """Server-wide: new connections per second and total connections are capped (429)."""
        srv = await start_server(limits={"connections_per_second": 2, "max_connections": 100})
        accepted, refused = 0, 0
        for _ in range(10):
            try:
                await srv.connect()
                accepted += 1
            except HTTPClientError as err:
                assert err.code == 429  # noqa: PT017
                refused += 1
        assert accepted >= 4 and refused >= 1
        capped = await start_server(limits={"max_connections": 2})
        await capped.connect()
        await capped.connect()
        with pytest.raises(HTTPClientError) as refusal:
            await capped.connect()
        assert refusal.value.code == 429

    async def test_defaults_allow_heavy_legitimate_use(self, server: Running) -> None:
        """Default limits: 25 tabs of one user and a publisher posting 300 quickly all work."""
        tabs = [await server.user("busy") for _ in range(25)]
        token = server.token("svc", "publisher")
        codes = await asyncio.gather(
            *(
                server.http("POST", "/api/notifications/busy", {"message": str(i)}, token=token)
                for i in range(300)
            )
        )
        assert {c for c, _ in codes} == {201}
        for tab in tabs[:3]:
            assert (await tab.next("notification"))["message"]


def self_signed(tmp_path: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


async def test_tls_serves_wss_and_https(tmp_path: Path) -> None:
    """With a certificate and key configured, the server speaks wss:// and https://."""
    cert, key = self_signed(tmp_path)
    cfg = make_config(tmp_path, server={"tls_cert": cert, "tls_key": key})
    app = make_app(cfg)
    await app.startup()
    sockets = bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    server = app.make_server()  # TLS: /ws through Tornado's WebSocketHandler
    server.add_sockets(sockets)
    client_ctx = ssl.create_default_context(cafile=cert)
    try:
        ws = await websocket_connect(
            HTTPRequest(f"wss://localhost:{port}/ws", ssl_options=client_ctx)
        )
        client = Client(ws)
        ack = await client.register(app.hub.auth.mint("tls"))
        await app.hub.send_notification("tls", {"message": "encrypted"})
        assert (
            ack["user_id"] == "tls"
            and (await client.next("notification"))["message"] == "encrypted"
        )
        await client.close()
        from tornado.httpclient import AsyncHTTPClient

        resp = await AsyncHTTPClient().fetch(
            f"https://localhost:{port}/healthz", ssl_options=client_ctx
        )
        assert resp.code == 200
        with pytest.raises((ssl.SSLError, HTTPClientError, OSError)):
            await AsyncHTTPClient().fetch(f"http://localhost:{port}/healthz", request_timeout=2)
    finally:
        server.stop()
        await app.shutdown(timeout=1)
        await server.close_all_connections()
