"""A cluster: several run.py processes over one store and one Redis (a real
redis-server on a loopback port), driven by real clients."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient

from rtserver.client import Client

from .processes import ServerProcess
from .test_run import free_port

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS is None, reason="needs redis-server: apt-get install redis-server (.ci/run does)"
)
SECRET = "cluster-secret-0123456789-0123456789"


class Redis:
    def __init__(self, args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert REDIS is not None
        self.proc = subprocess.Popen(
            [
                REDIS,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


class Cluster:
    def __init__(
        self,
        tmp_path: Path,
        nodes: int,
        server_extra: str = "",
        redis_args: tuple[str, ...] = (),
    ) -> None:
        self.redis = Redis(redis_args)
        self.redis.start()
        self.config = tmp_path / "cluster.yaml"
        self.config.write_text(
            f"auth:\n  secret: {SECRET}\n"
            f"store:\n  data_dir: {tmp_path}\n  cleanup_interval: 0\n"
            "server:\n  test_routes: true\n"
            + server_extra
            + "logging:\n  format: json\n  metrics_interval: 0\n"
            f"broker:\n  backend: redis\n  url: redis://127.0.0.1:{self.redis.port}/0\n  session_ttl: 1.5\n"
        )
        self.nodes = [ServerProcess(self.config) for _ in range(nodes)]
        for node in self.nodes:
            node.start()
        self.clients: list[Client] = []

    async def token(self, user: str, role: str = "user", **grants: list[str]) -> str:
        """A token from node 0's test route (``grants``: topics, publish_topics)."""
        resp = await AsyncHTTPClient().fetch(
            self.nodes[0].base + "/api/test/token",
            method="POST",
            body=json.dumps({"user_id": user, "role": role, **grants}),
        )
        return json.loads(resp.body)["token"]  # type: ignore[no-any-return]

    async def user(self, node: int, user: str, last_id: str | None = None) -> Client:
        client = await Client.connect(self.nodes[node].ws)
        await client.register(await self.token(user), last_id=last_id, receipts=False)
        self.clients.append(client)
        return client

    async def http(
        self,
        node: int,
        method: str,
        path: str,
        body: Any = None,
        role: str = "admin",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        resp = await AsyncHTTPClient().fetch(
            self.nodes[node].base + path,
            method=method,
            body=None if body is None else json.dumps(body),
            headers={"Authorization": f"Bearer {await self.token('ops', role)}", **(headers or {})},
            raise_error=False,
        )
        return resp.code, json.loads(resp.body) if resp.body else None

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for node in self.nodes:
            node.kill()
        self.redis.stop()


@pytest.fixture
async def cluster2(tmp_path: Path) -> Iterator[Cluster]:  # type: ignore[misc]
    c = Cluster(tmp_path, 2)
    yield c
    await c.close()


async def settle() -> None:
    await asyncio.sleep(0.3)  # subscriptions and heartbeats travel through Redis


async def test_delivery_crosses_nodes_exactly_once(cluster2: Cluster) -> None:
    """A notification sent to node 0 reaches the user's sessions on both nodes
    once each, and is stored once; broadcasts reach every node."""
    a, b = await cluster2.user(0, "ann"), await cluster2.user(1, "ann")
    other = await cluster2.user(1, "bob")
    await settle()
    status, body = await cluster2.http(
        0, "POST", "/api/notifications/ann", {"message": "hello"}, role="publisher"
    )
    assert status == 201
    nid = body["notification"]["id"]
    assert (await a.next("notification"))["id"] == nid
    assert (await b.next("notification"))["id"] == nid
    await asyncio.sleep(0.3)
    assert a.pending() == [] and b.pending() == [] and other.pending() == []
    status, hist = await cluster2.http(1, "GET", "/api/users/ann/notifications")
    assert [n["id"] for n in hist["notifications"]] == [nid]

    status, body = await cluster2.http(1, "POST", "/api/broadcast", {"message": "all"})
    for client in (a, b, other):
        assert (await client.next("notification"))["message"] == "all"


async def test_an_idempotency_key_holds_across_nodes(cluster2: Cluster) -> None:
    """A retry with the same Idempotency-Key sent to the other node gets the
    first answer; the user's session gets the notification once."""
    ann = await cluster2.user(1, "kay")
    await settle()
    key = {"Idempotency-Key": "order-77-shipped"}
    answers = [
        await cluster2.http(
            node, "POST", "/api/notifications/kay", {"message": "shipped"}, "publisher", key
        )
        for node in (0, 1, 0)
    ]
    assert [status for status, _ in answers] == [201, 201, 201]
    assert len({body["notification"]["id"] for _, body in answers}) == 1
    assert (await ann.next("notification"))["message"] == "shipped"
    await asyncio.sleep(0.3)
    assert ann.pending() == []
    status, hist = await cluster2.http(1, "GET", "/api/users/kay/notifications")
    assert len(hist["notifications"]) == 1
    status, body = await cluster2.http(
        1, "POST", "/api/notifications/kay", {"message": "other"}, "publisher", key
    )
    assert status == 422 and body["error"]["code"] == "idempotency_mismatch"


async def test_direct_message_and_read_push_cross_nodes(cluster2: Cluster) -> None:
    """A message to a session on another node arrives (404 when no node has it);
    mark_read on one node sends the read push to the user's session on the other."""
    a, b = await cluster2.user(0, "cy"), await cluster2.user(1, "cy")
    await settle()
    await asyncio.sleep(1.0)  # the session directory is refreshed by heartbeat
    status, _ = await cluster2.http(
        0, "POST", f"/api/sessions/{b.session_id}/messages", {"message": "hi b"}, role="publisher"
    )
    assert status == 200
    assert await b.next("message") == {"message": "hi b"}
    status, _ = await cluster2.http(
        0, "POST", "/api/sessions/nobody/messages", {"message": "x"}, role="publisher"
    )
    assert status == 404
    status, body = await cluster2.http(
        0, "POST", "/api/notifications/cy", {"message": "read me"}, role="publisher"
    )
    nid = body["notification"]["id"]
    await a.next("notification")
    await b.next("notification")
    await a.mark_read([nid])
    assert await b.next("read") == {"ids": [nid], "unread_count": 0}
    # Deleted through node 1's API: node 0's session hears of it too.
    status, _ = await cluster2.http(1, "DELETE", f"/api/users/cy/notifications/{nid}")
    assert status == 204
    for client in (a, b):
        assert await client.next("deleted") == {"ids": [nid], "unread_count": 0}


async def test_cluster_view_and_a_crashed_node(cluster2: Cluster) -> None:
    """Admin listings cover every node with node ids; a killed node's sessions
    disappear from the view within seconds."""
    await cluster2.user(0, "dee")
    await cluster2.user(1, "eve")
    await asyncio.sleep(1.0)
    status, body = await cluster2.http(0, "GET", "/api/admin/sessions")
    assert status == 200
    assert {s["user_id"] for s in body["sessions"]} == {"dee", "eve"}
    assert len({s["node_id"] for s in body["sessions"]}) == 2
    status, metrics = await cluster2.http(0, "GET", "/api/admin/metrics")
    assert metrics["cluster"]["sessions"] == 2 and len(metrics["nodes"]) == 2
    cluster2.nodes[1].kill()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        _, body = await cluster2.http(0, "GET", "/api/admin/sessions")
        if {s["user_id"] for s in body["sessions"]} == {"dee"}:
            break
        await asyncio.sleep(0.2)
    assert {s["user_id"] for s in body["sessions"]} == {"dee"}


async def test_redis_outage_then_recovery(cluster2: Cluster) -> None:
    """With Redis down each node still delivers to its own sessions and stores
    everything; readiness says the broker is degraded; when Redis returns,
    cross-node delivery comes back by itself, and what a session missed arrives
    with last_id."""
    a, b = await cluster2.user(0, "fay"), await cluster2.user(1, "fay")
    await settle()
    cluster2.redis.stop()
    await asyncio.sleep(0.3)
    sent = []
    for i in range(5):
        status, body = await cluster2.http(
            0, "POST", "/api/notifications/fay", {"message": f"down{i}"}, role="publisher"
        )
        assert status == 201
        sent.append(body["notification"]["id"])
    assert [(await a.next("notification"))["id"] for _ in sent] == sent
    status, ready = await cluster2.http(0, "GET", "/readyz")
    assert ready["broker"] == "degraded"
    # A session on another node cannot be found, which is not "no such session".
    status, body = await cluster2.http(
        0, "POST", f"/api/sessions/{b.session_id}/messages", {"message": "x"}, role="publisher"
    )
    assert (status, body["error"]["code"]) == (503, "unavailable")
    status, _ = await cluster2.http(
        0, "POST", f"/api/sessions/{a.session_id}/messages", {"message": "here"}, role="publisher"
    )
    assert status == 200  # its own sessions it still reaches
    assert await a.next("message") == {"message": "here"}
    cluster2.redis.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, ready = await cluster2.http(1, "GET", "/readyz")
        _, ready0 = await cluster2.http(0, "GET", "/readyz")
        if ready["broker"] == ready0["broker"] == "ok":
            break
        await asyncio.sleep(0.1)
    assert ready["broker"] == "ok"
    await asyncio.sleep(0.5)
    status, body = await cluster2.http(
        0, "POST", "/api/notifications/fay", {"message": "back"}, role="publisher"
    )
    assert (await b.next("notification", timeout=5))["message"] == "back"
    assert (await a.next("notification"))["message"] == "back"
    # b missed the five sent while Redis was down: resuming from before them brings them.
    await b.close()
    resumed = await cluster2.user(1, "fay", last_id=sent[0][:12] + "0" * 12)
    got = [(await resumed.next("notification"))["id"] for _ in range(6)]
    assert got[:5] == sent


async def test_a_node_dies_and_its_client_resumes_elsewhere(cluster2: Cluster) -> None:
    """A node is killed: its client reconnects to the other node with last_id and
    gets everything it missed, nothing twice."""
    mobile = await cluster2.user(1, "gus")
    await settle()
    first = []
    for i in range(3):
        _, body = await cluster2.http(
            0, "POST", "/api/notifications/gus", {"message": f"before{i}"}, role="publisher"
        )
        first.append(body["notification"]["id"])
    assert [(await mobile.next("notification"))["id"] for _ in first] == first
    cluster2.nodes[1].kill()
    await asyncio.wait_for(mobile.closed.wait(), 5)
    missed = []
    for i in range(3):
        _, body = await cluster2.http(
            0, "POST", "/api/notifications/gus", {"message": f"after{i}"}, role="publisher"
        )
        missed.append(body["notification"]["id"])
    back = await cluster2.user(0, "gus", last_id=first[-1])
    assert [(await back.next("notification"))["id"] for _ in missed] == missed
    await asyncio.sleep(0.3)
    assert back.pending() == []


async def test_a_receipt_on_one_node_settles_it_everywhere(tmp_path: Path) -> None:
    """A receipt confirmed on node 1 stops node 0 from waiting for it: node 0's
    other receipts-session is not sent the notification again."""
    cluster = Cluster(tmp_path, 2, server_extra="  receipt_timeout: 0.4\n")
    try:
        silent = await Client.connect(cluster.nodes[0].ws)
        silent.auto_confirm = False
        await silent.register(await cluster.token("hal"), receipts=True)
        confirming = await Client.connect(cluster.nodes[1].ws)
        await confirming.register(await cluster.token("hal"), receipts=True)
        cluster.clients += [silent, confirming]
        await settle()
        _, body = await cluster.http(
            0, "POST", "/api/notifications/hal", {"message": "x"}, role="publisher"
        )
        nid = body["notification"]["id"]
        await silent.next("notification")
        await confirming.next("notification")
        # The only session node 0 could re-push to: it resumed past the notification.
        late = await Client.connect(cluster.nodes[0].ws)
        await late.register(await cluster.token("hal"), last_id=nid, receipts=True)
        cluster.clients.append(late)
        await asyncio.sleep(1.5)  # several receipt timeouts
        assert late.pending() == []
        _, metrics = await cluster.http(0, "GET", "/api/admin/metrics")
        assert metrics["metrics"].get("receipts_resent_total", 0) == 0
        _, state = await cluster.http(0, "GET", f"/api/users/hal/notifications/{nid}")
        assert state["delivered"] is True
    finally:
        await cluster.close()


async def test_a_plain_session_on_another_node_settles_it(cluster2: Cluster) -> None:
    """Node 0's only session of the user confirms receipts and stays silent;
    node 1's session does not confirm receipts, so receiving counts as
    delivered. Node 1 may mark the row before node 0 has written it (the mark
    then finds nothing), so it also tells node 0, which marks the row once
    written: the notification is delivered, and not offered again."""
    silent = await Client.connect(cluster2.nodes[0].ws)
    silent.auto_confirm = False
    await silent.register(await cluster2.token("ivy"), receipts=True)
    cluster2.clients.append(silent)
    plain = await cluster2.user(1, "ivy")
    await settle()
    ids = []
    for i in range(20):
        _, body = await cluster2.http(
            0, "POST", "/api/notifications/ivy", {"message": str(i)}, role="publisher"
        )
        ids.append(body["notification"]["id"])
    assert [(await plain.next("notification"))["id"] for _ in ids] == ids
    assert [(await silent.next("notification"))["id"] for _ in ids] == ids
    deadline = time.monotonic() + 5
    while True:
        states = [
            (await cluster2.http(0, "GET", f"/api/users/ivy/notifications/{nid}"))[1] for nid in ids
        ]
        if all(state["delivered"] for state in states) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert [state["delivered"] for state in states] == [True] * len(ids)
    again = await cluster2.user(0, "ivy")
    await asyncio.sleep(0.3)
    assert again.pending() == []  # nothing offered again at the next register
