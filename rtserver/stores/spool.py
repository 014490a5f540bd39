"""The MongoDB store's outage spool: a small SQLite journal on local disk.

What is accepted while MongoDB is unreachable is written here, and synced,
before the caller is answered; the store replays it in order once MongoDB is
back, at the next start if the process stopped or died meanwhile. An item
MongoDB still refuses after recovery is moved to the dead-letter table (never
blocking the rest) until an operator reads and removes it.

One file, ``<store.data_dir>/mongodb-spool.db``; all SQL runs on one thread of
its own, so the IOLoop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from rtserver.protocol import Notification
from rtserver.stores.base import StoreError
from rtserver.stores.keys import (
    KEYS_SCHEMA,
    Claim,
    KeyRecord,
    claim_keys,
    finish_keys,
    release_keys,
)

T = TypeVar("T")

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS spool (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    delivered_at REAL,
    body         BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq       INTEGER PRIMARY KEY,
    id        TEXT NOT NULL,
    error     TEXT NOT NULL,
    failed_at REAL NOT NULL,
    body      BLOB NOT NULL
);
"""
    + KEYS_SCHEMA
)

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Notification).decode


class DeadLetter(msgspec.Struct, frozen=True):
    """A spooled notification MongoDB refused after it came back."""

    seq: int
    id: str
    user_id: str | None
    error: str
    failed_at: float
    notification: dict[str, Any]


class Spool:
    """Notifications waiting for MongoDB, oldest first, bounded by bytes."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtserver-spool")
        self._db: sqlite3.Connection | None = None
        #: Mirrors of the file's state, kept on the IOLoop thread.
        self.count = 0
        self.bytes = 0
        self.dead = 0
        #: Idempotency keys recorded here during an outage.
        self.keys = 0
        #: ``add`` calls between their start and their answer.
        self.adding = 0

    @property
    def pending(self) -> int:
        """Spooled notifications, and those being spooled now."""
        return self.count + self.adding

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            db = self._db
            if db is None:
                raise StoreError("the spool is not open")
            try:
                return fn(db)
            except sqlite3.Error as err:
                if db.in_transaction:
                    db.rollback()
                raise StoreError(f"spool {self.path}: {err}") from err

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    # -- lifecycle --------------------------------------------------------

    def _connect(self) -> tuple[int, int, int, int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # Durable before the caller hears 201: a kill -9 or a power cut after
        # the answer finds the notification here at the next start.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        self._db = db
        count, size = db.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM spool"
        ).fetchone()
        (dead,) = db.execute("SELECT count(*) FROM dead_letters").fetchone()
        return int(count), int(size), int(dead), _count_keys(db)

    async def open(self) -> None:
        if self._db is not None:
            return
        try:
            counts = await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)
        except (OSError, sqlite3.Error) as err:
            raise StoreError(f"cannot open the spool {self.path}: {err}") from err
        self.count, self.bytes, self.dead, self.keys = counts

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=True)

    # -- the queue --------------------------------------------------------

    async def add(self, notifications: Sequence[Notification]) -> None:
        """Journal ``notifications`` durably, or raise ``StoreError`` (full,
        or the disk refused); an id spooled already is kept once."""
        rows = [(n.id, n.delivered_at, _encode(n)) for n in notifications]
        size = sum(len(body) for _, _, body in rows)
        if self.bytes + size > self.max_bytes:
            raise StoreError(
                f"mongodb is unreachable and the local spool is full"
                f" ({self.bytes} of store.spool_max_bytes {self.max_bytes})"
            )

        def write(db: sqlite3.Connection) -> int:
            db.execute("BEGIN")
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO spool (id, delivered_at, body) VALUES (?, ?, ?)", rows
            )
            added = db.total_changes - before
            db.execute("COMMIT")
            return added

        self.adding += len(rows)
        self.bytes += size  # reserved now, so concurrent adds respect the bound
        try:
            added = await self._run(write)
        except BaseException:
            self.bytes -= size
            raise
        finally:
            self.adding -= len(rows)
        self.count += added

    async def peek(self, limit: int) -> list[tuple[int, Notification]]:
        """The oldest ``limit`` spooled notifications, with their delivered marks."""

        def read(db: sqlite3.Connection) -> list[tuple[int, float | None, bytes]]:
            return db.execute(
                "SELECT seq, delivered_at, body FROM spool ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()

        out = []
        for seq, delivered_at, body in await self._run(read):
            n = _decode(body)
            if delivered_at is not None and n.delivered_at is None:
                n.delivered_at = delivered_at
            out.append((seq, n))
        return out

    async def remove(self, seqs: Sequence[int], dead: Sequence[tuple[int, str]] = ()) -> None:
        """Drop ``seqs`` (written to MongoDB) and move ``dead`` (seq, error)
        to the dead letters, in one transaction."""
        now = time.time()
        errors = dict(dead)
        gone = [*seqs, *errors]

        def work(db: sqlite3.Connection) -> tuple[int, int]:
            db.execute("BEGIN")
            if errors:
                db.executemany(
                    "INSERT OR REPLACE INTO dead_letters (seq, id, error, failed_at, body)"
                    " SELECT seq, id, ?, ?, body FROM spool WHERE seq = ?",
                    [(error, now, seq) for seq, error in errors.items()],
                )
            removed = size = 0
            for start in range(0, len(gone), 500):
                chunk = gone[start : start + 500]
                marks = ",".join("?" * len(chunk))
                (part,) = db.execute(
                    f"SELECT coalesce(sum(length(body)), 0) FROM spool WHERE seq IN ({marks})",
                    chunk,
                ).fetchone()
                size += int(part)
                removed += db.execute(f"DELETE FROM spool WHERE seq IN ({marks})", chunk).rowcount
            db.execute("COMMIT")
            return removed, size

        removed, size = await self._run(work)
        self.count -= removed
        self.bytes -= size
        self.dead += len(errors)

    async def mark_delivered(self, ids: Sequence[str], at: float) -> set[str]:
        """Set ``delivered_at`` (where unset) on those of ``ids`` still
        spooled; returns them."""
        return await self._set_delivered(ids, "coalesce(delivered_at, ?)", [at])

    async def mark_undelivered(self, ids: Sequence[str]) -> set[str]:
        """Clear ``delivered_at`` on those of ``ids`` still spooled; returns them."""
        return await self._set_delivered(ids, "NULL", [])

    async def _set_delivered(self, ids: Sequence[str], value: str, params: list[Any]) -> set[str]:
        def work(db: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            db.execute("BEGIN")
            for start in range(0, len(ids), 500):
                chunk = list(ids[start : start + 500])
                marks = ",".join("?" * len(chunk))
                found.update(
                    row[0]
                    for row in db.execute(
                        f"UPDATE spool SET delivered_at = {value} WHERE id IN ({marks}) RETURNING id",
                        [*params, *chunk],
                    ).fetchall()
                )
            db.execute("COMMIT")
            return found

        if not self.count:
            return set()
        return await self._run(work)

    # -- dead letters -----------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT seq, id, error, failed_at, body FROM dead_letters ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        )
        out = []
        for seq, nid, error, failed_at, body in rows:
            n = _decode(body)
            out.append(DeadLetter(seq, nid, n.user_id, error, failed_at, n.to_wire()))
        return out

    async def forget_dead_letter(self, seq: int) -> bool:
        """An operator has dealt with it: remove it. False when there was none."""
        removed = await self._run(
            lambda db: db.execute("DELETE FROM dead_letters WHERE seq = ?", (seq,)).rowcount
        )
        self.dead -= removed
        return bool(removed)

    # -- idempotency keys accepted during the outage ---------------------

    async def claim_keys(
        self, records: Sequence[KeyRecord], now: float, lease: float
    ) -> list[Claim]:
        def work(db: sqlite3.Connection) -> tuple[list[Claim], int]:
            return claim_keys(db, records, now, lease), _count_keys(db)

        claims, self.keys = await self._run(work)
        return claims

    async def finish_keys(self, answers: Sequence[tuple[str, int, bytes]]) -> None:
        await self._run(lambda db: finish_keys(db, answers))

    async def release_keys(self, keys: Sequence[str]) -> None:
        await self._run(lambda db: release_keys(db, keys))

    async def take_keys(self, limit: int) -> list[KeyRecord]:
        """Keys recorded here during an outage, for copying to MongoDB."""
        rows = await self._run(
            lambda db: db.execute(
                "SELECT key, fingerprint, ids, status, body, claimed_at, expires_at"
                " FROM idempotency_keys ORDER BY claimed_at LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [KeyRecord.from_row(row) for row in rows]

    async def drop_keys(self, keys: Sequence[str]) -> None:
        def work(db: sqlite3.Connection) -> int:
            db.executemany("DELETE FROM idempotency_keys WHERE key = ?", [(k,) for k in keys])
            return _count_keys(db)

        self.keys = await self._run(work)


def _count_keys(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM idempotency_keys").fetchone()[0])
