"""Topics against a real server and real clients: grants and the hook,
subscribe / unsubscribe / publish / presence, join and leave, history and
recovery (after a disconnect, after a restart, and while publications keep
coming), limits, and the HTTP routes."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rtserver.client import Client, ClientError
from rtserver.plugins import hookimpl

from .conftest import Running, StartServer
from .test_run import RUN, write_config


async def member(server: Running, user: str, **grants: Any) -> Client:
    client = await server.connect()
    await client.register(server.token(user, **grants), receipts=False)
    return client


async def test_grants_exact_and_wildcard_and_forbidden_for_the_rest(server: Running) -> None:
    ann = await member(server, "ann", topics=["case:881", "thread:*"], publish_topics=["thread:*"])
    assert (await ann.subscribe("case:881"))["topic"] == "case:881"
    assert (await ann.subscribe("thread:42"))["topic"] == "thread:42"
    for topic in ("case:882", "case:8811", "threads:1"):
        with pytest.raises(ClientError) as err:
            await ann.subscribe(topic)
        assert err.value.code == "forbidden" and topic in err.value.message
    assert len(await ann.publish("thread:42", {"typing": True})) == 24
    with pytest.raises(ClientError) as err:
        await ann.publish("case:881", {"status": "closed"})  # may read, not publish
    assert err.value.code == "forbidden"
    nobody = await member(server, "bob")
    with pytest.raises(ClientError) as err:
        await nobody.subscribe("case:881")
    assert err.value.code == "forbidden"
    admin = await server.connect()
    await admin.register(server.token("root", "admin"), receipts=False)
    assert (await admin.subscribe("anything:at-all"))["topic"] == "anything:at-all"


async def test_the_hook_overrides_the_grants(start_server: StartServer) -> None:
    class Cases:
        @hookimpl
        def rtserver_authorize_topic(self, connection: Any, topic: str, action: str) -> Any:
            if topic == "case:secret":
                return False  # even for admins
            if topic.startswith("case:") and action == "subscribe":
                return connection.user_id == "lawyer"
            return None

    server = await start_server(extra_plugins=[("cases", Cases())])
    lawyer = await member(server, "lawyer")
    assert (await lawyer.subscribe("case:1"))["topic"] == "case:1"  # no grant needed
    client = await member(server, "client", topics=["case:*"])
    with pytest.raises(ClientError) as err:
        await client.subscribe("case:1")  # granted, but the hook says no
    assert err.value.code == "forbidden"
    with pytest.raises(ClientError):
        await client.subscribe("news:1")  # the hook leaves it to the grants: none
    admin = await server.connect()
    await admin.register(server.token("root", "admin"), receipts=False)
    with pytest.raises(ClientError):
        await admin.subscribe("case:secret")


async def test_publish_reaches_subscribers_until_they_unsubscribe(server: Running) -> None:
    grants = {"topics": ["case:*"], "publish_topics": ["case:*"]}
    a, b = await member(server, "a", **grants), await member(server, "b", **grants)
    await a.subscribe("case:1")
    await b.subscribe("case:1")
    pid = await a.publish("case:1", {"status": "filed"})
    for client in (a, b):
        got = await client.next("publication")
        assert got["topic"] == "case:1" and got["id"] == pid
        assert got["data"] == {"status": "filed"} and got["publisher"] == "a"
        assert got["created_at"].endswith("Z")
    assert await b.unsubscribe("case:1") == {"topic": "case:1"}
    status, body = await server.http(
        "POST",
        "/api/topics/case:1/publications",
        ["any", "json", 1.5],
        token=server.token("svc", "publisher"),
    )
    assert status == 201 and body["delivered"] == 1
    assert (await a.next("publication"))["data"] == ["any", "json", 1.5]
    await asyncio.sleep(0.1)
    assert b.pending() == []
    with pytest.raises(ClientError) as err:
        await b.unsubscribe("case:1")
    assert err.value.code == "bad_request"


async def test_bad_names_and_limits(start_server: StartServer) -> None:
    server = await start_server(limits={"max_subscriptions_per_connection": 3})
    admin = await server.connect()
    await admin.register(server.token("root", "admin"), receipts=False)
    for bad in ("", "a b", "x" * 201, "ünï", "a/b", 7):
        with pytest.raises(ClientError) as err:
            await admin.request("subscribe", {"topic": bad})
        assert err.value.code == "bad_request"
    for i in range(3):
        await admin.subscribe(f"t:{i}")
    with pytest.raises(ClientError) as err:
        await admin.subscribe("t:3")
    assert "max_subscriptions_per_connection" in err.value.message
    with pytest.raises(ClientError) as err:
        await admin.subscribe("t:0")
    assert "already subscribed" in err.value.message
    with pytest.raises(ClientError) as err:
        await admin.publish("t:0", {"x": "y" * 20_000})
    assert err.value.code == "too_large"
    with pytest.raises(ClientError) as err:
        await admin.subscribe("t:9", last_id="not-an-id")
    await admin.unsubscribe("t:0")
    with pytest.raises(ClientError) as err:
        await admin.subscribe("t:0", last_id="nope")
    assert err.value.code == "bad_request"
    publisher = server.token("svc", "publisher")
    status, body = await server.http("POST", "/api/topics/a%20b/publications", {}, token=publisher)
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, _ = await server.http(
        "POST", "/api/topics/ok/publications", {}, token=server.token("u")
    )
    assert status == 403


async def test_join_and_leave_go_to_those_who_asked(server: Running) -> None:
    grants = {"topics": ["room:*"]}
    watcher = await member(server, "w", **grants)
    quiet = await member(server, "q", **grants)
    await watcher.subscribe("room:1", presence=True)
    await quiet.subscribe("room:1")
    joined = await watcher.next("join")
    assert joined == {"topic": "room:1", "user_id": "q", "session_id": quiet.session_id}
    presence = await watcher.presence("room:1")
    assert presence == {
        "topic": "room:1",
        "users": [
            {"user_id": "q", "sessions": [quiet.session_id]},
            {"user_id": "w", "sessions": [watcher.session_id]},
        ],
        "count": 2,
    }
    await quiet.close()
    assert await watcher.next("leave") == {
        "topic": "room:1",
        "user_id": "q",
        "session_id": quiet.session_id,
    }
    status, body = await server.http(
        "GET", "/api/topics/room:1/presence", token=server.token("svc", "publisher")
    )
    assert status == 200 and body["count"] == 1
    other = await member(server, "o")
    with pytest.raises(ClientError) as err:
        await other.presence("room:1")  # no grant: no peeking either
    assert err.value.code == "forbidden"


async def test_recovery_after_a_disconnect(server: Running) -> None:
    grants = {"topics": ["case:*"]}
    first = await member(server, "ann", **grants)
    await first.subscribe("case:7")
    ids = [(await server.hub.publish("case:7", {"n": i})).id for i in range(3)]
    assert [(await first.next("publication"))["id"] for _ in ids] == ids
    last_seen = first.topics["case:7"]
    await first.close()
    missed = [(await server.hub.publish("case:7", {"n": i})).id for i in range(3, 6)]
    again = await member(server, "ann", **grants)
    ack = await again.resubscribe({"case:7": last_seen})
    assert ack["case:7"]["recovered"] is True
    assert [(await again.next("publication"))["id"] for _ in missed] == missed
    await asyncio.sleep(0.1)
    assert again.pending() == []
    history = await server.hub.topic_history("case:7", after=ids[0])
    assert [p["id"] for p in history] == ids[1:] + missed
    _, body = await server.http(
        "GET",
        f"/api/topics/case:7/publications?after={missed[0]}&limit=1",
        token=server.token("svc", "publisher"),
    )
    assert [p["id"] for p in body["publications"]] == [missed[1]]


async def test_a_subscription_that_saw_nothing_resumes_from_its_start(server: Running) -> None:
    """The ack's position: a session that got nothing before it dropped
    resumes from when it subscribed, and gets what came meanwhile."""
    before = (await server.hub.publish("quiet", {"old": True})).id
    first = await member(server, "z", topics=["quiet"])
    await first.subscribe("quiet")
    resume = first.topics["quiet"]
    assert resume is not None and resume > before
    await first.close()
    missed = (await server.hub.publish("quiet", {"new": True})).id
    again = await member(server, "z", topics=["quiet"])
    await again.resubscribe({"quiet": resume})
    assert (await again.next("publication"))["id"] == missed
    await asyncio.sleep(0.1)
    assert again.pending() == []


async def test_recovery_while_publications_keep_coming(server: Running) -> None:
    """Publications go on (200 of them) while a session resubscribes from the
    middle: it gets every one after its last id once, in order."""
    grants = {"topics": ["busy"]}
    ids: list[str] = []

    async def keep_publishing() -> None:
        for i in range(200):
            ids.append((await server.hub.publish("busy", {"n": i})).id)
            if i % 10 == 0:
                await asyncio.sleep(0)

    for i in range(20):
        ids.append((await server.hub.publish("busy", {"n": -i})).id)
    resume_from = ids[9]
    client = await member(server, "r", **grants)
    publishing = asyncio.ensure_future(keep_publishing())
    await asyncio.sleep(0)
    ack = await client.subscribe("busy", last_id=resume_from)
    assert ack["recovered"] is True and ack["position"] > resume_from
    await publishing
    want = ids[10:]
    got = [(await client.next("publication"))["id"] for _ in want]
    assert got == want
    await asyncio.sleep(0.1)
    assert client.pending() == []


async def test_recovery_says_false_past_the_kept_history(start_server: StartServer) -> None:
    server = await start_server(topics={"history_size": 5})
    ids = [(await server.hub.publish("small", i)).id for i in range(8)]
    client = await member(server, "s", topics=["small"])
    ack = await client.subscribe("small", last_id=ids[0])
    assert ack["recovered"] is False
    assert [(await client.next("publication"))["id"] for _ in range(5)] == ids[3:]
    other = await member(server, "t", topics=["small"])
    assert (await other.subscribe("small", last_id=ids[2]))["recovered"] is True


async def test_an_idempotency_key_publishes_once(server: Running) -> None:
    client = await member(server, "k", topics=["orders"])
    await client.subscribe("orders")
    publisher = server.token("svc", "publisher")
    key = {"Idempotency-Key": "order-1-shipped"}
    answers = [
        await server.http(
            "POST", "/api/topics/orders/publications", {"shipped": 1}, token=publisher, headers=key
        )
        for _ in range(3)
    ]
    assert {body["id"] for _, body in answers} == {answers[0][1]["id"]}
    assert (await client.next("publication"))["id"] == answers[0][1]["id"]
    await asyncio.sleep(0.1)
    assert client.pending() == []
    assert len(await server.hub.topic_history("orders")) == 1


async def test_history_and_recovery_survive_a_restart(tmp_path: Path) -> None:
    """Publications are in the store: a real run.py killed (-9) and started
    again still recovers them."""
    from .processes import ServerProcess

    cfg = write_config(tmp_path, "")
    node = ServerProcess(cfg)
    node.start()
    try:
        from tornado.httpclient import AsyncHTTPClient

        async def http(method: str, path: str, body: Any = None) -> Any:
            import json

            token = await mint("svc", "publisher")
            resp = await AsyncHTTPClient().fetch(
                node.base + path,
                method=method,
                body=None if body is None else json.dumps(body),
                headers={"Authorization": f"Bearer {token}"},
            )
            return json.loads(resp.body)

        async def mint(user: str, role: str = "user") -> str:
            proc = await asyncio.create_subprocess_exec(
                *RUN,
                "token",
                user,
                "--role",
                role,
                "--topics",
                "log:*",
                "--config",
                str(cfg),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            return out.decode().strip()

        first = (await http("POST", "/api/topics/log:1/publications", {"n": 1}))["id"]
        later = [
            (await http("POST", "/api/topics/log:1/publications", {"n": n}))["id"] for n in (2, 3)
        ]
        node.kill()
        node.start()
        client = await Client.connect(node.ws)
        await client.register(await mint("reader"), receipts=False)
        assert (await client.subscribe("log:1", last_id=first))["recovered"] is True
        assert [(await client.next("publication"))["id"] for _ in later] == later
        await client.close()
    finally:
        node.kill()


def test_run_token_mints_grants(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "")
    out = subprocess.run(
        [
            *RUN,
            "token",
            "ann",
            "--topics",
            "case:881,thread:*",
            "--publish-topics",
            "thread:*",
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    import jwt

    claims = jwt.decode(out.stdout.strip(), options={"verify_signature": False})
    assert claims["topics"] == ["case:881", "thread:*"]
    assert claims["publish_topics"] == ["thread:*"]
