"""Embedded SQLite store: one file, WAL mode, one writer thread.

All SQL runs on a single dedicated thread with one connection, so the IOLoop
never blocks and no two statements race. Inserts that arrive while the thread
is busy are written together in one transaction (group commit): the batch
grows with the load, which is what keeps per-user sends fast. Most of the cost
of a row is the index pages it dirties (each is written to the WAL again at
commit), so fewer, bigger transactions are much cheaper per row, and inserts
are written so that SQLite needs no statement journal (``_write_batch``).
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from rtserver.log import get_logger
from rtserver.protocol import Notification, Publication
from rtserver.stores.base import MAX_PAGE, Store, StoreError
from rtserver.stores.keys import (
    KEYS_SCHEMA,
    Claim,
    KeyRecord,
    claim_keys,
    finish_keys,
    purge_keys,
    release_keys,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL,
    created_at   REAL NOT NULL,
    read         INTEGER NOT NULL DEFAULT 0,
    read_at      REAL,
    delivered_at REAL,
    body         BLOB NOT NULL
) WITHOUT ROWID;
-- history, unread lists and counts: user, read state, newest first
CREATE INDEX IF NOT EXISTS notifications_user_read_id
    ON notifications (user_id, read, id DESC);
-- offline delivery: only the undelivered rows are indexed
CREATE INDEX IF NOT EXISTS notifications_undelivered
    ON notifications (user_id, id) WHERE delivered_at IS NULL;
-- retention of read rows (age retention reads the table in id order: an id
-- begins with its creation millisecond, so no index on created_at is needed)
CREATE INDEX IF NOT EXISTS notifications_read_at
    ON notifications (read_at) WHERE read_at IS NOT NULL;
-- topic history: each topic's newest publications, until they expire
CREATE TABLE IF NOT EXISTS publications (
    topic      TEXT NOT NULL,
    id         TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    publisher  TEXT,
    data       BLOB NOT NULL,
    PRIMARY KEY (topic, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS publications_expires ON publications (expires_at);
-- per topic, the newest id removed to keep its history to size
CREATE TABLE IF NOT EXISTS topic_trims (topic TEXT PRIMARY KEY, trimmed TEXT NOT NULL) WITHOUT ROWID;
-- one row, written by ``ping`` after a failed write to see if writes work again
CREATE TABLE IF NOT EXISTS write_probe (k INTEGER PRIMARY KEY, at REAL NOT NULL);
"""
#: Indexes of earlier versions, dropped at open: each was one more B-tree
#: written for every row.
_OBSOLETE_INDEXES = ("notifications_created",)

_COLUMNS = "id, user_id, created_at, read, read_at, delivered_at, body"
#: The columns an insert binds, by which of the row's two times are unset
#: (index: 2 if ``read_at`` is None, plus 1 if ``delivered_at`` is): an unset
#: one is left out and defaults to NULL. Python's sqlite3 binds str, int,
#: float and bytearray straight away but passes None and bytes through its
#: adapter registry, whose failed attribute lookups format an AttributeError
#: for every such value, which had cost the writer more than the row's
#: B-tree inserts. So a row binds no None, and its body as a bytearray.
#: (``NULLIF(?, '')`` in one statement would have done it too, but a function
#: in an INSERT makes SQLite keep a statement journal: three times the bytes.)
_SHAPES = (
    _COLUMNS,
    "id, user_id, created_at, read, read_at, body",
    "id, user_id, created_at, read, delivered_at, body",
    "id, user_id, created_at, read, body",
)
_WIDTHS = {columns: columns.count(",") + 1 for columns in _SHAPES}  # values a row
_CHUNK = 500  # rows per multi-row statement (7 x 500 parameters at most, under SQLite's limit)
_MAX_BATCH = 20_000  # rows per transaction at most
#: Rows inserted between two checkpoints (``_write_pending``).
_CHECKPOINT_ROWS = 10_000
#: Rows deleted per statement by ``purge``.
_PURGE_CHUNK = 5_000
_EXPIRED_PUBLICATIONS = (
    "DELETE FROM publications WHERE (topic, id) IN"
    f" (SELECT topic, id FROM publications WHERE expires_at <= ? LIMIT {_PURGE_CHUNK})"
)

log = get_logger("rtserver.store")


class _Body(msgspec.Struct, gc=False):
    message: str
    type: str
    extra: dict[str, Any]


_body_encoder = msgspec.json.Encoder()
_body_decoder = msgspec.json.Decoder(_Body)


def _rows(notifications: Sequence[Notification]) -> dict[str, list[Any]]:
    """For each of ``_SHAPES`` used, its rows' values in one flat list, as a
    multi-row INSERT binds them."""
    rows: dict[str, list[Any]] = {}
    encode_into = _body_encoder.encode_into
    for n in notifications:
        body = bytearray()
        encode_into(_Body(n.message, n.type, n.extra), body)
        read_at, delivered_at = n.read_at, n.delivered_at
        columns = _SHAPES[2 * (read_at is None) + (delivered_at is None)]
        values = rows.get(columns)
        if values is None:
            values = rows[columns] = []
        values += (n.id, n.user_id, n.created_at, int(n.read))
        if read_at is not None:
            values.append(read_at)
        if delivered_at is not None:
            values.append(delivered_at)
        values.append(body)
    return rows


def _notification(row: tuple[Any, ...]) -> Notification:
    nid, user_id, created_at, read, read_at, delivered_at, body = row
    b = _body_decoder.decode(body)
    return Notification(
        id=nid,
        user_id=user_id,
        message=b.message,
        type=b.type,  # type: ignore[arg-type]  # validated when stored
        created_at=created_at,
        read=bool(read),
        read_at=read_at,
        delivered_at=delivered_at,
        extra=b.extra,
    )


def _probe_write(db: sqlite3.Connection) -> None:
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT OR REPLACE INTO write_probe (k, at) VALUES (1, julianday('now'))")
    db.execute("COMMIT")


def _delete(sql: str, params: tuple[Any, ...], db: sqlite3.Connection) -> int:
    return int(db.execute(sql, params).rowcount)


def _id_bound(ts: float) -> str:
    """An id below every id made at ``ts`` or later (ids begin with 12 hex
    digits of their creation millisecond; see ``IdGenerator``)."""
    return f"{math.ceil(ts * 1000):012x}"


class SQLiteStore(Store):
    name = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtserver-sqlite")
        self._db: sqlite3.Connection | None = None
        # Notifications waiting for the writer, in groups (one a call), each
        # with the future its caller awaits; a group is always written in
        # one transaction. Their rows are made on the store's thread, one
        # statement's worth at a time (``_write_batch``), so the event loop's
        # share of a stored notification is queuing it.
        self._pending: list[tuple[tuple[Notification, ...], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._unsaved = 0  # rows inserted since the last checkpoint
        #: The last write failed in the store itself (full, read-only):
        #: ``ping`` says so until a write works again.
        self._write_failed = False
        # Calls waiting for this loop turn's hand-off to the thread (``_run``).
        self._calls: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []

    # -- plumbing ---------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(db)`` on the store's thread. The calls made in one loop
        turn go over together, in order, as one hand-off to the thread: under
        a reconnect storm each register's reads would otherwise pay the
        executor's Futures and wake-ups on their own."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._calls:
            loop.call_soon(self._submit)
        self._calls.append((fn, future))
        return await future

    def _submit(self) -> None:
        calls, self._calls = self._calls, []
        try:
            done = asyncio.get_running_loop().run_in_executor(
                self._executor, self._call_all, [fn for fn, _ in calls]
            )
        except RuntimeError as err:  # the executor is shut down
            done = asyncio.get_running_loop().create_future()
            done.set_exception(StoreError(f"sqlite: {err}"))
        done.add_done_callback(lambda d: self._settle(calls, d))

    def _call_all(self, fns: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        """On the store's thread: each call's result, or the error it raised."""
        results: list[tuple[bool, Any]] = []
        for fn in fns:
            db = self._db
            try:
                if db is None:
                    raise StoreError("sqlite store is not open")
                results.append((True, fn(db)))
            except Exception as err:
                # Whatever failed, no transaction stays open behind it.
                if db is not None and db.in_transaction:
                    db.rollback()
                if isinstance(err, sqlite3.Error):
                    cause, err = err, StoreError(f"sqlite: {err}")
                    err.__cause__ = cause
                results.append((False, err))
        return results

    @staticmethod
    def _settle(calls: list[tuple[Any, asyncio.Future[Any]]], done: asyncio.Future[Any]) -> None:
        error = StoreError("sqlite: cancelled") if done.cancelled() else done.exception()
        outcomes = done.result() if error is None else [(False, error)] * len(calls)
        for (_, future), (ok, value) in zip(calls, outcomes, strict=True):
            if future.cancelled():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _connect(self) -> list[str]:
        """Open and set up the file; returns the obsolete indexes it dropped."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        # A bigger page cache and fewer checkpoints: a hot index page is then
        # copied into the database file once per checkpoint, not once per
        # commit. Checkpoints run between writes (``_write_pending``); this
        # one, at 128 MB of WAL, only backs them up (updates, purges).
        db.execute("PRAGMA cache_size=-32768")
        db.execute("PRAGMA wal_autocheckpoint=32000")
        db.executescript(_SCHEMA + KEYS_SCHEMA)
        dropped = []
        for name in _OBSOLETE_INDEXES:
            found = "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?"
            if db.execute(found, (name,)).fetchone():
                db.execute(f"DROP INDEX {name}")
                dropped.append(name)
        self._db = db
        return dropped

    async def open(self) -> None:
        if self._db is not None:
            return
        try:
            dropped = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._connect
            )
        except sqlite3.Error as err:
            raise StoreError(f"sqlite: cannot open {self.path}: {err}") from err
        for name in dropped:
            log.info("store.index_dropped", backend=self.name, index=name)

    async def close(self) -> None:
        if self._db is None:
            return
        # Drain queued inserts.
        while self._writer is not None or self._pending:
            if self._writer is not None:
                await asyncio.gather(self._writer, return_exceptions=True)
            elif self._pending:
                await self._write_pending()
        db, self._db = self._db, None
        await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=True)

    async def ping(self) -> bool:
        """Reads work and, after a write failed (a full disk, a read-only
        file), writes work again: a small committed write tells."""
        try:
            if not self._write_failed:
                return await self._run(lambda db: db.execute("SELECT 1").fetchone() == (1,))
            await self._run(_probe_write)
        except StoreError:
            return False
        self._write_failed = False
        return True

    # -- writes -----------------------------------------------------------

    async def insert(self, notification: Notification) -> None:
        if notification.user_id is None:
            raise StoreError("only notifications addressed to a user are stored")
        await self._queue((notification,))

    async def insert_many(self, notifications: Sequence[Notification]) -> list[StoreError | None]:
        if any(n.user_id is None for n in notifications):
            raise StoreError("only notifications addressed to a user are stored")
        try:
            await self._queue(tuple(notifications))
        except StoreError as err:
            return [err] * len(notifications)
        return [None] * len(notifications)

    async def _queue(self, group: tuple[Notification, ...]) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((group, fut))
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_pending())
        await fut

    async def _write_pending(self) -> None:
        """Write what is pending, in transactions of about ``_MAX_BATCH`` rows,
        until nothing is: whatever arrives during one commit goes into the
        next, so a busy store writes big batches and an idle one at once."""
        try:
            while self._pending:
                size = taken = 0
                for group, _ in self._pending:
                    size += len(group)
                    taken += 1
                    if size >= _MAX_BATCH:
                        break
                batch = self._pending[:taken]
                del self._pending[:taken]
                await self._write_batch(batch)
                self._unsaved += size
                if self._unsaved >= _CHECKPOINT_ROWS:
                    self._unsaved = 0
                    await self._checkpoint()
        finally:
            self._writer = None

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database file, once the last write's callers
        have their answers. Inside a commit (SQLite's automatic checkpoint)
        the callers waited for it and its two fsyncs, and with every HTTP
        request waiting on the store the core sat idle; here they are
        answered and the event loop works while the disk syncs."""
        try:
            await self._run(self._wal_checkpoint)
        except StoreError as err:
            log.warning("store.checkpoint_failed", backend=self.name, error=str(err))

    @staticmethod
    def _wal_checkpoint(db: sqlite3.Connection) -> None:
        # PASSIVE, and complete: no other connection writes or reads.
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    async def _write_batch(
        self, batch: list[tuple[tuple[Notification, ...], asyncio.Future[None]]]
    ) -> None:
        groups = [group for group, _ in batch]

        def insert(db: sqlite3.Connection, verb: str) -> int:
            # Multi-row statements: one sqlite3_step (one GIL hand-off) per
            # chunk instead of one per row, which matters when the IOLoop
            # thread keeps the GIL busy. The rows are made here, a chunk at
            # a time, as they are bound.
            notifications = groups[0] if len(groups) == 1 else tuple(chain.from_iterable(groups))
            written = 0
            for start in range(0, len(notifications), _CHUNK):
                for columns, values in _rows(notifications[start : start + _CHUNK]).items():
                    width = _WIDTHS[columns]
                    marks = ",".join(["(" + ", ".join("?" * width) + ")"] * (len(values) // width))
                    written += db.execute(
                        f"{verb} INTO notifications ({columns}) VALUES {marks}", values
                    ).rowcount
            return written

        def write(db: sqlite3.Connection) -> None:
            # INSERT OR IGNORE cannot fail half-way, so SQLite keeps no
            # statement journal for it: a plain multi-row INSERT first copies
            # every page it will change there, which was two thirds of the
            # bytes written per row. A row it skips has an id stored already:
            # the same notification sent again, which counts as stored.
            db.execute("BEGIN")
            insert(db, "INSERT OR IGNORE")
            db.execute("COMMIT")

        try:
            await self._run(write)
        except Exception as err:
            # A row that could not be made: written alone, each group fails
            # or not on its own, so one caller's bad row never costs another
            # caller its write. (Not when the store itself failed, locked or
            # full: every group would wait and fail again.)
            bad_row = not isinstance(err, StoreError) or isinstance(
                err.__cause__, sqlite3.IntegrityError
            )
            if bad_row and len(batch) > 1:
                for group in batch:
                    await self._write_batch([group])
                return
            if not bad_row:
                self._write_failed = True
            message = str(err) if isinstance(err, StoreError) else f"sqlite: cannot store: {err!r}"
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(StoreError(message))
            return
        self._write_failed = False
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)

    async def mark_delivered(
        self, ids: Sequence[str], at: float, *, user_id: str | None = None
    ) -> None:
        # Only where unset: the first delivery's time is kept.
        await self._set_delivered(ids, "?", [at], user_id, "delivered_at IS NULL AND ")

    async def mark_undelivered(self, user_id: str, ids: Sequence[str]) -> None:
        await self._set_delivered(ids, "NULL", [], user_id)

    async def _set_delivered(
        self,
        ids: Sequence[str],
        value: str,
        params: list[Any],
        user_id: str | None,
        only: str = "",
    ) -> None:
        """``delivered_at = value`` on ``ids`` (only ``user_id``'s when given)."""
        if not ids:
            return
        scope = "" if user_id is None else " AND user_id = ?"
        tail = [] if user_id is None else [user_id]
        chunks = [list(ids[i : i + _CHUNK]) for i in range(0, len(ids), _CHUNK)]

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN")
            for chunk in chunks:
                db.execute(
                    f"UPDATE notifications SET delivered_at = {value}"
                    f" WHERE {only}id IN ({','.join('?' * len(chunk))}){scope}",
                    [*params, *chunk, *tail],
                )
            db.execute("COMMIT")

        await self._run(work)

    async def mark_read(
        self, user_id: str, ids: Sequence[str] | None, at: float
    ) -> tuple[int, int]:
        def work(db: sqlite3.Connection) -> tuple[int, int]:
            db.execute("BEGIN IMMEDIATE")
            if ids is None:
                cur = db.execute(
                    "UPDATE notifications SET read = 1, read_at = ? WHERE user_id = ? AND read = 0",
                    (at, user_id),
                )
                updated = cur.rowcount
            else:
                updated = 0
                for chunk_start in range(0, len(ids), 400):
                    chunk = list(ids[chunk_start : chunk_start + 400])
                    marks = ",".join("?" * len(chunk))
                    cur = db.execute(
                        "UPDATE notifications SET read = 1, read_at = ?"
                        f" WHERE user_id = ? AND read = 0 AND id IN ({marks})",
                        (at, user_id, *chunk),
                    )
                    updated += cur.rowcount
            unread = db.execute(
                "SELECT count(*) FROM notifications WHERE user_id = ? AND read = 0", (user_id,)
            ).fetchone()[0]
            db.execute("COMMIT")
            return updated, int(unread)

        return await self._run(work)

    async def purge(self, now: float, retention: float, read_retention: float | None) -> int:
        """Delete in statements of at most ``_PURGE_CHUNK`` rows, each its own
        call to the store's thread, so the writes queued meanwhile go in
        between. One DELETE for a million expired rows held the thread (and
        every write behind it) for 4.5 s and grew the WAL by 286 MB; in steps
        a write waited 60 ms at most, and the purge took twice as long.

        Rows past ``retention`` are found in id order, oldest first: the id
        range before the cutoff's millisecond, checked against ``created_at``
        (so a row is never deleted early, whatever its id)."""
        cutoff = now - retention
        cutoffs: list[tuple[str, tuple[Any, ...]]] = [
            ("id < ? AND created_at < ?", (_id_bound(cutoff), cutoff))
        ]
        if read_retention is not None:
            cutoffs.append(("read_at IS NOT NULL AND read_at < ?", (now - read_retention,)))
        removed = 0
        for where, params in cutoffs:
            sql = (
                "DELETE FROM notifications WHERE id IN"
                f" (SELECT id FROM notifications WHERE {where} LIMIT {_PURGE_CHUNK})"
            )
            removed += await self._delete_in_chunks(sql, params)
        await self._run(lambda db: purge_keys(db, now))
        await self._delete_in_chunks(_EXPIRED_PUBLICATIONS, (now,))
        return removed

    async def _delete_in_chunks(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run a DELETE of at most ``_PURGE_CHUNK`` rows until it deletes
        fewer: each statement is its own call to the store's thread, so writes
        queued meanwhile go in between. Returns the rows deleted."""
        removed = 0
        while True:
            count = await self._run(partial(_delete, sql, params))
            removed += count
            if count < _PURGE_CHUNK:
                return removed

    async def delete_notifications(
        self, user_id: str, ids: Sequence[str] | None
    ) -> tuple[int, int]:
        """Ids in one statement; all of a user's (an erasure) in statements of
        ``_PURGE_CHUNK`` rows, as ``purge`` does, so writes go in between."""
        deleted = 0
        if ids is None:
            sql = (
                "DELETE FROM notifications WHERE id IN (SELECT id FROM notifications"
                f" WHERE user_id = ? LIMIT {_PURGE_CHUNK})"
            )
            deleted = await self._delete_in_chunks(sql, (user_id,))
        else:
            for start in range(0, len(ids), _CHUNK):
                chunk = tuple(ids[start : start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                sql = f"DELETE FROM notifications WHERE user_id = ? AND id IN ({marks})"
                deleted += await self._run(partial(_delete, sql, (user_id, *chunk)))
        return deleted, await self.unread_count(user_id)

    # -- topic history ----------------------------------------------------

    async def insert_publication(self, publication: Publication, keep: int) -> None:
        p = publication

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR IGNORE INTO publications"
                    " (topic, id, created_at, expires_at, publisher, data) VALUES (?, ?, ?, ?, ?, ?)",
                    (p.topic, p.id, p.created_at, p.expires_at, p.publisher, p.data),
                )
                row = db.execute(
                    "SELECT id FROM publications WHERE topic = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
                    (p.topic, keep),
                ).fetchone()
                if row is not None:
                    db.execute(
                        "DELETE FROM publications WHERE topic = ? AND id <= ?", (p.topic, row[0])
                    )
                    db.execute(
                        "INSERT INTO topic_trims (topic, trimmed) VALUES (?, ?) ON CONFLICT (topic)"
                        " DO UPDATE SET trimmed = max(trimmed, excluded.trimmed)",
                        (p.topic, row[0]),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(work)

    async def publications(
        self, topic: str, *, after: str | None, limit: int, now: float
    ) -> list[Publication]:
        sql = (
            "SELECT topic, id, created_at, expires_at, publisher, data FROM publications"
            " WHERE topic = ? AND id > ? AND expires_at > ? ORDER BY id LIMIT ?"
        )
        args = (topic, after or "", now, max(0, min(limit, MAX_PAGE)))
        rows = await self._run(lambda db: db.execute(sql, args).fetchall())
        return [
            Publication(
                topic=r[0], id=r[1], created_at=r[2], expires_at=r[3], publisher=r[4], data=r[5]
            )
            for r in rows
        ]

    async def trimmed(self, topic: str) -> str | None:
        sql = "SELECT trimmed FROM topic_trims WHERE topic = ?"
        row = await self._run(lambda db: db.execute(sql, (topic,)).fetchone())
        return None if row is None else str(row[0])

    # -- idempotency keys -------------------------------------------------

    async def claim_keys(
        self, records: Sequence[KeyRecord], now: float, lease: float
    ) -> list[Claim]:
        return await self._run(lambda db: claim_keys(db, records, now, lease))

    async def finish_keys(self, answers: Sequence[tuple[str, int, bytes]]) -> None:
        await self._run(lambda db: finish_keys(db, answers))

    async def release_keys(self, keys: Sequence[str]) -> None:
        await self._run(lambda db: release_keys(db, keys))

    # -- reads ------------------------------------------------------------

    async def _fetch(self, sql: str, args: tuple[Any, ...]) -> list[Notification]:
        rows = await self._run(lambda db: db.execute(sql, args).fetchall())
        return [_notification(r) for r in rows]

    async def _select(
        self, where: str, params: tuple[Any, ...], order: str, limit: int
    ) -> list[Notification]:
        sql = f"SELECT {_COLUMNS} FROM notifications WHERE {where} ORDER BY {order} LIMIT ?"
        return await self._fetch(sql, (*params, max(0, min(limit, MAX_PAGE))))

    async def _select_user(
        self, user_id: str, extra: str, params: tuple[Any, ...], order: str, limit: int
    ) -> list[Notification]:
        """A user's rows in id order, read or not. The user index is ordered by
        id within each read value, so one arm per value, which SQLite merges
        along the index (``MERGE (UNION ALL)``) and stops at ``limit``: a plain
        ``WHERE user_id = ? ORDER BY id`` sorts all of the user's rows first."""
        arm = f"SELECT {_COLUMNS} FROM notifications WHERE user_id = ? AND read = {{}}{extra}"
        sql = f"{arm.format(0)} UNION ALL {arm.format(1)} ORDER BY id {order} LIMIT ?"
        limit = max(0, min(limit, MAX_PAGE))
        return await self._fetch(sql, (user_id, *params, user_id, *params, limit))

    async def undelivered(
        self, user_id: str, *, after: str | None = None, limit: int = MAX_PAGE
    ) -> list[Notification]:
        if after is None:
            return await self._select(
                "user_id = ? AND delivered_at IS NULL", (user_id,), "id ASC", limit
            )
        return await self._select(
            "user_id = ? AND delivered_at IS NULL AND id > ?", (user_id, after), "id ASC", limit
        )

    async def after(self, user_id: str, last_id: str, limit: int = MAX_PAGE) -> list[Notification]:
        return await self._select_user(user_id, " AND id > ?", (last_id,), "ASC", limit)

    async def history(
        self,
        user_id: str,
        *,
        unread_only: bool = False,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Notification]:
        extra, params = ("", ()) if before is None else (" AND id < ?", (before,))
        if unread_only:
            return await self._select(
                "user_id = ? AND read = 0" + extra, (user_id, *params), "id DESC", limit
            )
        return await self._select_user(user_id, extra, params, "DESC", limit)

    async def get(self, user_id: str, notification_id: str) -> Notification | None:
        found = await self._select(
            "user_id = ? AND id = ?", (user_id, notification_id), "id ASC", 1
        )
        return found[0] if found else None

    async def unread_count(self, user_id: str) -> int:
        row = await self._run(
            lambda db: db.execute(
                "SELECT count(*) FROM notifications WHERE user_id = ? AND read = 0", (user_id,)
            ).fetchone()
        )
        return int(row[0])
