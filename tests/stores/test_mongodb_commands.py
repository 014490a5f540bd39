"""mockupdb (MongoDB's wire-protocol test server, as used by pymongo's own
tests) pins the exact commands the MongoDB backend sends: what nx-27017 cannot
show (index directions, partialFilterExpression, collMod, sort specs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mockupdb import MockupDB, Request

from rtserver.config import StoreConfig
from rtserver.stores.base import StoreError
from rtserver.stores.mongodb import MongoStore

from ..mongo_support import pymongo_orphan_sockets  # noqa: F401 (autouse)
from .suite import note, publication


@pytest.fixture
def mock() -> Iterator[MockupDB]:
    server = MockupDB(auto_ismaster={"maxWireVersion": 21}, verbose=False)
    server.run()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _spool_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's outage spool (``<data_dir>/mongodb-spool.db``, ``data/``
    by default) lands in the test's own directory."""
    monkeypatch.chdir(tmp_path)


def config(uri: str, **overrides: Any) -> StoreConfig:
    values: dict[str, Any] = {
        "backend": "mongodb",
        "uri": uri,
        "database": "rt",
        "retention_days": 30,
        "read_retention_days": 7,
    }
    values.update(overrides)
    return StoreConfig(**values)


async def receive(server: MockupDB) -> Request:
    request: Request = await asyncio.get_running_loop().run_in_executor(
        None, lambda: server.receives(timeout=10)
    )
    return request


async def answer_ok(server: MockupDB, count: int) -> list[dict[str, Any]]:
    """The next ``count`` commands, each answered ``ok``."""
    commands = []
    for _ in range(count):
        request = await receive(server)
        commands.append(command(request))
        request.ok()
    return commands


def command(request: Request) -> dict[str, Any]:
    """The command document without driver bookkeeping, as plain dicts."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return {
        k: plain(v)
        for k, v in request.doc.items()
        if k not in ("$db", "lsid", "$clusterTime", "$readPreference")
    }


# What listIndexes answers once the store's four indexes exist (30-day and
# 7-day retention).
EXISTING_INDEXES = (
    {"v": 2, "key": {"user_id": 1, "read": 1, "_id": -1}, "name": "user_read_id"},
    {"v": 2, "key": {"user_id": 1, "_id": 1}, "name": "user_undelivered_id"},
    {"v": 2, "key": {"created_at": 1}, "name": "created_ttl", "expireAfterSeconds": 30 * 86400},
    {"v": 2, "key": {"read_at": 1}, "name": "read_ttl", "expireAfterSeconds": 7 * 86400},
)


def cursor(*docs: dict[str, Any]) -> dict[str, Any]:
    return {"cursor": {"id": 0, "ns": "rt.notifications", "firstBatch": list(docs)}}


@pytest.fixture
async def opened(mock: MockupDB) -> AsyncIterator[MongoStore]:
    """A store whose open() saw all four indexes already present."""
    store = MongoStore(config(mock.uri))
    task = asyncio.ensure_future(store.open())
    (await receive(mock)).replies(
        cursor({"v": 2, "key": {"_id": 1}, "name": "_id_"}, *EXISTING_INDEXES)
    )
    await answer_ok(mock, 3)  # the idempotency keys' TTL index, the topic history's two
    await task
    yield store
    await store.spool.close()
    await store._client.close()


async def test_open_creates_the_indexes_exactly(mock: MockupDB) -> None:
    """createIndexes: keys with directions, TTLs and the partial filter."""
    store = MongoStore(config(mock.uri))
    task = asyncio.ensure_future(store.open())
    listing = await receive(mock)
    assert command(listing) == {"listIndexes": "notifications", "cursor": {}}
    listing.replies(cursor({"v": 2, "key": {"_id": 1}, "name": "_id_"}))
    created = await answer_ok(mock, 7)
    await task
    await store.spool.close()
    await store._client.close()
    assert created == [
        {
            "createIndexes": "notifications",
            "indexes": [{"name": "user_read_id", "key": {"user_id": 1, "read": 1, "_id": -1}}],
        },
        {
            "createIndexes": "notifications",
            "indexes": [
                {
                    "name": "user_undelivered_id",
                    "partialFilterExpression": {"delivered": False},
                    "key": {"user_id": 1, "_id": 1},
                }
            ],
        },
        {
            "createIndexes": "notifications",
            "indexes": [
                {"name": "created_ttl", "expireAfterSeconds": 2592000, "key": {"created_at": 1}}
            ],
        },
        {
            "createIndexes": "notifications",
            "indexes": [{"name": "read_ttl", "expireAfterSeconds": 604800, "key": {"read_at": 1}}],
        },
        {
            "createIndexes": "notifications_keys",
            "indexes": [{"name": "expires_ttl", "expireAfterSeconds": 0, "key": {"expires_at": 1}}],
        },
        {
            "createIndexes": "notifications_publications",
            "indexes": [{"name": "topic_id", "key": {"topic": 1, "_id": 1}}],
        },
        {
            "createIndexes": "notifications_publications",
            "indexes": [{"name": "expires_ttl", "expireAfterSeconds": 0, "key": {"expires_at": 1}}],
        },
    ]
    assert list(created[0]["indexes"][0]["key"].items()) == [
        ("user_id", 1),
        ("read", 1),
        ("_id", -1),
    ]


async def test_open_replaces_the_indexes_of_earlier_versions(mock: MockupDB) -> None:
    """Indexes whose pages sorted on created_at are dropped once the _id ones exist."""
    store = MongoStore(config(mock.uri))
    task = asyncio.ensure_future(store.open())
    (await receive(mock)).replies(
        cursor(
            {"v": 2, "key": {"_id": 1}, "name": "_id_"},
            {
                "v": 2,
                "key": {"user_id": 1, "read": 1, "created_at": -1},
                "name": "user_read_created",
            },
            {"v": 2, "key": {"user_id": 1, "created_at": 1}, "name": "user_undelivered"},
            *EXISTING_INDEXES[2:],
        )
    )
    sent = await answer_ok(mock, 5)
    await task
    await store.spool.close()
    await store._client.close()
    assert [next(iter(cmd.items())) for cmd in sent] == [
        ("createIndexes", "notifications"),
        ("createIndexes", "notifications"),
        ("dropIndexes", "notifications"),
        ("dropIndexes", "notifications"),
        ("createIndexes", "notifications_keys"),
    ]
    assert [cmd["indexes"][0]["name"] for cmd in sent[:2]] == [
        "user_read_id",
        "user_undelivered_id",
    ]
    assert [cmd["index"] for cmd in sent[2:4]] == ["user_read_created", "user_undelivered"]


async def test_changed_retention_uses_collmod(mock: MockupDB) -> None:
    """An existing TTL index with another expireAfterSeconds is changed with collMod."""
    store = MongoStore(config(mock.uri, retention_days=10))
    task = asyncio.ensure_future(store.open())
    (await receive(mock)).replies(cursor(*EXISTING_INDEXES))
    request = await receive(mock)
    assert command(request) == {
        "collMod": "notifications",
        "index": {"keyPattern": {"created_at": 1}, "expireAfterSeconds": 864000},
    }
    request.ok()
    await answer_ok(mock, 3)  # the idempotency keys' TTL index, the topic history's two
    await task
    await store.spool.close()
    await store._client.close()


async def test_unread_history_find(opened: MongoStore, mock: MockupDB) -> None:
    """Unread history: filter on the index prefix, newest first, bounded."""
    task = asyncio.ensure_future(opened.history("u", unread_only=True, limit=20, before="01a2"))
    request = await receive(mock)
    assert command(request) == {
        "find": "notifications",
        "filter": {"user_id": "u", "read": False, "_id": {"$lt": "01a2"}},
        "sort": {"_id": -1},
        "limit": 20,
    }
    request.replies(cursor())
    assert await task == []


async def test_full_history_names_both_read_values(opened: MongoStore, mock: MockupDB) -> None:
    """Full history uses read $in [false, true] so the compound index serves the sort."""
    task = asyncio.ensure_future(opened.history("u", limit=9999))
    request = await receive(mock)
    assert command(request)["filter"] == {"user_id": "u", "read": {"$in": [False, True]}}
    assert command(request)["limit"] == 500
    request.replies(cursor())
    await task


async def test_mark_read_is_one_conditional_update_then_a_count(
    opened: MongoStore, mock: MockupDB
) -> None:
    """mark_read: update_many guarded by read=false (no read-modify-write), then count."""
    task = asyncio.ensure_future(opened.mark_read("u", ["a", "b"], 1_800_000_000.0))
    update = await receive(mock)
    cmd = command(update)
    assert cmd["update"] == "notifications"
    (stmt,) = cmd["updates"]
    assert stmt["q"] == {"user_id": "u", "read": False, "_id": {"$in": ["a", "b"]}}
    assert stmt["multi"] is True
    assert (
        stmt["u"]["$set"]["read"] is True
        and stmt["u"]["$set"]["read_at"].timestamp() == 1_800_000_000.0
    )
    update.replies({"ok": 1, "n": 2, "nModified": 2})
    count = await receive(mock)
    assert command(count)["aggregate"] == "notifications"
    assert command(count)["pipeline"] == [
        {"$match": {"user_id": "u", "read": False}},
        {"$group": {"_id": 1, "n": {"$sum": 1}}},
    ]
    count.replies(cursor({"_id": 1, "n": 3}))
    assert await task == (2, 3)


async def test_offline_delivery_find(opened: MongoStore, mock: MockupDB) -> None:
    """Offline delivery reads the partial index's set, oldest first, after a cursor."""
    task = asyncio.ensure_future(opened.undelivered("u", after="x", limit=100))
    request = await receive(mock)
    assert command(request) == {
        "find": "notifications",
        "filter": {"user_id": "u", "delivered": False, "_id": {"$gt": "x"}},
        "sort": {"_id": 1},
        "limit": 100,
    }
    request.replies(cursor())
    await task


async def test_mark_delivered_sets_first_time_only(opened: MongoStore, mock: MockupDB) -> None:
    """mark_delivered only touches documents not yet delivered."""
    task = asyncio.ensure_future(opened.mark_delivered(["a"], 1_800_000_000.0))
    request = await receive(mock)
    (stmt,) = command(request)["updates"]
    assert stmt["q"] == {"_id": {"$in": ["a"]}, "delivered": False}
    assert stmt["u"]["$set"]["delivered"] is True
    request.replies({"ok": 1, "n": 1, "nModified": 1})
    await task


async def test_insert_many_is_one_unordered_insert(opened: MongoStore, mock: MockupDB) -> None:
    """A batch is one unordered insert command; a duplicate key (an earlier
    try landed) counts as stored, any other write error is that item's."""
    notes = [note("u", str(i)) for i in range(3)]
    task = asyncio.ensure_future(opened.insert_many(notes))
    request = await receive(mock)
    cmd = command(request)
    assert cmd["insert"] == "notifications" and cmd["ordered"] is False
    assert [d["_id"] for d in cmd["documents"]] == [n.id for n in notes]
    request.replies(
        {
            "ok": 1,
            "n": 1,
            "writeErrors": [
                {"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"},
                {"index": 2, "code": 121, "errmsg": "Document failed validation"},
            ],
        }
    )
    results = await task
    assert results[:2] == [None, None]
    assert isinstance(results[2], StoreError) and "validation" in str(results[2])


async def test_a_publication_is_an_insert_then_one_trim(opened: MongoStore, mock: MockupDB) -> None:
    """Topic history: the insert (data kept as the bytes published), the
    newest-but-``keep`` lookup on the topic's index, and when one is beyond,
    one delete of the older ones and a ``$max`` of the trimmed id."""
    pub = publication("case:1", b'{"big": 18446744073709551616}')
    task = asyncio.ensure_future(opened.insert_publication(pub, keep=100))
    request = await receive(mock)
    cmd = command(request)
    assert cmd["insert"] == "notifications_publications"
    (doc,) = cmd["documents"]
    assert doc["_id"] == pub.id and doc["topic"] == "case:1" and bytes(doc["data"]) == pub.data
    request.replies({"ok": 1, "n": 1})
    request = await receive(mock)
    cmd = command(request)
    assert (cmd["find"], cmd["filter"], cmd["sort"], cmd["skip"], cmd["limit"]) == (
        "notifications_publications",
        {"topic": "case:1"},
        {"_id": -1},
        100,
        1,
    )
    assert cmd["projection"] == {"_id": 1}
    request.replies(
        {"cursor": {"id": 0, "ns": "rt.notifications_publications", "firstBatch": [{"_id": "old"}]}}
    )
    request = await receive(mock)
    assert command(request)["deletes"] == [
        {"q": {"topic": "case:1", "_id": {"$lte": "old"}}, "limit": 0}
    ]
    request.replies({"ok": 1, "n": 1})
    request = await receive(mock)
    cmd = command(request)
    assert cmd["update"] == "notifications_topic_trims"
    assert cmd["updates"] == [
        {"q": {"_id": "case:1"}, "u": {"$max": {"trimmed": "old"}}, "multi": False, "upsert": True}
    ]
    request.replies({"ok": 1, "n": 1})
    await task


async def test_a_server_that_stops_answering_is_an_outage(mock: MockupDB) -> None:
    """An insert whose answer never comes waits ``store.operation_timeout``,
    then is spooled like any other during an outage (not a hung request)."""
    store = MongoStore(config(mock.uri, operation_timeout=0.5))
    task = asyncio.ensure_future(store.open())
    (await receive(mock)).replies(
        cursor({"v": 2, "key": {"_id": 1}, "name": "_id_"}, *EXISTING_INDEXES)
    )
    await answer_ok(mock, 3)
    await task
    try:
        sent = asyncio.ensure_future(store.insert_many([note("u", "silence")]))
        request = await receive(mock)  # received, and never answered
        assert command(request)["insert"] == "notifications"
        assert await asyncio.wait_for(sent, 5) == [None]
        assert store.buffered == 1
    finally:
        await store.spool.close()
        await store._client.close()
