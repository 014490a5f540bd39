"""The whole server on the MongoDB backend (nx-27017 over a real socket): a
database outage during sends loses nothing, and shutdown flushes the buffer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rtserver.stores.mongodb import MongoStore

from .conftest import StartServer, make_config
from .mongo_support import NxServer, pymongo_orphan_sockets  # noqa: F401 (autouse)


def mongo_config(tmp_path: Path, nx: NxServer, **store: object):  # type: ignore[no-untyped-def]
    values: dict[str, object] = {
        "backend": "mongodb",
        "uri": nx.uri,
        "database": "rt",
        "retry_base": 0.05,
        "retry_max": 0.2,
        "server_selection_timeout": 0.5,
    }
    values.update(store)
    return make_config(tmp_path, store=values)


async def test_outage_during_sends_loses_nothing(start_server: StartServer, tmp_path: Path) -> None:
    """Kill the database a third of the way through 60 HTTP sends and restart it at
    two thirds: every send is accepted (201), delivered live in order, readiness
    says degraded meanwhile, and afterwards all 60 are stored exactly once."""
    nx = NxServer(tmp_path / "nx")
    nx.start()
    try:
        srv = await start_server(config=mongo_config(tmp_path, nx))
        client = await srv.user("res")
        token = srv.token("svc", "publisher")
        sent: list[str] = []
        ready_during_outage = None
        for i in range(60):
            if i == 20:
                nx.stop()
            if i == 40:
                ready_during_outage = await srv.http("GET", "/readyz")
                nx.start()
            status, body = await srv.http(
                "POST", "/api/notifications/res", {"message": f"m{i}"}, token=token
            )
            assert status == 201, body
            sent.append(body["notification"]["id"])
        received = [(await client.next("notification"))["id"] for _ in range(60)]
        assert received == sent
        assert ready_during_outage is not None
        assert ready_during_outage[0] == 503 and ready_during_outage[1]["store"] == "degraded"
        store = srv.hub.store
        assert isinstance(store, MongoStore)
        for _ in range(200):
            if store.buffered == 0 and (await srv.http("GET", "/readyz"))[0] == 200:
                break
            await asyncio.sleep(0.05)
        stored = await store.history("res", limit=500)
        assert sorted(n.id for n in stored) == sorted(sent)
        assert len(stored) == 60
    finally:
        nx.stop()


async def test_shutdown_flushes_buffered_writes(start_server: StartServer, tmp_path: Path) -> None:
    """Notifications buffered during an outage are written at shutdown, even
    before the retry loop's next attempt."""
    nx = NxServer(tmp_path / "nx")
    nx.start()
    try:
        srv = await start_server(config=mongo_config(tmp_path, nx, retry_base=30, retry_max=60))
        token = srv.token("svc", "publisher")
        nx.stop()
        for i in range(5):
            status, _ = await srv.http(
                "POST", "/api/notifications/later", {"message": f"m{i}"}, token=token
            )
            assert status == 201
        store = srv.hub.store
        assert isinstance(store, MongoStore) and store.buffered == 5
        nx.start()
        await srv.stop()
        check = MongoStore(srv.hub.config.store)
        await check.open()
        assert await check.unread_count("later") == 5
        await check.close()
    finally:
        nx.stop()


async def test_spool_full_answers_503(start_server: StartServer, tmp_path: Path) -> None:
    """With the database down and the spool full, the API answers 503 unavailable."""
    nx = NxServer(tmp_path / "nx")
    nx.start()
    try:
        srv = await start_server(config=mongo_config(tmp_path, nx, spool_max_bytes=4096))
        token = srv.token("svc", "publisher")
        nx.stop()
        big = {"message": "x", "pad": "p" * 1500}
        codes = [
            (await srv.http("POST", "/api/notifications/u", big, token=token))[0] for _ in range(3)
        ]
        status, body = await srv.http("POST", "/api/notifications/u", big, token=token)
        assert codes == [201, 201, 503]
        assert status == 503 and body["error"]["code"] == "unavailable"
        nx.start()
    finally:
        nx.stop()


async def test_not_stored_but_delivered_says_so(start_server: StartServer, tmp_path: Path) -> None:
    """A live session gets the push before the write; when the write is then
    refused (database down, spool full) the 503 says it was delivered live."""
    nx = NxServer(tmp_path / "nx")
    nx.start()
    try:
        srv = await start_server(config=mongo_config(tmp_path, nx, spool_max_bytes=4096))
        tab = await srv.user("u", receipts=False)
        token = srv.token("svc", "publisher")
        nx.stop()
        pad = "p" * 2500
        ok, _ = await srv.http(
            "POST", "/api/notifications/u", {"message": "kept", "pad": pad}, token=token
        )
        status, body = await srv.http(
            "POST", "/api/notifications/u", {"message": "live only", "pad": pad}, token=token
        )
        assert ok == 201 and status == 503
        assert body["error"]["code"] == "unavailable" and body["error"]["delivered"] == 1
        assert "not stored" in body["error"]["message"]
        assert [(await tab.next("notification"))["message"] for _ in range(2)] == [
            "kept",
            "live only",
        ]
        status, body = await srv.http(
            "POST",
            "/api/notifications",
            [{"user_id": "u", "notification": {"message": "batch", "pad": pad}}],
            token=token,
        )
        assert status == 503 and body["results"] == [
            {
                "error": {"code": "unavailable", "message": "not stored, but delivered live"},
                "delivered": 1,
            }
        ]
    finally:
        nx.stop()
