"""Routing and presence across a cluster: real redis-server, several run.py
processes, real clients. A session id names its node, so a direct message
through any node is one publish and one answer; presence is kept as sessions
come and go, never by snapshots or SCAN."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rtserver.client import Client

from .test_cluster import REDIS, Cluster, cluster2  # noqa: F401 (a fixture)

redis = pytest.importorskip("redis")
pytestmark = pytest.mark.skipif(
    REDIS is None, reason="needs redis-server: apt-get install redis-server (.ci/run does)"
)

TTL = 1.5  # the clusters' broker.session_ttl: a heartbeat every 0.5 s


@pytest.fixture
async def cluster3(tmp_path: Path) -> Iterator[Cluster]:  # type: ignore[misc]
    c = Cluster(tmp_path, 3)
    yield c
    await c.close()


async def message(cluster: Cluster, node: int, session_id: str, text: str) -> tuple[int, Any]:
    return await cluster.http(
        node, "POST", f"/api/sessions/{session_id}/messages", {"message": text}, role="publisher"
    )


async def everyone(cluster: Cluster, node: int, limit: int = 1000) -> tuple[list[Any], bool]:
    """Every page of the admin session list from ``node``: (sessions, partial)."""
    out: list[Any] = []
    cursor = ""
    partial = False
    for _ in range(1000):
        status, body = await cluster.http(
            node,
            "GET",
            f"/api/admin/sessions?limit={limit}" + (f"&cursor={cursor}" if cursor else ""),
        )
        assert status == 200, body
        out += body["sessions"]
        partial = partial or body["partial"]
        if body["next"] is None:
            return out, partial
        cursor = body["next"]
    raise AssertionError("the pages never ended")


async def test_a_session_is_reachable_from_another_node_the_moment_it_registers(
    cluster2: Cluster,  # noqa: F811
) -> None:
    """Register on node 1, message it through node 0 at once: 50 times, every
    one answered 200 and received. Closed, it answers 404 at once."""
    token = await cluster2.token("rex")
    for i in range(50):
        client = await Client.connect(cluster2.nodes[1].ws)
        await client.register(token, receipts=False)
        assert client.session_id is not None and client.session_id.count(".") == 1
        status, body = await message(cluster2, 0, client.session_id, f"m{i}")
        assert (status, body) == (200, {"delivered": 1})
        assert await client.next("message") == {"message": f"m{i}"}
        await client.close()
        status, body = await message(cluster2, 0, client.session_id, "too late")
        assert status == 404 and body["error"]["code"] == "not_found"


async def test_routing_ignores_unknown_nodes_and_odd_ids(cluster2: Cluster) -> None:  # noqa: F811
    """An id naming no live node is 404 at once, as is one without a node."""
    for sid in ("nobody", "ghost.abc", ".abc", "a.b.c"):
        t0 = time.monotonic()
        status, _ = await message(cluster2, 0, sid, "x")
        assert status == 404
        assert time.monotonic() - t0 < 0.5


async def test_an_admin_disconnects_a_session_through_another_node(
    cluster2: Cluster,  # noqa: F811
) -> None:
    client = await cluster2.user(1, "sam")
    assert client.session_id is not None
    status, body = await cluster2.http(0, "DELETE", f"/api/admin/sessions/{client.session_id}")
    assert (status, body) == (200, {"disconnected": client.session_id})
    await asyncio.wait_for(client.closed.wait(), 5)
    assert client.close_code == 1008
    status, _ = await cluster2.http(0, "DELETE", f"/api/admin/sessions/{client.session_id}")
    assert status == 404


async def test_views_page_through_every_node(cluster3: Cluster) -> None:
    """The admin list, page by page from any node, holds every session once
    with its node; per-user views find a user's sessions on every node;
    metrics sum every node."""
    expected = {}
    for i in range(12):
        client = await cluster3.user(i % 3, f"u{i % 4}")
        assert client.session_id is not None
        expected[client.session_id] = (f"u{i % 4}", client.session_id.split(".")[0])
    await asyncio.sleep(0.2)  # presence writes are pipelined after the register
    for node in range(3):
        for limit in (1, 5, 1000):
            sessions, partial = await everyone(cluster3, node, limit)
            assert not partial
            got = {s["session_id"]: (s["user_id"], s["node_id"]) for s in sessions}
            assert len(sessions) == len(got) == 12
            assert got == expected
    status, body = await cluster3.http(2, "GET", "/api/admin/sessions?user_id=u1")
    assert {s["session_id"] for s in body["sessions"]} == {
        sid for sid, (user, _) in expected.items() if user == "u1"
    }
    assert len({s["node_id"] for s in body["sessions"]}) == 3
    deadline = time.monotonic() + 2  # each node's figures are as of its last heartbeat
    while time.monotonic() < deadline:
        status, metrics = await cluster3.http(1, "GET", "/api/admin/metrics")
        if metrics["cluster"]["sessions"] == 12:
            break
        await asyncio.sleep(0.1)
    assert metrics["cluster"]["sessions"] == 12 and len(metrics["nodes"]) == 3
    assert metrics["partial"] is False
    status, body = await cluster3.http(0, "GET", "/api/admin/sessions?limit=0")
    assert status == 400


async def test_a_killed_node_is_gone_within_3_seconds(cluster3: Cluster) -> None:
    """kill -9 a node: its sessions leave every view and answer 404 within
    3 s (its heartbeat stops), and its leftovers are removed from Redis."""
    alive = await cluster3.user(0, "ada")
    doomed = [await cluster3.user(2, "ada"), await cluster3.user(2, "bo")]
    await asyncio.sleep(0.2)
    cluster3.nodes[2].kill()
    killed_at = time.monotonic()
    deadline = killed_at + 5
    while time.monotonic() < deadline:
        statuses = [(await message(cluster3, 1, c.session_id or "", "x"))[0] for c in doomed]
        if statuses == [404, 404]:
            break
        assert set(statuses) <= {404, 503}  # 503 while it might still be alive
        await asyncio.sleep(0.05)
    gone_after = time.monotonic() - killed_at
    assert gone_after <= 3.0, gone_after
    sessions, _ = await everyone(cluster3, 1)
    assert {s["session_id"] for s in sessions} == {alive.session_id}
    _, body = await cluster3.http(0, "GET", "/api/admin/sessions?user_id=ada")
    assert [s["session_id"] for s in body["sessions"]] == [alive.session_id]
    _, metrics = await cluster3.http(0, "GET", "/api/admin/metrics")
    assert len(metrics["nodes"]) == 2 and metrics["cluster"]["sessions"] == 1
    r = redis.Redis(port=cluster3.redis.port)
    deadline = time.monotonic() + 3
    while r.exists("rt:user:bo") and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    assert not r.exists("rt:user:bo") and not r.exists("rt:gone")
    assert r.hkeys("rt:user:ada") == [alive.session_id.encode()]  # type: ignore[union-attr]
    r.close()


async def test_redis_restarted_empty_then_views_come_back(cluster2: Cluster) -> None:  # noqa: F811
    """Redis dies and comes back with nothing: while it is down the views
    are this node's with "partial": true; once the nodes are back each writes
    its sessions again within about a heartbeat, and routing works at once."""
    a, b = await cluster2.user(0, "cat"), await cluster2.user(1, "dan")
    cluster2.redis.stop()
    await asyncio.sleep(0.3)
    _, body = await cluster2.http(0, "GET", "/api/admin/sessions")
    assert body["partial"] is True
    assert [s["session_id"] for s in body["sessions"]] == [a.session_id]
    _, metrics = await cluster2.http(0, "GET", "/api/admin/metrics")
    assert metrics["partial"] is True and list(metrics["nodes"]) == [
        (a.session_id or "").split(".")[0]
    ]
    _, body = await cluster2.http(1, "GET", "/api/admin/sessions?user_id=cat")
    assert body == {"sessions": [], "next": None, "partial": True}
    cluster2.redis.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ready = [(await cluster2.http(n, "GET", "/readyz"))[1]["broker"] for n in (0, 1)]
        if ready == ["ok", "ok"]:
            break
        await asyncio.sleep(0.05)
    back_at = time.monotonic()
    assert (await message(cluster2, 0, b.session_id or "", "back"))[0] == 200
    assert await b.next("message") == {"message": "back"}
    while time.monotonic() < back_at + 5:
        sessions, partial = await everyone(cluster2, 0)
        if not partial and len(sessions) == 2:
            break
        await asyncio.sleep(0.05)
    assert {s["session_id"] for s in sessions} == {a.session_id, b.session_id}
    assert time.monotonic() - back_at <= 2 * TTL / 3 + 0.5


async def test_no_scan_and_a_million_other_keys_change_nothing(tmp_path: Path) -> None:
    """Routing, views and heartbeats never SCAN or KEYS, and a million
    unrelated keys in the same database do not slow a direct message."""
    cluster = Cluster(tmp_path, 2, redis_args=("--enable-debug-command", "yes"))
    try:
        r = redis.Redis(port=cluster.redis.port)
        target = await cluster.user(1, "eli")
        sid = target.session_id or ""

        async def round_trips(n: int) -> float:
            times = []
            for i in range(n):
                t0 = time.perf_counter()
                assert (await message(cluster, 0, sid, str(i)))[0] == 200
                times.append(time.perf_counter() - t0)
                await target.next("message")
            return sorted(times)[n // 2]

        before = await round_trips(30)
        r.execute_command("DEBUG", "POPULATE", 1_000_000, "junk")
        assert r.dbsize() > 1_000_000
        after = await round_trips(30)
        await everyone(cluster, 0)
        await cluster.http(0, "GET", "/api/admin/sessions?user_id=eli")
        await cluster.http(0, "GET", "/api/admin/metrics")
        await asyncio.sleep(1.0)  # heartbeats
        stats = r.info("commandstats")
        assert not [name for name in stats if name.endswith(("_scan", "_keys"))], stats
        assert after < max(3 * before, before + 0.005), (before, after)
        r.close()
    finally:
        await cluster.close()


async def test_only_the_origin_writes_delivery_state(cluster3: Cluster) -> None:
    """A user with plain sessions on nodes 1 and 2, sent notifications
    through node 0: node 0 marks them delivered; nodes 1 and 2 write
    nothing to the store, and no receipt echo goes from node to node
    when node 0 had a session of its own that got them."""
    one, two = await cluster3.user(1, "fox"), await cluster3.user(2, "fox")
    await asyncio.sleep(0.2)
    ids = []
    for i in range(10):
        _, body = await cluster3.http(
            0, "POST", "/api/notifications/fox", {"message": str(i)}, role="publisher"
        )
        ids.append(body["notification"]["id"])
    for client in (one, two):
        assert [(await client.next("notification"))["id"] for _ in ids] == ids
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = [
            (await cluster3.http(0, "GET", f"/api/users/fox/notifications/{nid}"))[1]["delivered"]
            for nid in ids
        ]
        if all(states):
            break
        await asyncio.sleep(0.1)
    assert all(states)
    writes = []
    for node in range(3):
        _, metrics = await cluster3.http(node, "GET", "/api/admin/metrics")
        writes.append(metrics["metrics"]["store_seconds"].get("mark_delivered", {}).get("count", 0))
    assert writes[0] >= 1 and writes[1:] == [0, 0], writes
    # With a session of its own on node 0, nothing comes back at all.
    r = redis.Redis(port=cluster3.redis.port)
    here = await cluster3.user(0, "fox")
    await asyncio.sleep(0.2)
    r.config_resetstat()
    for i in range(10):
        await cluster3.http(0, "POST", "/api/notifications/fox", {"message": f"b{i}"}, "publisher")
    for client in (here, one, two):
        for _ in range(10):
            await client.next("notification")
    await asyncio.sleep(0.3)
    publishes = int(r.info("commandstats").get("cmdstat_publish", {}).get("calls", 0))
    assert publishes == 10, publishes  # one per notification, no echoes
    r.close()


def test_the_cluster_view_follows_registers_closes_and_crashes(tmp_path: Path) -> None:
    """A Hypothesis state machine of registers, closes and kill -9s across 3
    nodes: every node's view (and direct messages) agree with the truth."""
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import (
        RuleBasedStateMachine,
        invariant,
        rule,
        run_state_machine_as_test,
    )

    loop = asyncio.new_event_loop()
    cluster = loop.run_until_complete(_make_cluster(tmp_path, 3))
    run = loop.run_until_complete

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[str, tuple[int, Client]] = {}
            self.dead: list[str] = []

        @rule(node=st.integers(0, 2), user=st.sampled_from(["p", "q", "r"]))
        def register(self, node: int, user: str) -> None:
            client = run(cluster.user(node, user))
            assert client.session_id is not None
            self.live[client.session_id] = (node, client)

        @rule(data=st.data())
        def close(self, data: st.DataObject) -> None:
            if self.live:
                sid = data.draw(st.sampled_from(sorted(self.live)))
                run(self.live.pop(sid)[1].close())
                self.dead.append(sid)

        @rule(node=st.integers(0, 2))
        def crash(self, node: int) -> None:
            cluster.nodes[node].kill()
            for sid, (where, client) in list(self.live.items()):
                if where == node:
                    del self.live[sid]
                    self.dead.append(sid)
                    run(client.close())
            cluster.nodes[node].start()

        @invariant()
        def views_agree(self) -> None:
            truth = set(self.live)
            deadline = time.monotonic() + TTL + 2
            while True:
                views = [
                    {s["session_id"] for s in run(everyone(cluster, n, 7))[0]} for n in range(3)
                ]
                if all(v == truth for v in views) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert views == [truth] * 3
            for sid in list(truth)[:3]:
                assert run(message(cluster, 0, sid, "hi"))[0] == 200
            for sid in self.dead[-3:]:
                # 404; or, while its crashed node is not yet known dead
                # (session_ttl), 503: nobody can say.
                deadline = time.monotonic() + TTL + 1.5
                while (status := run(message(cluster, 1, sid, "hi"))[0]) == 503:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                assert status == 404

        def teardown(self) -> None:
            for _, client in self.live.values():
                run(client.close())
            cluster.clients.clear()

    try:
        run_state_machine_as_test(  # type: ignore[no-untyped-call]
            Machine,
            settings=settings(
                max_examples=4,
                stateful_step_count=8,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
    finally:
        loop.run_until_complete(cluster.close())
        loop.close()


async def _make_cluster(tmp_path: Path, nodes: int) -> Cluster:
    return Cluster(tmp_path, nodes)


async def test_topics_across_nodes(cluster2: Cluster) -> None:  # noqa: F811
    """A publication through node 0 reaches subscribers on both nodes once;
    presence and join/leave are cluster-wide; a node without subscribers
    leaves the topic's channel."""

    async def subscriber(node: int, user: str, presence: bool = False) -> Client:
        client = await Client.connect(cluster2.nodes[node].ws)
        token = await cluster2.token(user, topics=["case:*"])
        await client.register(token, receipts=False)
        cluster2.clients.append(client)
        await client.subscribe("case:9", presence=presence)
        return client

    watcher = await subscriber(0, "lawyer", presence=True)
    far = await subscriber(1, "client")
    assert await watcher.next("join") == {
        "topic": "case:9",
        "user_id": "client",
        "session_id": far.session_id,
    }
    status, body = await cluster2.http(0, "POST", "/api/topics/case:9/publications", {"s": 1})
    assert status == 201
    for client in (watcher, far):
        assert (await client.next("publication"))["id"] == body["id"]
    _, presence = await cluster2.http(1, "GET", "/api/topics/case:9/presence")
    assert presence["count"] == 2 and {u["user_id"] for u in presence["users"]} == {
        "lawyer",
        "client",
    }
    r = redis.Redis(port=cluster2.redis.port)
    assert r.pubsub_numsub("rt:t:case:9") == [(b"rt:t:case:9", 2)]
    await far.close()
    assert (await watcher.next("leave"))["user_id"] == "client"
    await asyncio.sleep(0.2)
    assert r.pubsub_numsub("rt:t:case:9") == [(b"rt:t:case:9", 1)]
    _, presence = await cluster2.http(0, "GET", "/api/topics/case:9/presence")
    assert [u["user_id"] for u in presence["users"]] == ["lawyer"]
    r.close()
    await asyncio.sleep(0.1)
    assert watcher.pending() == []
