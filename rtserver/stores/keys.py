"""Idempotency keys as both SQLite files keep them (the store and the MongoDB
spool): one row per key, claimed before the request runs and finished with
its answer. See ``rtserver.idempotency`` for what the states mean."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

KEYS_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    ids         TEXT NOT NULL,
    status      INTEGER NOT NULL DEFAULT 0,
    body        BLOB,
    claimed_at  REAL NOT NULL,
    expires_at  REAL NOT NULL
) WITHOUT ROWID;
"""

_COLUMNS = "key, fingerprint, ids, status, body, claimed_at, expires_at"


class KeyRecord(msgspec.Struct, kw_only=True):
    """One key: the request it belongs to (``fingerprint``), the ids it
    reserved, and once finished the answer given (``status`` 0: not yet)."""

    key: str
    fingerprint: str
    ids: list[str]
    claimed_at: float
    expires_at: float
    status: int = 0
    body: bytes = b""

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> KeyRecord:
        key, fingerprint, ids, status, body, claimed_at, expires_at = row
        return cls(
            key=key,
            fingerprint=fingerprint,
            ids=ids.split(",") if ids else [],
            status=int(status),
            body=bytes(body or b""),
            claimed_at=float(claimed_at),
            expires_at=float(expires_at),
        )

    def takeable(self, fingerprint: str, now: float, lease: float) -> bool:
        """An unfinished claim of the same request whose lease ran out."""
        return (
            self.status == 0 and self.fingerprint == fingerprint and self.claimed_at + lease <= now
        )

    def row(self) -> tuple[Any, ...]:
        return (
            self.key,
            self.fingerprint,
            ",".join(self.ids),
            self.status,
            self.body,
            self.claimed_at,
            self.expires_at,
        )


class Claim(msgspec.Struct, frozen=True):
    """What ``claim_keys`` found: ``new`` (the caller's record is in force:
    run), ``taken`` (an unfinished claim whose lease ran out, now the
    caller's: run again with ``record.ids``), or ``held`` (someone else's
    record: finished, still running, or for another request)."""

    state: Literal["new", "taken", "held"]
    record: KeyRecord


def claim_keys(
    db: sqlite3.Connection, records: Sequence[KeyRecord], now: float, lease: float
) -> list[Claim]:
    """Claim each of ``records`` (see ``Store.claim_keys``), in one transaction:
    one look-up for all of them, one insert for the new ones (a batch's keys
    are nearly always new), a statement each only for keys held already."""
    claims: list[Claim | None] = [None] * len(records)
    db.execute("BEGIN IMMEDIATE")
    try:
        found: dict[str, KeyRecord] = {}
        keys = [r.key for r in records]
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT {_COLUMNS} FROM idempotency_keys WHERE key IN ({marks})"
            for row in db.execute(sql, chunk):
                found[row[0]] = KeyRecord.from_row(row)
        fresh = []
        for index, record in enumerate(records):
            held = found.get(record.key)
            if held is None or held.expires_at <= now:
                fresh.append(record.row())
                claims[index] = Claim("new", record)
            elif held.takeable(record.fingerprint, now, lease):
                db.execute(
                    "UPDATE idempotency_keys SET claimed_at = ? WHERE key = ?", (now, record.key)
                )
                held.claimed_at = now
                claims[index] = Claim("taken", held)
            else:
                claims[index] = Claim("held", held)
        db.executemany(
            f"INSERT OR REPLACE INTO idempotency_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            fresh,
        )
        db.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise
    return [c for c in claims if c is not None]


def _in_one_transaction(db: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """``executemany`` as one transaction: outside one, every row of a
    500-item batch was a commit of its own (half the store thread's time under
    keyed batches)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(sql, rows)
        db.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise


def finish_keys(db: sqlite3.Connection, answers: Sequence[tuple[str, int, bytes]]) -> None:
    _in_one_transaction(
        db,
        "UPDATE idempotency_keys SET status = ?, body = ? WHERE key = ?",
        [(status, body, key) for key, status, body in answers],
    )


def release_keys(db: sqlite3.Connection, keys: Sequence[str]) -> None:
    """The runs failed before an answer worth keeping: the next retry runs at
    once (with the same ids), without waiting out the lease."""
    _in_one_transaction(
        db,
        "UPDATE idempotency_keys SET claimed_at = 0 WHERE key = ? AND status = 0",
        [(k,) for k in keys],
    )


def purge_keys(db: sqlite3.Connection, now: float) -> int:
    return int(db.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now,)).rowcount)
