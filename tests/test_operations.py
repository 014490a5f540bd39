"""Operations: heartbeats, slow clients, admin session management, metrics
access, graceful shutdown (a real process, real signals)."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from rtserver.app import make_metrics_app
from rtserver.client import Client, ClientError

from .conftest import Running, StartServer
from .rawws import RawWebSocket
from .test_run import RUN, free_port, wait_http, write_config


async def wait_until(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return bool(predicate())


async def test_dead_peer_is_reaped_within_interval_plus_timeout(start_server: StartServer) -> None:
    """A peer that stops answering pings is closed within ping_interval +
    ping_timeout, and its session leaves the registry and the metrics."""
    srv = await start_server(server={"ping_interval": 0.2, "ping_timeout": 0.3})
    dead = await RawWebSocket.open(srv.port)
    assert dead.response.startswith(b"HTTP/1.1 101")
    try:
        ack = await dead.register(srv.token("ghost"))
        assert ack["event"] == "ack"
        assert srv.hub.get_user_sessions("ghost") == [ack["data"]["session_id"]]
        started = time.monotonic()
        assert await wait_until(lambda: srv.hub.get_user_sessions("ghost") == [], timeout=3)
        assert time.monotonic() - started < 0.2 + 0.3 + 0.5
        metrics = srv.hub.get_connection_metrics()
        assert metrics["connections"] == 0 and metrics["sessions"] == 0
    finally:
        dead.close()


async def test_slow_client_is_cut_off_while_others_receive(start_server: StartServer) -> None:
    """A client that stops reading is disconnected (1013, counted, logged) once its
    outbound queue passes the bound; another client receives everything."""
    # 200 notifications of 60 KB (12 MB) overflow the kernel's socket buffers
    # (at most 4 MB on this kind of machine) and then the 256 KiB bound.
    srv = await start_server(
        server={"max_outbound_bytes": 256 * 1024}, limits={"max_notification_bytes": 100_000}
    )
    fast = await srv.user("fast")
    slow = await RawWebSocket.open(srv.port, rcvbuf=4096)
    assert slow.response.startswith(b"HTTP/1.1 101")
    try:
        assert (await slow.register(srv.token("slow")))["event"] == "ack"
        body = "x" * 60_000
        for i in range(200):
            await srv.hub.send_notification("slow", {"message": body, "n": i})
            await srv.hub.send_notification("fast", {"message": str(i)})
            if i % 20 == 0:
                await asyncio.sleep(0)
        got = [(await fast.next("notification"))["message"] for _ in range(200)]
        assert got == [str(i) for i in range(200)]
        assert await wait_until(lambda: srv.hub.get_user_sessions("slow") == [])
        assert srv.hub.get_connection_metrics()["slow_client_disconnects_total"] == 1
        assert srv.hub.get_connection_metrics()["outbound_queue_max_bytes"] <= 256 * 1024
    finally:
        slow.close()


async def test_admin_lists_and_disconnects_sessions(server: Running) -> None:
    """GET /api/admin/sessions shows user, since, address, queue depth;
    DELETE disconnects one; the admin events do the same."""
    victim = await server.user("victim")
    token = server.token("root", "admin")
    status, body = await server.http("GET", "/api/admin/sessions", token=token)
    (entry,) = [s for s in body["sessions"] if s["user_id"] == "victim"]
    assert status == 200
    assert entry["session_id"] == victim.session_id and entry["remote_ip"] == "127.0.0.1"
    assert entry["connected_at"] > 0 and entry["outbound_bytes"] == 0
    status, _ = await server.http("DELETE", f"/api/admin/sessions/{victim.session_id}", token=token)
    assert status == 200
    await asyncio.wait_for(victim.closed.wait(), 5)
    assert victim.close_code == 1008
    assert (await server.http("DELETE", "/api/admin/sessions/gone", token=token))[0] == 404
    admin = await server.connect()
    await admin.register(token)
    other = await server.user("other")
    assert await admin.request("admin.disconnect", {"session_id": other.session_id}) == {
        "disconnected": other.session_id
    }
    await asyncio.wait_for(other.closed.wait(), 5)
    with_metrics = await admin.request("admin.metrics")
    assert with_metrics["metrics"]["connections_accepted_total"] >= 3
    try:
        await admin.request("admin.disconnect", {"session_id": "gone"})
    except ClientError as err:
        assert err.code == "not_found"  # noqa: PT017


async def test_metrics_on_a_separate_port_need_no_token(server: Running) -> None:
    """server.metrics_port serves /metrics publicly on its own address, while the
    main port keeps requiring an admin token."""
    sockets = bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    metrics_server = HTTPServer(make_metrics_app(server.hub))
    metrics_server.add_sockets(sockets)
    try:
        resp = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/metrics")
        text = resp.body.decode()
        assert "rtserver_connections " in text and "rtserver_store_buffered" in text
        assert (await server.http("GET", "/metrics"))[0] == 401
    finally:
        metrics_server.stop()
        await metrics_server.close_all_connections()


async def test_graceful_shutdown_loses_nothing(tmp_path: Path) -> None:
    """SIGTERM while notifications are being sent: clients get 1001 with a
    reconnect hint, the process exits 0, and after a restart every notification
    that was accepted (201) is in the history."""
    port = free_port()
    cfg = write_config(tmp_path)
    cmd = [*RUN, "--config", str(cfg), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    restarted = None
    try:
        await asyncio.get_running_loop().run_in_executor(
            None, wait_http, f"http://127.0.0.1:{port}/healthz"
        )
        token = subprocess.run(
            [*RUN, "token", "svc", "--role", "publisher", "--config", str(cfg)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        user_token = subprocess.run(
            [*RUN, "token", "reader", "--config", str(cfg)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        client = await Client.connect(f"ws://127.0.0.1:{port}/ws")
        await client.register(user_token)
        http = AsyncHTTPClient()
        accepted: list[str] = []
        refused = 0

        async def send(i: int) -> None:
            nonlocal refused
            try:
                resp = await http.fetch(
                    f"http://127.0.0.1:{port}/api/notifications/reader",
                    method="POST",
                    body=json.dumps({"message": f"m{i}"}),
                    headers={"Authorization": f"Bearer {token}"},
                    raise_error=False,
                    request_timeout=5,
                )
            except OSError:
                refused += 1
                return
            if resp.code == 201:
                accepted.append(json.loads(resp.body)["notification"]["id"])
            else:
                assert resp.code in (503, 599), resp.code
                refused += 1

        for i in range(400):
            if i == 100:
                proc.send_signal(signal.SIGTERM)
            await send(i)
        await asyncio.wait_for(client.closed.wait(), 10)
        assert client.close_code == 1001
        assert client.close_reason is not None and "reconnect_after_ms=" in client.close_reason
        await client.close()
        assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 20) == 0
        assert len(accepted) >= 100 and refused > 0

        restarted = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.get_running_loop().run_in_executor(
            None, wait_http, f"http://127.0.0.1:{port}/healthz"
        )
        stored: list[str] = []
        before = ""
        while True:
            query = f"?limit=500&before={before}" if before else "?limit=500"
            resp = await http.fetch(
                f"http://127.0.0.1:{port}/api/users/reader/notifications{query}",
                headers={"Authorization": f"Bearer {token}"},
            )
            page = json.loads(resp.body)["notifications"]
            if not page:
                break
            stored += [n["id"] for n in page]
            before = page[-1]["id"]
        assert set(accepted) <= set(stored)
    finally:
        for p in (proc, restarted):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        if proc.stderr:
            proc.stderr.close()


def test_python_client_module_is_importable_without_server() -> None:
    """rtserver.client works standalone (scripts and services import it)."""
    out = subprocess.run(
        [sys.executable, "-c", "import rtserver.client as c; print(c.Client.__name__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "Client"


async def test_startup_applies_gc_thresholds(start_server: StartServer) -> None:
    """server.gc_thresholds is applied at start-up, after the start-up objects
    are frozen out of the collector's full passes."""
    await start_server(server={"gc_thresholds": [5000, 7, 9]})
    assert gc.get_threshold() == (5000, 7, 9)
    assert gc.get_freeze_count() > 0


async def test_session_and_queue_gauges_follow_connections(server: Running) -> None:
    """The sessions gauge is kept in step (no walk over every connection per
    scrape): registering, a user's second session, and closing all count."""
    bare = await server.connect()
    first = await server.user("gauge")
    second = await server.user("gauge")
    await server.user("other")
    metrics = server.hub.get_connection_metrics()
    assert (metrics["connections"], metrics["sessions"], metrics["registered_users"]) == (4, 3, 2)
    assert metrics["outbound_queue_bytes"] == metrics["outbound_queue_max_bytes"] == 0
    await first.close()
    await second.close()
    await bare.close()
    assert await wait_until(lambda: len(server.hub.sessions) == 1, timeout=3)
    metrics = server.hub.get_connection_metrics()
    assert (metrics["connections"], metrics["sessions"], metrics["registered_users"]) == (1, 1, 1)
