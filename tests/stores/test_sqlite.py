"""The store suite on the embedded SQLite backend, plus what is SQLite's own."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from rtserver.protocol import Notification
from rtserver.stores import sqlite as sqlite_store
from rtserver.stores.base import StoreError
from rtserver.stores.sqlite import SQLiteStore

from ..conftest import StartServer
from .suite import StoreSuite, note


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "sub" / "rt.db")
    await s.open()
    yield s
    await s.close()


class TestSQLiteStore(StoreSuite):
    async def test_file_is_in_wal_mode(self, store: SQLiteStore) -> None:
        """The database file is created under its directory in WAL mode."""
        assert store.path.exists()
        with sqlite3.connect(store.path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    @pytest.mark.parametrize(
        ("sql", "index"),
        [
            (
                "SELECT * FROM notifications WHERE user_id = 'u' AND read = 0 ORDER BY id DESC LIMIT 50",
                "notifications_user_read_id",
            ),
            (
                "SELECT count(*) FROM notifications WHERE user_id = 'u' AND read = 0",
                "notifications_user_read_id",
            ),
            (
                "SELECT * FROM notifications WHERE user_id = 'u' AND delivered_at IS NULL ORDER BY id ASC LIMIT 500",
                "notifications_undelivered",
            ),
            (
                "SELECT id FROM notifications WHERE id < '0a' AND created_at < 5 LIMIT 5000",
                "USING PRIMARY KEY (id<?)",
            ),
            (
                "SELECT id FROM notifications WHERE read_at IS NOT NULL AND read_at < 5 LIMIT 5000",
                "notifications_read_at",
            ),
        ],
    )
    async def test_queries_use_indexes(self, store: SQLiteStore, sql: str, index: str) -> None:
        """The user, unread, undelivered and retention queries are served by
        indexes or the primary key (EXPLAIN QUERY PLAN)."""
        with sqlite3.connect(store.path) as db:
            plan = " ".join(row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + sql))
        assert index in plan, plan

    async def test_a_page_costs_the_same_however_long_the_history(self, store: SQLiteStore) -> None:
        """History, paging before an id, resuming after one and the unread list
        each take about as many SQLite steps for a user with 3,000 rows as for
        one with 30: pages are read along the user index, never by sorting
        the user's whole history (counted with a progress handler)."""
        for user, count in (("long", 3_000), ("short", 30)):
            rows = [note(user, str(i)) for i in range(count)]
            assert await store.insert_many(rows) == [None] * count
            await store.mark_read(user, [n.id for n in rows[::2]], time.time())  # both read values
        mids = {user: (await store.history(user, limit=20))[10].id for user in ("long", "short")}
        reads: dict[str, Callable[[str], Awaitable[list[Notification]]]] = {
            "history": lambda u: store.history(u, limit=10),
            "unread": lambda u: store.history(u, unread_only=True, limit=10),
            "before": lambda u: store.history(u, before=mids[u], limit=5),
            "after": lambda u: store.after(u, mids[u], limit=5),
        }
        for name, read in reads.items():
            steps: dict[str, int] = {}
            for user in ("long", "short"):
                counted = 0

                def tick() -> int:
                    nonlocal counted
                    counted += 1
                    return 0  # go on

                await store._run(lambda db: db.set_progress_handler(tick, 100))
                page = await read(user)
                await store._run(lambda db: db.set_progress_handler(None, 0))
                assert page, name
                steps[user] = counted
            assert steps["long"] <= 2 * steps["short"] + 2, (name, steps)

    async def test_purge_lets_writes_in_between_its_steps(
        self, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A purge deletes ``_PURGE_CHUNK`` rows at a time, so a write made while
        it runs is answered before it ends; every expired row still goes, of
        both kinds, and nothing else does."""
        monkeypatch.setattr(sqlite_store, "_PURGE_CHUNK", 100)
        now = time.time()
        old = [note("p", "old", created_at=now - 1_000) for _ in range(1_050)]
        read = [note("p", "read") for _ in range(230)]
        assert await store.insert_many([*old, *read]) == [None] * 1_280
        await store.mark_read("p", [n.id for n in read], now - 200)
        order: list[str] = []

        async def purge() -> int:
            removed = await store.purge(now, retention=500, read_retention=100)
            order.append("purge")
            return removed

        async def write() -> None:
            await asyncio.sleep(0)  # once the purge's first step is on its way
            await store.insert(note("p", "new"))
            order.append("write")

        removed, _ = await asyncio.gather(purge(), write())
        assert removed == 1_280
        assert order == ["write", "purge"]
        assert [n.message for n in await store.history("p")] == ["new"]

    async def test_retention_reads_the_id_range_and_never_deletes_early(
        self, store: SQLiteStore
    ) -> None:
        """Age retention walks the primary key up to the cutoff's millisecond
        (no index on created_at to write for every row; the plan is checked
        above), and checks created_at: a row whose id is older than its
        created_at is kept."""
        now = time.time()
        early_id = note("p", created_at=now - 1_000).id
        young = Notification(id=early_id, user_id="p", message="young", created_at=now)
        old = note("p", "old", created_at=now - 1_000)
        await store.insert_many([young, old])
        assert await store.purge(now, retention=500, read_retention=None) == 1
        assert [n.message for n in await store.history("p")] == ["young"]
        indexes = await store._run(
            lambda db: db.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
        )
        assert "notifications_created" not in {name for (name,) in indexes}

    async def test_open_drops_the_index_earlier_versions_wrote(self, tmp_path: Path) -> None:
        """A file made by an earlier version loses its created_at index at
        open (logged as store.index_dropped), and keeps its rows."""
        path = tmp_path / "old.db"
        first = SQLiteStore(path)
        await first.open()
        await first.insert(note("u", "kept"))
        await first.close()
        with sqlite3.connect(path) as db:
            db.execute("CREATE INDEX notifications_created ON notifications (created_at)")
        again = SQLiteStore(path)
        with capture_logs() as logs:
            await again.open()
        try:
            assert [(e["event"], e.get("index")) for e in logs] == [
                ("store.index_dropped", "notifications_created")
            ]
            assert [n.message for n in await again.history("u")] == ["kept"]
        finally:
            await again.close()
        with sqlite3.connect(path) as db:
            names = {n for (n,) in db.execute("SELECT name FROM sqlite_master")}
        assert "notifications_created" not in names

    async def test_sql_runs_off_the_ioloop(self, store: SQLiteStore) -> None:
        """Store work happens on the store's own thread, so the loop keeps turning."""
        seen: list[str] = []
        original = store._run

        async def spy(fn: Callable[[sqlite3.Connection], Any]) -> Any:
            def traced(db: sqlite3.Connection) -> Any:
                seen.append(threading.current_thread().name)
                return fn(db)

            return await original(traced)

        store._run = spy  # type: ignore[method-assign]
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.get_running_loop().create_task(ticker())
        await asyncio.gather(*(store.insert(note("u")) for _ in range(2000)))
        await store.history("u")
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)  # the ticker ends before the loop does
        assert seen and all(name.startswith("rtserver-sqlite") for name in seen)
        assert ticks > 1

    async def test_a_bad_row_fails_only_its_own_call(self, store: SQLiteStore) -> None:
        """Calls queued together share a transaction, yet each fails or not on
        its own: a body that cannot be encoded (only a Notification built by
        hand can have one) costs no other caller its write and leaves no
        transaction open."""
        first = note("d", "first")
        assert await store.insert_many([first]) == [None]
        unencodable = note("d", "bad", thing=object())
        bad_errors, good_errors = await asyncio.gather(
            store.insert_many([note("d", "beside the bad row"), unencodable]),
            store.insert_many([note("d", "good") for _ in range(3)]),
        )
        assert all(isinstance(e, StoreError) and "cannot store" in str(e) for e in bad_errors)
        assert good_errors == [None] * 3
        stored = sorted(n.message for n in await store.history("d"))
        assert stored == ["first", "good", "good", "good"]
        assert await store.insert_many([note("d", "after")]) == [None]

    async def test_a_failing_store_fails_a_shared_write_once(self, store: SQLiteStore) -> None:
        """When the store itself refuses the write (here a read-only
        connection), the calls sharing the transaction all get the error at
        once: no call-by-call retry, which would wait out every group in turn."""
        begins: list[str] = []

        def watch(db: sqlite3.Connection) -> None:
            db.execute("PRAGMA query_only = 1")
            db.set_trace_callback(lambda sql: begins.append(sql) if sql == "BEGIN" else None)

        await store._run(watch)
        results = await asyncio.gather(
            store.insert_many([note("r", "one")]), store.insert_many([note("r", "two")])
        )
        assert [type(e) for errors in results for e in errors] == [StoreError, StoreError]
        assert "readonly" in str(results[0][0])
        assert begins == ["BEGIN"]

    async def test_unset_times_are_null_and_set_ones_exact(self, store: SQLiteStore) -> None:
        """Rows are bound without None or bytes (``_SHAPES``): an unset time
        is still SQL NULL, which the partial indexes select on, a set one
        the exact float, and the body a BLOB as before."""
        plain = note("t", "plain")
        done = msgspec.structs.replace(
            note("t", "done"), read=True, read_at=1_700_000_000.123456, delivered_at=1_700_000_000.5
        )
        assert await store.insert_many([plain, done]) == [None, None]
        with closing(sqlite3.connect(store.path)) as db:
            rows = db.execute(
                "SELECT id, typeof(read_at), read_at, typeof(delivered_at), delivered_at,"
                " typeof(body) FROM notifications ORDER BY id"
            ).fetchall()
            undelivered = db.execute(
                "SELECT id FROM notifications INDEXED BY notifications_undelivered"
                " WHERE user_id = 't' AND delivered_at IS NULL"
            ).fetchall()
        assert rows == [
            (plain.id, "null", None, "null", None, "blob"),
            (done.id, "real", 1_700_000_000.123456, "real", 1_700_000_000.5, "blob"),
        ]
        assert undelivered == [(plain.id,)]
        assert await store.get("t", done.id) == done

    async def test_checkpoints_wait_until_the_callers_are_answered(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every ``_CHECKPOINT_ROWS`` inserted rows the WAL is copied into the
        database file, but only once the callers of the write that crossed
        the mark have their answer: they never wait for the fsyncs."""
        monkeypatch.setattr(sqlite_store, "_CHECKPOINT_ROWS", 100)
        s = SQLiteStore(tmp_path / "c.db")
        await s.open()
        empty = s.path.stat().st_size
        started, release = threading.Event(), threading.Event()
        real = s._wal_checkpoint

        def held(db: sqlite3.Connection) -> None:
            started.set()
            release.wait(10)
            real(db)

        monkeypatch.setattr(s, "_wal_checkpoint", held)
        loop = asyncio.get_running_loop()
        try:
            written = await asyncio.wait_for(s.insert_many([note("c") for _ in range(150)]), 5)
            assert written == [None] * 150
            assert await loop.run_in_executor(None, started.wait, 5)
            assert s.path.stat().st_size == empty  # every row is still in the WAL
            writer = s._writer
            assert writer is not None  # on the held checkpoint
        finally:
            release.set()
        await asyncio.wait_for(writer, 5)
        assert s.path.stat().st_size > empty
        assert await s.unread_count("c") == 150
        await s.close()

    async def test_close_flushes_pending_inserts(self, tmp_path: Path) -> None:
        """Inserts queued when close() starts are written, not dropped."""
        s = SQLiteStore(tmp_path / "f.db")
        await s.open()
        tasks = [asyncio.ensure_future(s.insert(note("f"))) for _ in range(50)]
        await asyncio.sleep(0)
        await s.close()
        await asyncio.gather(*tasks)
        again = SQLiteStore(tmp_path / "f.db")
        await again.open()
        assert await again.unread_count("f") == 50
        await again.close()


async def test_retention_cleanup_runs_periodically(start_server) -> None:  # type: ignore[no-untyped-def]
    """The server purges notifications past retention on its cleanup interval."""
    srv = await start_server(store={"cleanup_interval": 0.05, "retention_days": 1})
    old = note("old", created_at=time.time() - 3 * 86400)
    await srv.hub.store.insert(old)
    for _ in range(100):
        if await srv.hub.store.get("old", old.id) is None:
            break
        await asyncio.sleep(0.02)
    assert await srv.hub.store.get("old", old.id) is None


async def test_a_long_purge_is_not_started_twice_and_stops_with_the_server(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cleanup that outlasts its interval is not started again on the next
    ticks, and stopping the server cancels it between two steps, each of
    which stays committed."""
    monkeypatch.setattr(sqlite_store, "_PURGE_CHUNK", 10)
    calls = 0
    purge, step = SQLiteStore.purge, SQLiteStore._run

    async def counted(
        self: SQLiteStore, now: float, retention: float, read_retention: float | None
    ) -> int:
        nonlocal calls
        calls += 1
        return await purge(self, now, retention, read_retention)

    async def slow_step(self: SQLiteStore, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        await asyncio.sleep(0.01)  # each step outlasts the cleanup interval
        return await step(self, fn)

    monkeypatch.setattr(SQLiteStore, "purge", counted)
    monkeypatch.setattr(SQLiteStore, "_run", slow_step)
    srv = await start_server(store={"cleanup_interval": 0.01, "retention_days": 1})
    store = srv.hub.store
    assert isinstance(store, SQLiteStore)
    old = [note("old", created_at=time.time() - 3 * 86400) for _ in range(400)]
    assert await store.insert_many(old) == [None] * 400
    for _ in range(200):
        if len(await store.history("old", limit=500)) < 400:
            break
    assert 0 < len(await store.history("old", limit=500)) < 400  # under way
    await asyncio.sleep(0.1)  # ten ticks
    assert calls == 1  # and no second purge
    await srv.stop()
    monkeypatch.undo()
    reopened = SQLiteStore(store.path)
    await reopened.open()
    left = len(await reopened.history("old", limit=500))
    await reopened.close()
    assert 0 < left < 400  # stopped part way, the steps before it kept
