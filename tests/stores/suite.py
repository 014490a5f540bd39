"""The one store suite every backend runs.

A backend's test module subclasses ``StoreSuite`` and provides a ``store``
fixture that yields an opened, empty store.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from rtserver.protocol import IdGenerator, Notification, Publication
from rtserver.stores.base import Store

_ids = IdGenerator()


def note(
    user_id: str, message: str = "m", *, created_at: float | None = None, **extra: object
) -> Notification:
    nid = _ids()
    if created_at is None:
        created_at = IdGenerator.created_at(nid)
    else:
        # As every id rtserver makes: it begins with its creation millisecond.
        nid = f"{int(created_at * 1000):012x}{nid[12:]}"
    return Notification(
        id=nid,
        user_id=user_id,
        message=message,
        type="info",
        created_at=created_at,
        extra=dict(extra),
    )


def publication(topic: str, data: bytes = b"{}", *, ttl: float = 3600) -> Publication:
    pid = _ids()
    created = IdGenerator.created_at(pid)
    return Publication(topic=topic, id=pid, data=data, created_at=created, expires_at=created + ttl)


class StoreSuite:
    async def test_insert_and_get_round_trip(self, store: Store) -> None:
        """What is inserted comes back field for field, extras included."""
        n = note("u", "hello", form_id=5, nested={"a": [1, 2]})
        await store.insert(n)
        got = await store.get("u", n.id)
        assert got is not None
        assert (got.id, got.user_id, got.message, got.type, got.read) == (
            n.id,
            "u",
            "hello",
            "info",
            False,
        )
        assert got.extra == {"form_id": 5, "nested": {"a": [1, 2]}}
        assert abs(got.created_at - n.created_at) < 0.002

    async def test_get_is_scoped_to_the_user(self, store: Store) -> None:
        """get() of another user's id finds nothing."""
        n = note("u")
        await store.insert(n)
        assert await store.get("v", n.id) is None

    async def test_insert_many_stores_each(self, store: Store) -> None:
        """insert_many stores every notification and reports None for each."""
        notes = [note("many", str(i)) for i in range(120)] + [note("other")]
        assert await store.insert_many(notes) == [None] * 121
        history = await store.history("many", limit=500)
        assert [n.message for n in history] == [str(i) for i in reversed(range(120))]
        assert await store.unread_count("other") == 1

    async def test_a_stored_id_counts_as_stored_and_keeps_the_first(self, store: Store) -> None:
        """An id stored already (an earlier try landed, an idempotent retry)
        is stored, not an error, and the row stays as first written; the
        other notifications of the batch are stored as usual."""
        first = note("d", "first")
        assert await store.insert_many([first]) == [None]
        again = msgspec.structs.replace(first, message="other")
        fresh = [note("d", "fresh") for _ in range(3)]
        assert await store.insert_many([*fresh, again]) == [None] * 4
        await store.insert(again)
        found = await store.get("d", first.id)
        assert found is not None and found.message == "first"
        assert await store.unread_count("d") == 4

    async def test_concurrent_inserts_all_land(self, store: Store) -> None:
        """Many concurrent inserts are all stored (group commit loses none)."""
        notes = [note("bulk", str(i)) for i in range(300)]
        await asyncio.gather(*(store.insert(n) for n in notes))
        assert await store.unread_count("bulk") == 300

    async def test_history_newest_first_and_paging(self, store: Store) -> None:
        """history() is newest first, bounded by limit, and pages with before."""
        notes = [note("u", str(i)) for i in range(6)]
        for n in notes:
            await store.insert(n)
        page = await store.history("u", limit=4)
        assert [n.id for n in page] == [n.id for n in reversed(notes)][:4]
        page2 = await store.history("u", limit=4, before=page[-1].id)
        assert [n.id for n in page2] == [notes[1].id, notes[0].id]

    async def test_history_is_bounded(self, store: Store) -> None:
        """No query returns more than MAX_PAGE rows, whatever limit says."""
        for n in [note("big") for _ in range(5)]:
            await store.insert(n)
        assert len(await store.history("big", limit=10_000)) == 5
        assert len(await store.history("big", limit=2)) == 2

    async def test_undelivered_oldest_first_and_mark_delivered(self, store: Store) -> None:
        """undelivered() lists what no session got, oldest first; mark_delivered removes."""
        notes = [note("u", str(i)) for i in range(4)]
        for n in notes:
            await store.insert(n)
        assert [n.id for n in await store.undelivered("u")] == [n.id for n in notes]
        await store.mark_delivered([notes[0].id, notes[2].id], time.time())
        assert [n.id for n in await store.undelivered("u")] == [notes[1].id, notes[3].id]
        assert [n.id for n in await store.undelivered("u", after=notes[1].id)] == [notes[3].id]
        got = await store.get("u", notes[0].id)
        assert got is not None and got.delivered_at is not None

    async def test_mark_delivered_keeps_first_time(self, store: Store) -> None:
        """delivered_at records the first delivery only."""
        n = note("u")
        await store.insert(n)
        first = round(time.time(), 3)
        await store.mark_delivered([n.id], first)
        await store.mark_delivered([n.id], first + 5)
        got = await store.get("u", n.id)
        assert got is not None and got.delivered_at == first

    async def test_mark_delivered_scoped_to_a_user(self, store: Store) -> None:
        """With user_id, only that user's notifications are marked (client receipts)."""
        mine, theirs = note("me"), note("them")
        for n in (mine, theirs):
            await store.insert(n)
        await store.mark_delivered([mine.id, theirs.id], time.time(), user_id="me")
        assert [n.id for n in await store.undelivered("them")] == [theirs.id]
        assert await store.undelivered("me") == []

    async def test_mark_undelivered_offers_them_again(self, store: Store) -> None:
        """mark_undelivered clears delivered_at on the user's own ids only, and
        undelivered() lists them again in order; a later mark_delivered sets
        it anew."""
        notes = [note("u", str(i)) for i in range(3)]
        theirs = note("v")
        for n in [*notes, theirs]:
            await store.insert(n)
        await store.mark_delivered([*(n.id for n in notes), theirs.id], time.time())
        await store.mark_undelivered("u", [notes[2].id, notes[0].id, theirs.id, "nope"])
        assert [n.id for n in await store.undelivered("u")] == [notes[0].id, notes[2].id]
        assert await store.undelivered("v") == []
        got = await store.get("u", notes[0].id)
        assert got is not None and got.delivered_at is None
        await store.mark_delivered([notes[0].id], time.time())
        assert [n.id for n in await store.undelivered("u")] == [notes[2].id]

    async def test_after_for_resume(self, store: Store) -> None:
        """after() lists every notification after an id, delivered or not."""
        notes = [note("u", str(i)) for i in range(4)]
        for n in notes:
            await store.insert(n)
        await store.mark_delivered([n.id for n in notes], time.time())
        assert [n.id for n in await store.after("u", notes[1].id)] == [notes[2].id, notes[3].id]

    async def test_mark_read_ids_counts_and_scope(self, store: Store) -> None:
        """mark_read changes only the caller's unread ones and returns (updated, unread)."""
        mine = [note("u") for _ in range(3)]
        theirs = note("v")
        for n in [*mine, theirs]:
            await store.insert(n)
        now = round(time.time(), 3)
        assert await store.mark_read("u", [mine[0].id, theirs.id], now) == (1, 2)
        assert await store.mark_read("u", [mine[0].id], now + 1) == (0, 2)
        assert await store.unread_count("v") == 1
        got = await store.get("u", mine[0].id)
        assert got is not None and got.read and got.read_at == now

    async def test_mark_all_read(self, store: Store) -> None:
        """mark_read(None) marks all of the user's unread."""
        for n in [note("u") for _ in range(4)]:
            await store.insert(n)
        assert await store.mark_read("u", None, time.time()) == (4, 0)
        assert await store.history("u", unread_only=True) == []

    async def test_concurrent_mark_read_counts_stay_right(self, store: Store) -> None:
        """Concurrent mark_read calls and inserts never double count."""
        notes = [note("race") for _ in range(40)]
        for n in notes:
            await store.insert(n)
        results = await asyncio.gather(
            *(store.mark_read("race", [n.id for n in notes[i::4]], time.time()) for i in range(4)),
            *(store.mark_read("race", [n.id for n in notes], time.time()) for _ in range(2)),
        )
        assert sum(updated for updated, _ in results) == 40
        assert await store.unread_count("race") == 0

    async def test_purge_by_age_and_read_age(self, store: Store) -> None:
        """purge() drops old notifications and read ones past read retention."""
        now = time.time()
        old, fresh, read_old = note("p", created_at=now - 1000), note("p"), note("p")
        for n in (old, fresh, read_old):
            await store.insert(n)
        await store.mark_read("p", [read_old.id], now - 200)
        removed = await store.purge(now, retention=500, read_retention=100)
        assert removed == 2
        assert [n.id for n in await store.history("p")] == [fresh.id]

    async def test_ping(self, store: Store) -> None:
        """ping() is true while the backend answers."""
        assert await store.ping() is True

    async def test_delete_some_then_erase_all(self, store: Store) -> None:
        """delete_notifications removes the given ids of that user only, then
        with None every one of the user's; unread counts follow."""
        mine = [note("d", str(i)) for i in range(3)]
        theirs = note("e")
        await store.insert_many([*mine, theirs])
        assert await store.delete_notifications("d", [mine[0].id, theirs.id]) == (1, 2)
        assert [n.id for n in await store.history("d")] == [mine[2].id, mine[1].id]
        assert await store.delete_notifications("d", None) == (2, 0)
        assert await store.history("d") == []
        assert [n.id for n in await store.history("e")] == [theirs.id]

    async def test_topic_history_keeps_the_newest_in_order(self, store: Store) -> None:
        """Publications come back oldest first after an id, per topic; a topic
        keeps its newest ``keep`` and remembers the newest id it dropped; an
        id stored twice is stored once; data comes back byte for byte."""
        pubs = [publication("case:1", b'{"n":%d}' % i) for i in range(6)]
        other = publication("case:2", b'[1e400, "\\u0000", {"$x": 9223372036854775808}]')
        for p in pubs[:3]:
            await store.insert_publication(p, keep=4)
        await store.insert_publication(pubs[1], keep=4)  # a retry
        assert await store.trimmed("case:1") is None
        for p in pubs[3:]:
            await store.insert_publication(p, keep=4)
        await store.insert_publication(other, keep=4)
        now = time.time()
        got = await store.publications("case:1", after=None, limit=100, now=now)
        assert [p.id for p in got] == [p.id for p in pubs[2:]]
        assert got[0] == pubs[2]
        assert await store.trimmed("case:1") == pubs[1].id
        after = await store.publications("case:1", after=pubs[3].id, limit=1, now=now)
        assert [p.id for p in after] == [pubs[4].id]
        (back,) = await store.publications("case:2", after=None, limit=10, now=now)
        assert back.data == other.data
        assert await store.publications("nothing", after=None, limit=10, now=now) == []

    async def test_topic_history_expires(self, store: Store) -> None:
        """A publication past its time is not read back (and purge removes
        it where the backend does not expire it by itself)."""
        gone, kept = publication("t", ttl=-1), publication("t")
        await store.insert_publication(gone, keep=100)
        await store.insert_publication(kept, keep=100)
        now = time.time()
        assert [p.id for p in await store.publications("t", after=None, limit=10, now=now)] == [
            kept.id
        ]
        await store.purge(now, retention=10**6, read_retention=None)
        assert [p.id for p in await store.publications("t", after=None, limit=10, now=0)] in (
            [kept.id],
            [gone.id, kept.id],  # a TTL index removes it in its own time
        )
