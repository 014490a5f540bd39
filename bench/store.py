"""What a stored notification costs, against how many the store already holds:

    python -m bench.store [--held 0,250000,1000000] [--rows 100000]
                          [--mongodb-uri URI]

The per-user and HTTP figures of ``python -m bench`` start from an empty
store. A deployment keeps its history (``store.retention_days``), and an
insert into a big B-tree costs more than into a small one: the user index is
keyed by user, so every row lands on a random leaf page, and once the index
has more pages than a write has rows, each row dirties a page of its own,
which SQLite writes to the WAL and then again into the database file.

For each size, this fills a fresh store with that many rows (10,000 users,
through the store's own ``insert_many``, as below), then inserts ``--rows`` more as the
hub does (calls of 500, up to 20,000 rows in flight) and prints, per row: the
process's CPU (the event loop's thread and the store's together, pinned to
one CPU as the server is in ``python -m bench``), the bytes it wrote, and the
rate. Delivered rows are what per-user sends to online users store; rows not
yet delivered are what HTTP publishing to offline users stores (one more
index entry each).

With ``--mongodb-uri`` the same runs against the MongoDB backend (the named
database ``rtbench`` is dropped first); MongoDB itself then runs elsewhere,
so the CPU column is only the driver's side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rtserver.config import parse_config
from rtserver.protocol import IdGenerator, Notification
from rtserver.stores import Store, make_store

USERS = 10_000
CALL = 500  # rows per insert_many, as bench/server.py's per-user sends
WINDOW = 20_000  # rows in flight at most, the same


def notifications(ids: IdGenerator, count: int, *, delivered: bool) -> list[Notification]:
    now = time.time()
    return [
        Notification(
            id=nid,
            user_id=f"u{random.randrange(USERS)}",
            message="x" * 90,
            created_at=now,
            delivered_at=now if delivered else None,
        )
        for nid in ids.take(count)
    ]


def calls(ids: IdGenerator, rows: int, *, delivered: bool) -> list[list[Notification]]:
    return [
        notifications(ids, min(CALL, rows - start), delivered=delivered)
        for start in range(0, rows, CALL)
    ]


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def files_mb(workdir: Path) -> float:
    """The SQLite file and its WAL, in MB (nothing for MongoDB)."""
    return sum(f.stat().st_size for f in workdir.glob("rtserver.db*")) / 2**20


async def insert_all(store: Store, calls: Sequence[list[Notification]]) -> None:
    """The calls with at most ``WINDOW`` rows in flight; any row refused fails the run."""
    running: set[asyncio.Task[list[Any]]] = set()
    for call in calls:
        if len(running) * len(call) >= WINDOW:
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            check(done)
        running.add(asyncio.ensure_future(store.insert_many(call)))
    if running:
        done, _ = await asyncio.wait(running)
        check(done)


def check(done: set[asyncio.Task[list[Any]]]) -> None:
    for task in done:
        errors = [e for e in task.result() if e is not None]
        if errors:
            raise RuntimeError(f"the store refused {len(errors)} rows: {errors[0]}")


async def fill(store: Store, ids: IdGenerator, held: int) -> None:
    """``held`` delivered rows over ``USERS`` users: the history a store keeps."""
    for start in range(0, held, WINDOW):
        await insert_all(store, calls(ids, min(WINDOW, held - start), delivered=True))


def prefill(data_dir: Path, held: int) -> None:
    """A SQLite store in ``data_dir`` that already holds ``held`` rows, for a
    server to start on (``python -m bench``'s per-user row with history)."""

    async def run() -> None:
        store = make(data_dir, None)
        await store.open()
        try:
            await fill(store, IdGenerator(), held)
        finally:
            await store.close()

    asyncio.run(run())


def make(workdir: Path, mongodb_uri: str | None) -> Store:
    if mongodb_uri is None:
        store: dict[str, Any] = {"data_dir": str(workdir), "cleanup_interval": 0}
    else:
        store = {"backend": "mongodb", "uri": mongodb_uri, "database": "rtbench"}
    return make_store(parse_config({"store": store, "auth": {"secret": "s" * 32}}).store)


async def drop(mongodb_uri: str) -> None:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_uri)
    try:
        await client.drop_database("rtbench")
    finally:
        await client.close()


async def measure(
    workdir: Path, held: int, rows: int, *, delivered: bool, mongodb_uri: str | None = None
) -> dict[str, Any]:
    """Fill a fresh store with ``held`` rows, then time ``rows`` more."""
    if mongodb_uri is not None:
        await drop(mongodb_uri)
    store = make(workdir, mongodb_uri)
    await store.open()
    ids = IdGenerator()
    try:
        await fill(store, ids, held)
        # The rows are made before the clock starts: that is the hub's work.
        timed = calls(ids, rows, delivered=delivered)
        cpu0, bytes0, t0 = os.times(), written_bytes(), time.perf_counter()
        await insert_all(store, timed)
        took = time.perf_counter() - t0
        cpu1, bytes1 = os.times(), written_bytes()
    finally:
        await store.close()
    cpu = cpu1.user - cpu0.user + cpu1.system - cpu0.system
    return {
        "held": held,
        "rows": rows,
        "delivered": delivered,
        "rate": rows / took,
        "cpu_us": cpu / rows * 1e6,
        "bytes": (bytes1 - bytes0) / rows,
        "file_mb": files_mb(workdir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held", default="0,250000,1000000", help="sizes, comma-separated")
    parser.add_argument("--rows", type=int, default=100_000, help="rows timed at each size")
    parser.add_argument("--mongodb-uri", help="measure the MongoDB backend instead")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU to pin to (-1: none)")
    args = parser.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    backend = "sqlite" if args.mongodb_uri is None else "mongodb"
    print(f"{backend}: {args.rows:,} rows inserted in calls of {CALL}, at each size held")
    print(
        f"{'held':>10}  {'rows':<11}  {'rows/s':>8}  {'CPU µs/row':>10}  "
        f"{'bytes/row':>9}  {'files MB':>8}"
    )
    for held in (int(h) for h in args.held.split(",")):
        for delivered in (True, False):
            with tempfile.TemporaryDirectory(prefix="rtbench-store-") as tmp:
                r = asyncio.run(
                    measure(
                        Path(tmp),
                        held,
                        args.rows,
                        delivered=delivered,
                        mongodb_uri=args.mongodb_uri,
                    )
                )
            kind = "delivered" if delivered else "undelivered"
            if args.mongodb_uri is None:
                disk = f"{r['bytes']:>9,.0f}  {r['file_mb']:8.0f}"
            else:  # written by MongoDB, not here
                disk = f"{'-':>9}  {'-':>8}"
            print(
                f"{held:>10,}  {kind:<11}  {r['rate']:>8,.0f}  {r['cpu_us']:>10.1f}  {disk}",
                flush=True,
            )


if __name__ == "__main__":
    main()
