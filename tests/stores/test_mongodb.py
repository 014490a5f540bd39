"""The store suite on the MongoDB backend, in three honest layers.

1. ``TestMongoStoreOnNx``: the real driver over a real socket against nx-27017,
   a MongoDB wire-protocol server on SQLite. It does not keep index direction or
   partialFilterExpression, never runs a TTL monitor, and its ``explain`` shows
   SQLite plans, so what depends on those is checked in layers 2 and 3.
2. ``tests/stores/test_mongodb_commands.py``: mockupdb pins the exact commands
   (createIndexes, collMod, find, update, aggregate) the backend sends.
3. ``TestMongoStoreOnRealMongoDB``: the same suite, plus TTL expiry and
   ``explain``, against a real MongoDB whenever RTSERVER_TEST_MONGODB_URI is set.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rtserver.config import StoreConfig
from rtserver.stores.mongodb import (
    ANY_READ,
    NEWEST_FIRST,
    OLDEST_FIRST,
    MongoStore,
    from_document,
    redact,
    to_document,
)

from ..mongo_support import NxServer, pymongo_orphan_sockets  # noqa: F401 (autouse)
from .suite import StoreSuite, note

REAL_URI = os.environ.get("RTSERVER_TEST_MONGODB_URI")


@pytest.fixture(autouse=True)
def _spool_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's outage spool (``<data_dir>/mongodb-spool.db``, ``data/``
    by default) lands in the test's own directory."""
    monkeypatch.chdir(tmp_path)


def store_config(uri: str, **overrides: object) -> StoreConfig:
    values: dict[str, object] = {
        "backend": "mongodb",
        "uri": uri,
        "database": f"rt_{uuid.uuid4().hex[:8]}",
        "retry_base": 0.05,
        "retry_max": 0.3,
        "server_selection_timeout": 1.0,
    }
    values.update(overrides)
    return StoreConfig(**values)  # type: ignore[arg-type]


def stages(plan: object) -> set[str]:
    """Every stage named in an explain plan, however nested (classic or SBE)."""
    if isinstance(plan, dict):
        found = {plan["stage"]} if isinstance(plan.get("stage"), str) else set()
        return found.union(*(stages(v) for v in plan.values()))
    if isinstance(plan, list):
        return set().union(*(stages(v) for v in plan))
    return set()


class TestMongoStoreOnNx(StoreSuite):
    @pytest.fixture
    async def store(self, nx: NxServer) -> AsyncIterator[MongoStore]:
        s = MongoStore(store_config(nx.uri))
        await s.open()
        yield s
        await s._client.drop_database(s.config.database)
        await s.close()

    async def test_indexes_are_created_idempotently(self, nx: NxServer) -> None:
        """open() twice creates the indexes once (keys checked; nx-27017 drops
        direction, names and partialFilterExpression, which mockupdb pins)."""
        cfg = store_config(nx.uri)
        for _ in range(2):
            s = MongoStore(cfg)
            await s.open()
            keys = [list(ix["key"]) async for ix in await s._coll.list_indexes()]
            await s.close()
        assert ["user_id", "read", "_id"] in keys and ["user_id", "_id"] in keys
        assert ["created_at"] in keys and ["read_at"] in keys
        assert len(keys) == 5  # _id plus our four

    async def test_ttl_index_declared_and_sweep_removes_due(self, nx: NxServer) -> None:
        """The TTL index carries the configured expireAfterSeconds, and the cleanup
        sweep removes what is due while a fresh notification stays. (nx-27017
        purges TTL only when its per-collection TTL cache is fresh, so the TTL
        monitor itself is checked against real MongoDB in the layer below.)"""
        # A collection name of its own: nx-27017 keys TTL options by index name,
        # which it derives from the collection name alone.
        cfg = store_config(
            nx.uri, retention_days=1, read_retention_days=None, collection="ttl_check"
        )
        s = MongoStore(cfg)
        await s.open()
        try:
            ttls = {
                tuple(ix["key"]): ix.get("expireAfterSeconds")
                async for ix in await s._coll.list_indexes()
            }
            assert ttls[("created_at",)] == 86400
            old, fresh = note("ttl", created_at=time.time() - 3 * 86400), note("ttl")
            await s.insert(old)
            await s.insert(fresh)
            await s.purge(time.time(), 86400, None)
            assert [n.id for n in await s.history("ttl")] == [fresh.id]
        finally:
            await s._client.drop_database(s.config.database)
            await s.close()

    async def test_unreachable_at_startup_buffers_then_flushes(self, tmp_path: Path) -> None:
        """With the server down at start-up, inserts are buffered, readiness says
        not ready, and everything is written once the server comes up."""
        server = NxServer(tmp_path / "late")
        s = MongoStore(store_config(server.uri))
        await s.open()
        notes = [note("late", str(i)) for i in range(5)]
        for n in notes:
            await s.insert(n)
        assert s.buffered == 5 and await s.ping() is False
        server.start()
        try:
            for _ in range(200):
                if s.buffered == 0 and await s.ping():
                    break
                await asyncio.sleep(0.05)
            assert await s.unread_count("late") == 5
        finally:
            await s.close()
            server.stop()

    async def test_delivery_marks_in_an_outage_reach_mongodb_after_it(self, tmp_path: Path) -> None:
        """Delivered and undelivered marks taken while MongoDB is down land
        on the spooled rows and on rows MongoDB already holds, in the order
        they were taken, once it is back."""
        server = NxServer(tmp_path / "marks")
        server.start()
        s = MongoStore(store_config(server.uri, server_selection_timeout=0.3))
        await s.open()
        try:
            held = [note("m", f"held {i}") for i in range(2)]
            for n in held:
                await s.insert(n)
            await s.mark_delivered([n.id for n in held], time.time())
            server.stop()
            spooled = [note("m", f"spooled {i}") for i in range(2)]
            for n in spooled:
                await s.insert(n)
            await s.mark_delivered([n.id for n in spooled], time.time())
            await s.mark_undelivered("m", [held[1].id, spooled[0].id])
            server.start()
            for _ in range(200):
                if s.buffered == 0 and await s.ping():
                    break
                await asyncio.sleep(0.05)
            assert [n.id for n in await s.undelivered("m")] == [held[1].id, spooled[0].id]
        finally:
            await s.close()
            server.stop()

    async def test_spool_full_refuses_instead_of_dropping(self, tmp_path: Path) -> None:
        """Once the spool holds ``spool_max_bytes``, insert raises StoreError:
        never a silent drop; what was spooled stays, on disk."""
        from rtserver.stores.base import StoreError

        server = NxServer(tmp_path / "never")
        s = MongoStore(store_config(server.uri, spool_max_bytes=4096))
        await s.open()
        big = "x" * 1000
        for _ in range(3):
            await s.insert(note("x", big))
        with pytest.raises(StoreError, match="spool is full"):
            await s.insert(note("x", big))
        assert s.buffered == 3
        await s.close()
        again = MongoStore(store_config(server.uri))
        await again.spool.open()
        assert again.spool.count == 3
        await again.spool.close()
        await again._client.close()


class TestDocuments:
    def test_document_round_trip(self) -> None:
        """A notification survives to_document/from_document; dates are BSON dates."""
        n = note("u", "m", form_id=1)
        n.read, n.read_at, n.delivered_at = True, n.created_at + 1, n.created_at + 0.5
        doc = to_document(n)
        assert doc["_id"] == n.id and doc["delivered"] is True
        back = from_document(doc)
        assert (back.id, back.extra, back.read) == (n.id, {"form_id": 1}, True)
        assert back.read_at is not None and abs(back.read_at - n.read_at) < 0.002

    def test_credentials_are_redacted(self) -> None:
        """Errors and logs never show the URI's user and password."""
        text = "cannot reach mongodb://admin:hunter2@db.internal:27017/rt"
        assert redact(text) == "cannot reach mongodb://***@db.internal:27017/rt"
        assert "hunter2" not in redact("mongodb+srv://u:hunter2@cluster0.example.net")


@pytest.mark.skipif(
    not REAL_URI, reason="set RTSERVER_TEST_MONGODB_URI to run against a real MongoDB"
)
class TestMongoStoreOnRealMongoDB(StoreSuite):
    @pytest.fixture
    async def store(self) -> AsyncIterator[MongoStore]:
        assert REAL_URI
        s = MongoStore(store_config(REAL_URI))
        await s.open()
        yield s
        await s._client.drop_database(s.config.database)
        await s.close()

    async def test_pages_are_read_along_the_indexes(self, store: MongoStore) -> None:
        """explain: unread lists, history and offline delivery use their index
        and no blocking SORT stage (full history is a SORT_MERGE of the two
        read values)."""
        for _ in range(3):
            await store.insert(note("ex"))
        finds = [
            ({"user_id": "ex", "read": False}, NEWEST_FIRST, "user_read_id"),
            ({"user_id": "ex", "read": ANY_READ}, NEWEST_FIRST, "user_read_id"),
            (
                {"user_id": "ex", "read": ANY_READ, "_id": {"$gt": "0"}},
                OLDEST_FIRST,
                "user_read_id",
            ),
            ({"user_id": "ex", "delivered": False}, OLDEST_FIRST, "user_undelivered_id"),
        ]
        for query, sort, index in finds:
            plan = (await store._coll.find(query).sort(sort).limit(5).explain())["queryPlanner"]
            assert index in str(plan["winningPlan"]), (query, plan)
            assert "SORT" not in stages(plan["winningPlan"]), (query, plan)

    async def test_ttl_monitor_removes_expired(self) -> None:
        """A real TTL index removes expired documents (the monitor runs about every 60 s)."""
        assert REAL_URI
        s = MongoStore(store_config(REAL_URI, retention_days=1 / 86400))
        await s.open()
        try:
            await s.insert(note("ttl", created_at=time.time() - 3600))
            for _ in range(150):
                if await s._coll.count_documents({"user_id": "ttl"}) == 0:
                    break
                await asyncio.sleep(1)
            assert await s._coll.count_documents({"user_id": "ttl"}) == 0
        finally:
            await s._client.drop_database(s.config.database)
            await s.close()
