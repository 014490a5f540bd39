"""MongoDB store through pymongo's native async API (``AsyncMongoClient``).

Documents: ``_id`` is the notification id (time-ordered, so a retried insert
that already landed is recognised by its duplicate key). ``created_at`` and
``read_at`` are BSON dates so TTL indexes can expire them.

Indexes (created idempotently at ``open``; see docs/operations.md):

- ``user_read_id``: ``{user_id: 1, read: 1, _id: -1}``: unread lists, unread
  counts and history, in id order;
- ``user_undelivered_id``: ``{user_id: 1, _id: 1}``, partial on
  ``{delivered: false}``: offline delivery;
- ``created_ttl``: ``{created_at: 1}``, ``expireAfterSeconds`` = retention;
- ``read_ttl``: ``{read_at: 1}``, ``expireAfterSeconds`` = read retention (only
  read notifications have ``read_at``, so unread ones never expire early).

A changed retention is applied with ``collMod``, not by failing at start-up.
Indexes made by earlier versions (``user_read_created``, ``user_undelivered``)
are dropped once their replacements exist.

Resilience: when MongoDB cannot be reached (at start-up or later) inserts go to
a bounded in-memory buffer and a background task retries with exponential
backoff and full jitter, flushing on recovery and at ``close``. Live delivery
is unaffected; ``ping`` reports False (readiness says degraded); when the
buffer is full ``insert`` raises ``StoreError`` (HTTP 503) so nothing accepted
is ever dropped silently.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import BulkWriteError, ConnectionFailure, DuplicateKeyError, PyMongoError

from rtserver.backoff import Backoff
from rtserver.config import StoreConfig
from rtserver.log import get_logger
from rtserver.protocol import Notification
from rtserver.stores.base import MAX_PAGE, Store, StoreError

log = get_logger("rtserver.store")

DUPLICATE_KEY = 11000
_CREDENTIALS = re.compile(r"(mongodb(?:\+srv)?://)[^@/\s]+@")


def redact(text: str) -> str:
    """Remove ``user:password@`` from any MongoDB URI inside ``text``."""
    return _CREDENTIALS.sub(r"\1***@", text)


def _date(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _ts(value: Any) -> float | None:
    """A stored date back to epoch seconds. Naive datetimes are UTC (pymongo's
    default); strings are accepted because nx-27017 stores ``$set`` dates so."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return aware.timestamp()
    return float(value)


def to_document(n: Notification) -> dict[str, Any]:
    return {
        "_id": n.id,
        "user_id": n.user_id,
        "message": n.message,
        "type": n.type,
        "extra": n.extra,
        "created_at": _date(n.created_at),
        "read": n.read,
        "delivered": n.delivered_at is not None,
        **({"read_at": _date(n.read_at)} if n.read_at is not None else {}),
        **({"delivered_at": _date(n.delivered_at)} if n.delivered_at is not None else {}),
    }


def from_document(doc: Mapping[str, Any]) -> Notification:
    created = _ts(doc["created_at"])
    assert created is not None
    return Notification(
        id=doc["_id"],
        user_id=doc["user_id"],
        message=doc["message"],
        type=doc.get("type", "info"),
        created_at=created,
        read=bool(doc.get("read")),
        read_at=_ts(doc.get("read_at")),
        delivered_at=_ts(doc.get("delivered_at")),
        extra=dict(doc.get("extra") or {}),
    )


# Pages are in id order, as on SQLite: ids begin with their creation
# millisecond, and "_id < before" pages exactly, ties within a millisecond
# included. The indexes end in _id so that MongoDB reads a page along them; a
# sort on a key the index lacks is a blocking sort of every matching document.
NEWEST_FIRST = [("_id", -1)]
OLDEST_FIRST = [("_id", 1)]
# Naming both values of the index's second key lets MongoDB walk user_read_id
# for a user's whole history (merging the two ranges in _id order, SORT_MERGE)
# instead of sorting in memory.
ANY_READ = {"$in": [False, True]}
# Made by earlier versions, whose pages sorted on created_at then _id; the
# second key was not in them, so every page sorted all of a user's documents.
OBSOLETE_INDEXES = ("user_read_created", "user_undelivered")


class MongoStore(Store):
    name = "mongodb"

    def __init__(self, config: StoreConfig, client: AsyncMongoClient[Any] | None = None) -> None:
        if not config.uri and client is None:
            raise StoreError("store.uri is required for the mongodb backend")
        self.config = config
        self._client: AsyncMongoClient[Any] = client or AsyncMongoClient(
            config.uri,
            serverSelectionTimeoutMS=int(config.server_selection_timeout * 1000),
            connectTimeoutMS=int(config.server_selection_timeout * 1000),
            tz_aware=True,
            appname="rtserver",
        )
        self._coll = self._client[config.database][config.collection]
        self._buffer: dict[str, dict[str, Any]] = {}
        self._delivered: dict[str, datetime] = {}
        self._indexes_ready = False
        self._degraded = False
        self._retry_task: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle --------------------------------------------------------

    async def open(self) -> None:
        try:
            await self.ensure_indexes()
        except ConnectionFailure as err:
            log.warning("store.unreachable", backend=self.name, error=redact(str(err)))
            self._degrade()

    async def ensure_indexes(self) -> None:
        """Create the indexes, or bring TTLs in line with the config (collMod)."""
        cfg = self.config
        wanted: list[tuple[str, list[tuple[str, int]], dict[str, Any]]] = [
            ("user_read_id", [("user_id", 1), ("read", 1), ("_id", -1)], {}),
            (
                "user_undelivered_id",
                [("user_id", 1), ("_id", 1)],
                {"partialFilterExpression": {"delivered": False}},
            ),
            (
                "created_ttl",
                [("created_at", 1)],
                {"expireAfterSeconds": int(cfg.retention_days * 86400)},
            ),
        ]
        if cfg.read_retention_days is not None:
            wanted.append(
                (
                    "read_ttl",
                    [("read_at", 1)],
                    {"expireAfterSeconds": int(cfg.read_retention_days * 86400)},
                )
            )
        existing = {tuple(ix["key"].items()): ix async for ix in await self._coll.list_indexes()}
        for name, keys, options in wanted:
            found = existing.get(tuple(keys))
            ttl = options.get("expireAfterSeconds")
            if found is None:
                await self._coll.create_index(keys, name=name, **options)
            elif ttl is not None and found.get("expireAfterSeconds") != ttl:
                await self._coll.database.command(
                    "collMod",
                    self._coll.name,
                    index={"keyPattern": dict(keys), "expireAfterSeconds": ttl},
                )
                log.info("store.ttl_changed", index=name, seconds=ttl)
        # The replacements exist now; an index no query uses only costs writes.
        for ix in existing.values():
            if ix.get("name") in OBSOLETE_INDEXES:
                await self._coll.drop_index(ix["name"])
                log.info("store.index_dropped", index=ix["name"], replaced=True)
        self._indexes_ready = True

    async def close(self) -> None:
        self._closing = True
        if self._buffer or self._delivered:
            try:
                await self._flush()
            except PyMongoError as err:
                log.error(
                    "store.flush_failed_at_close",
                    pending=len(self._buffer),
                    error=redact(str(err)),
                )
        if self._retry_task is not None:
            self._retry_task.cancel()
            await asyncio.gather(self._retry_task, return_exceptions=True)
        await self._client.close()

    async def ping(self) -> bool:
        if self._degraded:
            return False
        try:
            await self._client.admin.command("ping")
        except PyMongoError:
            return False
        return True

    @property
    def buffered(self) -> int:
        """Notifications accepted but not yet written (degraded mode)."""
        return len(self._buffer)

    # -- resilience -------------------------------------------------------

    def _degrade(self) -> None:
        self._degraded = True
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.get_running_loop().create_task(self._retry_loop())

    async def _retry_loop(self) -> None:
        backoff = Backoff(self.config.retry_base, self.config.retry_max)
        while not self._closing:
            await asyncio.sleep(backoff.next_delay())
            try:
                await self._client.admin.command("ping")
                if not self._indexes_ready:
                    await self.ensure_indexes()
                await self._flush()
                while self._buffer or self._delivered:  # accepted while flushing
                    await self._flush()
            except PyMongoError as err:
                log.debug("store.retry_failed", attempt=backoff.attempt, error=redact(str(err)))
                continue
            self._degraded = False  # no await since the buffer was seen empty
            log.info("store.recovered", backend=self.name, attempts=backoff.attempt)
            return

    async def _flush(self) -> None:
        """Write the buffer (duplicates mean an earlier try landed) and the
        delivered marks; what fails stays buffered."""
        if self._buffer:
            docs = list(self._buffer.values())
            try:
                await self._coll.insert_many(docs, ordered=False)
            except BulkWriteError as err:
                fatal = [
                    e for e in err.details.get("writeErrors", []) if e.get("code") != DUPLICATE_KEY
                ]
                if fatal:
                    raise
            for doc in docs:
                self._buffer.pop(doc["_id"], None)
            log.info("store.buffer_flushed", count=len(docs))
        if self._delivered:
            marks, self._delivered = self._delivered, {}
            try:
                await self._set_delivered(list(marks), min(marks.values()))
            except PyMongoError:
                self._delivered.update(marks)
                raise

    def _wrap(self, err: PyMongoError) -> StoreError:
        return StoreError(f"mongodb: {redact(str(err))}")

    # -- writes -----------------------------------------------------------

    async def insert(self, notification: Notification) -> None:
        if notification.user_id is None:
            raise StoreError("only notifications addressed to a user are stored")
        doc = to_document(notification)
        if not self._degraded:
            try:
                await self._coll.insert_one(doc)
                return
            except DuplicateKeyError:
                return  # an earlier attempt landed
            except ConnectionFailure as err:
                log.warning("store.unreachable", backend=self.name, error=redact(str(err)))
                self._degrade()
            except PyMongoError as err:
                raise self._wrap(err) from None
        error = self._hold(doc)
        if error is not None:
            raise error

    def _hold(self, doc: dict[str, Any]) -> StoreError | None:
        """Keep ``doc`` for the retry loop; an error when the buffer is full."""
        if len(self._buffer) >= self.config.buffer_size and doc["_id"] not in self._buffer:
            return StoreError("mongodb is unreachable and the write buffer is full")
        self._buffer[doc["_id"]] = doc
        return None

    async def insert_many(self, notifications: Sequence[Notification]) -> list[StoreError | None]:
        """One unordered ``insert`` command for all; a duplicate key means an
        earlier attempt landed. Unreachable: buffered like ``insert``."""
        if any(n.user_id is None for n in notifications):
            raise StoreError("only notifications addressed to a user are stored")
        docs = [to_document(n) for n in notifications]
        if not self._degraded:
            try:
                await self._coll.insert_many(docs, ordered=False)
                return [None] * len(docs)
            except BulkWriteError as err:
                errors: list[StoreError | None] = [None] * len(docs)
                for e in err.details.get("writeErrors", []):
                    if e.get("code") != DUPLICATE_KEY:
                        errors[e["index"]] = StoreError(f"mongodb: {redact(e.get('errmsg', ''))}")
                return errors
            except ConnectionFailure as err:
                log.warning("store.unreachable", backend=self.name, error=redact(str(err)))
                self._degrade()
            except PyMongoError as err:
                return [self._wrap(err)] * len(docs)
        return [self._hold(doc) for doc in docs]

    async def _set_delivered(
        self, ids: Sequence[str], at: datetime, user_id: str | None = None
    ) -> None:
        query: dict[str, Any] = {"_id": {"$in": list(ids)}, "delivered": False}
        if user_id is not None:
            query["user_id"] = user_id
        await self._coll.update_many(query, {"$set": {"delivered": True, "delivered_at": at}})

    async def mark_delivered(
        self, ids: Sequence[str], at: float, *, user_id: str | None = None
    ) -> None:
        if not ids:
            return
        when = _date(at)
        assert when is not None
        for nid in ids:
            buffered = self._buffer.get(nid)
            if buffered is not None and user_id in (None, buffered["user_id"]):
                buffered.update(delivered=True, delivered_at=when)
        if self._degraded:
            if user_id is None:  # unscoped marks come from the server itself
                self._remember_delivered(ids, when)
            return
        try:
            await self._set_delivered(ids, when, user_id)
        except ConnectionFailure:
            self._remember_delivered(ids, when)
            self._degrade()
        except PyMongoError as err:
            raise self._wrap(err) from None

    def _remember_delivered(self, ids: Sequence[str], when: datetime) -> None:
        # Bounded like the buffer; a mark that does not fit only means the
        # notification may be offered once more (at-least-once), never lost.
        room = self.config.buffer_size - len(self._delivered)
        for nid in list(ids)[: max(room, 0)]:
            self._delivered.setdefault(nid, when)

    async def mark_read(
        self, user_id: str, ids: Sequence[str] | None, at: float
    ) -> tuple[int, int]:
        query: dict[str, Any] = {"user_id": user_id, "read": False}
        if ids is not None:
            query["_id"] = {"$in": list(ids)}
        try:
            result = await self._coll.update_many(
                query, {"$set": {"read": True, "read_at": _date(at)}}
            )
            unread = await self._coll.count_documents({"user_id": user_id, "read": False})
        except PyMongoError as err:
            raise self._wrap(err) from None
        return result.modified_count, unread

    async def purge(self, now: float, retention: float, read_retention: float | None) -> int:
        """TTL indexes expire documents (MongoDB's monitor runs about every 60 s);
        this sweep removes what is already due, so expiry never waits on it."""
        query: dict[str, Any] = {"created_at": {"$lt": _date(now - retention)}}
        if read_retention is not None:
            query = {"$or": [query, {"read_at": {"$lt": _date(now - read_retention)}}]}
        try:
            result = await self._coll.delete_many(query)
        except PyMongoError as err:
            raise self._wrap(err) from None
        return result.deleted_count

    # -- reads ------------------------------------------------------------

    async def _find(
        self, query: dict[str, Any], sort: list[tuple[str, int]], limit: int
    ) -> list[Notification]:
        limit = max(0, min(limit, MAX_PAGE))
        if limit == 0:
            return []
        try:
            cursor = self._coll.find(query).sort(sort).limit(limit)
            return [from_document(doc) async for doc in cursor]
        except PyMongoError as err:
            raise self._wrap(err) from None

    async def undelivered(
        self, user_id: str, *, after: str | None = None, limit: int = MAX_PAGE
    ) -> list[Notification]:
        query: dict[str, Any] = {"user_id": user_id, "delivered": False}
        if after is not None:
            query["_id"] = {"$gt": after}
        return await self._find(query, OLDEST_FIRST, limit)

    async def after(self, user_id: str, last_id: str, limit: int = MAX_PAGE) -> list[Notification]:
        return await self._find(
            {"user_id": user_id, "read": ANY_READ, "_id": {"$gt": last_id}}, OLDEST_FIRST, limit
        )

    async def history(
        self,
        user_id: str,
        *,
        unread_only: bool = False,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Notification]:
        query: dict[str, Any] = {"user_id": user_id, "read": False if unread_only else ANY_READ}
        if before is not None:
            query["_id"] = {"$lt": before}
        return await self._find(query, NEWEST_FIRST, limit)

    async def get(self, user_id: str, notification_id: str) -> Notification | None:
        try:
            doc = await self._coll.find_one({"_id": notification_id, "user_id": user_id})
        except PyMongoError as err:
            raise self._wrap(err) from None
        return None if doc is None else from_document(doc)

    async def unread_count(self, user_id: str) -> int:
        try:
            return await self._coll.count_documents({"user_id": user_id, "read": False})
        except PyMongoError as err:
            raise self._wrap(err) from None
