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

Resilience: when MongoDB cannot be reached (at start-up or later) inserts are
journaled to a local SQLite spool (``rtserver.stores.spool``, synced before the
caller is answered) and a background task retries with exponential backoff and
full jitter, replaying the spool in order on recovery and at the next start if
the process stopped or died first. Live delivery is unaffected; ``ping``
reports False (readiness says degraded) while anything is spooled; when the
spool is full (``store.spool_max_bytes``) ``insert`` raises ``StoreError``
(HTTP 503), so nothing accepted is ever dropped silently. What MongoDB refuses
when replayed goes to the spool's dead letters (a log event and a metric).

One notification's bad document never costs another its write: batches are
unordered inserts with per-document results, and a document the driver
cannot encode is found and refused on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bson
from bson.codec_options import TypeDecoder, TypeRegistry
from bson.errors import BSONError
from bson.int64 import Int64
from pymongo import AsyncMongoClient
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    PyMongoError,
)

from rtserver.backoff import Backoff
from rtserver.config import StoreConfig
from rtserver.log import get_logger
from rtserver.protocol import Notification, Publication
from rtserver.stores.base import MAX_PAGE, Store, StoreError
from rtserver.stores.keys import Claim, KeyRecord
from rtserver.stores.spool import Spool

log = get_logger("rtserver.store")

DUPLICATE_KEY = 11000
#: What the driver raises for a document it cannot encode (an int beyond 64
#: bits, a NUL in a key, over 16 MB): the document's fault, not the server's.
_UNENCODABLE = (BSONError, OverflowError, ValueError, TypeError)
#: Spooled notifications replayed per insert command.
_REPLAY_CHUNK = 500
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
#: Delivered marks held in memory while MongoDB is unreachable, at most.
_MAX_MARKS = 100_000


def _key_document(record: KeyRecord) -> dict[str, Any]:
    return {
        "_id": record.key,
        "fingerprint": record.fingerprint,
        "ids": record.ids,
        "status": record.status,
        "body": bson.Binary(record.body),
        "claimed_at": record.claimed_at,
        "expires_at": _date(record.expires_at),
    }


def _key_record(doc: Mapping[str, Any]) -> KeyRecord:
    expires = _ts(doc["expires_at"])
    assert expires is not None
    return KeyRecord(
        key=doc["_id"],
        fingerprint=doc["fingerprint"],
        ids=list(doc.get("ids") or []),
        status=int(doc.get("status") or 0),
        body=bytes(doc.get("body") or b""),
        claimed_at=float(doc.get("claimed_at") or 0.0),
        expires_at=expires,
    )


class _PlainInt(TypeDecoder):
    bson_type = Int64

    def transform_bson(self, value: Any) -> int:
        return int(value)


_PLAIN_INTS = TypeRegistry([_PlainInt()])


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
            socketTimeoutMS=int(config.operation_timeout * 1000),
            tz_aware=True,
            appname="rtserver",
        )
        # Integers past 32 bits come back as plain ints, as they were given
        # (BSON's Int64 is an int subclass no JSON encoder here knows).
        codec = self._client.codec_options.with_options(type_registry=_PLAIN_INTS)
        self._coll = self._client[config.database].get_collection(
            config.collection, codec_options=codec
        )
        self._keys = self._client[config.database][f"{config.collection}_keys"]
        self._publications = self._client[config.database][f"{config.collection}_publications"]
        self._trims = self._client[config.database][f"{config.collection}_topic_trims"]
        self.spool = Spool(Path(config.data_dir) / "mongodb-spool.db", config.spool_max_bytes)
        self._delivered: dict[str, datetime] = {}
        #: Undelivered marks (id -> user) taken while MongoDB was unreachable.
        self._undelivered: dict[str, str] = {}
        self._indexes_ready = False
        self._degraded = False
        self._retry_task: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle --------------------------------------------------------

    async def open(self) -> None:
        await self.spool.open()
        try:
            await self.ensure_indexes()
        except ConnectionFailure as err:
            log.warning("store.unreachable", backend=self.name, error=redact(str(err)))
            self._degrade()
        if self.spool.count:
            # Left by a run that stopped or died during an outage: replayed
            # first, and what comes meanwhile queues behind it, in order.
            log.warning("store.spool_found", pending=self.spool.count, path=str(self.spool.path))
            self._degrade()
        if self.spool.dead:
            log.error("store.dead_letters_unread", count=self.spool.dead)

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
        # Idempotency keys expire at their own time (a date per key).
        await self._keys.create_index([("expires_at", 1)], name="expires_ttl", expireAfterSeconds=0)
        # Topic history: read per topic in id order; gone at its own time.
        await self._publications.create_index([("topic", 1), ("_id", 1)], name="topic_id")
        await self._publications.create_index(
            [("expires_at", 1)], name="expires_ttl", expireAfterSeconds=0
        )
        self._indexes_ready = True

    async def close(self) -> None:
        self._closing = True
        if self._retry_task is not None:
            self._retry_task.cancel()
            await asyncio.gather(self._retry_task, return_exceptions=True)
        if self.spool.pending or self._delivered or self._undelivered:
            try:
                await self._flush()
            except (PyMongoError, StoreError) as err:
                log.debug("store.flush_at_close_failed", error=redact(str(err)))
        if self.spool.count or self.spool.keys:
            # Nothing is lost: the next start replays it before anything else.
            log.error(
                "store.spool_kept",
                pending=self.spool.count,
                keys=self.spool.keys,
                path=str(self.spool.path),
                reason="mongodb is unreachable; replayed at the next start",
            )
        await self.spool.close()
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
        """Notifications accepted but not yet written to MongoDB (spooled)."""
        return self.spool.pending

    @property
    def dead_letters(self) -> int:
        """Spooled notifications MongoDB refused, not yet dealt with."""
        return self.spool.dead

    # -- resilience -------------------------------------------------------

    def _degrade(self) -> None:
        self._degraded = True
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.get_running_loop().create_task(self._retry_loop())

    async def _retry_loop(self) -> None:
        backoff = Backoff(self.config.retry_base, self.config.retry_max)
        first = True
        while not self._closing:
            if not first:
                await asyncio.sleep(backoff.next_delay())
            first = False
            try:
                await self._client.admin.command("ping")
                if not self._indexes_ready:
                    await self.ensure_indexes()
                # Accepted while flushing: spooled behind, flushed too.
                while self.spool.pending or self.spool.keys or self._delivered or self._undelivered:
                    await self._flush()
                    if self.spool.adding:
                        # Still being written to the spool: nothing for _flush
                        # yet, and the writes land only if the loop runs.
                        await asyncio.sleep(0.005)
            except (PyMongoError, StoreError) as err:
                log.debug("store.retry_failed", attempt=backoff.attempt, error=redact(str(err)))
                continue
            self._degraded = False  # no await since the spool was seen empty
            log.info("store.recovered", backend=self.name, attempts=backoff.attempt)
            return

    async def _flush(self) -> None:
        """Replay the spool in order, then the idempotency keys and delivered
        marks taken meanwhile. Raises while MongoDB is unreachable; what it
        refuses goes to the dead letters, never blocking the rest."""
        while self.spool.count:
            page = await self.spool.peek(_REPLAY_CHUNK)
            if not page:
                break
            errors = await self._insert_docs([to_document(n) for _, n in page])
            dead = [(seq, str(err)) for (seq, _), err in zip(page, errors, strict=True) if err]
            done = [seq for (seq, _), err in zip(page, errors, strict=True) if err is None]
            await self.spool.remove(done, dead)
            for (_seq, n), err in zip(page, errors, strict=True):
                if err is not None:
                    log.error(
                        "store.dead_letter",
                        notification_id=n.id,
                        user_id=n.user_id,
                        error=str(err),
                    )
            log.info("store.spool_flushed", count=len(done), dead=len(dead))
        while self.spool.keys:
            records = await self.spool.take_keys(_REPLAY_CHUNK)
            for record in records:
                # A key another node recorded first: its answer stands.
                with contextlib.suppress(DuplicateKeyError):
                    await self._keys.insert_one(_key_document(record))
            await self.spool.drop_keys([r.key for r in records])
        if self._delivered:
            marks, self._delivered = self._delivered, {}
            try:
                await self._set_delivered(list(marks), min(marks.values()))
            except PyMongoError:
                self._delivered.update(marks)
                raise
        if self._undelivered:
            lost, self._undelivered = self._undelivered, {}
            try:
                for user_id in set(lost.values()):
                    await self._unset_delivered(
                        user_id, [i for i, u in lost.items() if u == user_id]
                    )
            except PyMongoError:
                self._undelivered.update(lost)
                raise

    def _wrap(self, err: PyMongoError) -> StoreError:
        return StoreError(f"mongodb: {redact(str(err))}")

    # -- writes -----------------------------------------------------------

    async def insert(self, notification: Notification) -> None:
        (error,) = await self.insert_many([notification])
        if error is not None:
            raise error

    async def insert_many(self, notifications: Sequence[Notification]) -> list[StoreError | None]:
        """One unordered ``insert`` command for all, with a result for each; a
        duplicate key means an earlier attempt landed. Unreachable: spooled."""
        if any(n.user_id is None for n in notifications):
            raise StoreError("only notifications addressed to a user are stored")
        if not self._degraded:
            try:
                return await self._insert_docs([to_document(n) for n in notifications])
            except ConnectionFailure as err:
                log.warning("store.unreachable", backend=self.name, error=redact(str(err)))
                self._degrade()
        try:
            await self.spool.add(notifications)
        except StoreError as err:
            return [err] * len(notifications)
        return [None] * len(notifications)

    async def _insert_docs(self, docs: list[dict[str, Any]]) -> list[StoreError | None]:
        """Insert ``docs`` unordered: per document None (stored, or stored
        before) or the error that kept it out. ``ConnectionFailure``
        propagates (MongoDB is unreachable: nothing is the documents' fault)."""
        errors: list[StoreError | None] = [None] * len(docs)
        try:
            await self._coll.insert_many(docs, ordered=False)
        except BulkWriteError as err:
            for e in err.details.get("writeErrors", []):
                if e.get("code") != DUPLICATE_KEY:
                    errors[e["index"]] = StoreError(f"mongodb: {redact(e.get('errmsg', ''))}")
            if err.details.get("writeConcernErrors"):
                raise self._wrap(err) from None
        except _UNENCODABLE:
            # The driver refused before sending: find the documents at fault,
            # and insert the others.
            good = []
            for i, doc in enumerate(docs):
                try:
                    bson.encode(doc)
                    good.append(i)
                except _UNENCODABLE as err:
                    errors[i] = StoreError(f"mongodb: cannot store this notification: {err}")
            if len(good) == len(docs):
                raise  # not one document's fault after all
            if good:
                stored = await self._insert_docs([docs[i] for i in good])
                for i, error in zip(good, stored, strict=True):
                    errors[i] = error
        except ConnectionFailure:
            raise
        except PyMongoError as err:
            return [self._wrap(err)] * len(docs)
        return errors

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
        if self.spool.count and user_id is None:
            # Scoped marks (from a client) only touch MongoDB's own rows:
            # spooled ones were pushed by this server, which marks them itself.
            spooled = await self.spool.mark_delivered(ids, at)
            ids = [nid for nid in ids if nid not in spooled]
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

    async def _unset_delivered(self, user_id: str, ids: list[str]) -> None:
        await self._coll.update_many(
            {"_id": {"$in": ids}, "user_id": user_id},
            {"$set": {"delivered": False}, "$unset": {"delivered_at": ""}},
        )

    async def mark_undelivered(self, user_id: str, ids: Sequence[str]) -> None:
        for nid in ids:
            self._delivered.pop(nid, None)  # a mark not applied yet: never now
        if self.spool.count:
            spooled = await self.spool.mark_undelivered(ids)
            ids = [nid for nid in ids if nid not in spooled]
        if not ids:
            return
        if not self._degraded:
            try:
                await self._unset_delivered(user_id, list(ids))
                return
            except ConnectionFailure:
                self._degrade()
            except PyMongoError as err:
                raise self._wrap(err) from None
        # Applied once MongoDB is back (bounded: past it, raise).
        if len(self._undelivered) + len(ids) > _MAX_MARKS:
            raise StoreError("mongodb: unreachable, and too many marks are waiting for it")
        self._undelivered.update(dict.fromkeys(ids, user_id))

    def _remember_delivered(self, ids: Sequence[str], when: datetime) -> None:
        # Bounded; a mark that does not fit only means the notification may
        # be offered once more (at-least-once), never lost.
        room = _MAX_MARKS - len(self._delivered)
        for nid in list(ids)[: max(room, 0)]:
            self._delivered.setdefault(nid, when)

    # -- idempotency keys -------------------------------------------------

    async def claim_keys(
        self, records: Sequence[KeyRecord], now: float, lease: float
    ) -> list[Claim]:
        """On MongoDB when it answers (so every node sees the keys), in the
        spool while it does not (then only this node does, until the spool
        is replayed)."""
        if not self._degraded:
            try:
                return await self._claim_on_mongodb(records, now, lease)
            except ConnectionFailure as err:
                log.warning("store.unreachable", backend=self.name, error=redact(str(err)))
                self._degrade()
            except PyMongoError as err:
                raise self._wrap(err) from None
        return await self.spool.claim_keys(records, now, lease)

    async def _claim_on_mongodb(
        self, records: Sequence[KeyRecord], now: float, lease: float
    ) -> list[Claim]:
        """One unordered insert for all; each key already there is looked at
        on its own (a retry: rare)."""
        claims: list[Claim] = [Claim("new", r) for r in records]
        taken: list[int] = []
        try:
            await self._keys.insert_many([_key_document(r) for r in records], ordered=False)
        except BulkWriteError as err:
            for e in err.details.get("writeErrors", []):
                if e.get("code") != DUPLICATE_KEY:
                    raise self._wrap(err) from None
                taken.append(e["index"])
        for i in taken:
            claims[i] = await self._claim_existing(records[i], now, lease)
        return claims

    async def _claim_existing(self, record: KeyRecord, now: float, lease: float) -> Claim:
        doc = _key_document(record)
        for _ in range(3):
            found = await self._keys.find_one({"_id": record.key})
            if found is None:  # expired and removed meanwhile
                try:
                    await self._keys.insert_one(doc)
                    return Claim("new", record)
                except DuplicateKeyError:
                    continue
            held = _key_record(found)
            if held.expires_at <= now:
                # Expired, and the TTL monitor has not removed it yet.
                replaced = await self._keys.replace_one(
                    {"_id": record.key, "expires_at": found["expires_at"]}, doc
                )
                if replaced.matched_count:
                    return Claim("new", record)
                continue
            if held.takeable(record.fingerprint, now, lease):
                result = await self._keys.update_one(
                    {"_id": record.key, "status": 0, "claimed_at": held.claimed_at},
                    {"$set": {"claimed_at": now}},
                )
                if result.matched_count:
                    held.claimed_at = now
                    return Claim("taken", held)
                continue
            return Claim("held", held)
        raise StoreError("mongodb: the idempotency key kept changing; try again")

    async def finish_keys(self, answers: Sequence[tuple[str, int, bytes]]) -> None:
        if self.spool.keys:
            await self.spool.finish_keys(answers)
        if self._degraded:
            return
        try:
            for key, status, body in answers:
                await self._keys.update_one(
                    {"_id": key}, {"$set": {"status": status, "body": bson.Binary(body)}}
                )
        except PyMongoError as err:
            raise self._wrap(err) from None

    async def release_keys(self, keys: Sequence[str]) -> None:
        if self.spool.keys:
            await self.spool.release_keys(keys)
        if self._degraded:
            return
        try:
            await self._keys.update_many(
                {"_id": {"$in": list(keys)}, "status": 0}, {"$set": {"claimed_at": 0.0}}
            )
        except PyMongoError as err:
            raise self._wrap(err) from None

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

    async def delete_notifications(
        self, user_id: str, ids: Sequence[str] | None
    ) -> tuple[int, int]:
        query: dict[str, Any] = {"user_id": user_id}
        if ids is not None:
            query["_id"] = {"$in": list(ids)}
        try:
            result = await self._coll.delete_many(query)
            unread = await self._coll.count_documents({"user_id": user_id, "read": False})
        except PyMongoError as err:
            raise self._wrap(err) from None
        return result.deleted_count, unread

    # -- topic history ----------------------------------------------------

    async def insert_publication(self, publication: Publication, keep: int) -> None:
        p = publication
        doc = {
            "_id": p.id,
            "topic": p.topic,
            "created_at": p.created_at,
            "expires_at": _date(p.expires_at),
            "publisher": p.publisher,
            "data": bson.Binary(p.data),
        }
        try:
            with contextlib.suppress(DuplicateKeyError):  # stored by an earlier try
                await self._publications.insert_one(doc)
            cursor = (
                self._publications.find({"topic": p.topic}, {"_id": 1})
                .sort("_id", -1)
                .skip(keep)
                .limit(1)
            )
            beyond = [d["_id"] async for d in cursor]
            if beyond:
                await self._publications.delete_many({"topic": p.topic, "_id": {"$lte": beyond[0]}})
                await self._trims.update_one(
                    {"_id": p.topic}, {"$max": {"trimmed": beyond[0]}}, upsert=True
                )
        except PyMongoError as err:
            raise self._wrap(err) from None

    async def publications(
        self, topic: str, *, after: str | None, limit: int, now: float
    ) -> list[Publication]:
        limit = max(0, min(limit, MAX_PAGE))
        if limit == 0:
            return []
        query = {"topic": topic, "_id": {"$gt": after or ""}, "expires_at": {"$gt": _date(now)}}
        try:
            cursor = self._publications.find(query).sort("_id", 1).limit(limit)
            return [
                Publication(
                    topic=d["topic"],
                    id=d["_id"],
                    created_at=float(d["created_at"]),
                    expires_at=d["expires_at"].timestamp(),
                    publisher=d.get("publisher"),
                    data=bytes(d["data"]),
                )
                async for d in cursor
            ]
        except PyMongoError as err:
            raise self._wrap(err) from None

    async def trimmed(self, topic: str) -> str | None:
        try:
            doc = await self._trims.find_one({"_id": topic})
        except PyMongoError as err:
            raise self._wrap(err) from None
        return None if doc is None else str(doc["trimmed"])
