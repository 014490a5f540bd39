"""The Python API with the seed's names, sessions and metrics."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading

import pytest

from rtserver.protocol import ProtocolError
from rtserver.stores.base import StoreError

from .conftest import Running


class TestPythonAPI:
    async def test_send_notification_returns_stored_and_delivered(self, server: Running) -> None:
        """send_notification stores, pushes, and reports the sessions reached."""
        tab = await server.user("u")
        result = await server.hub.send_notification("u", {"message": "hi", "type": "success"})
        assert result.delivered == 1
        assert (await tab.next("notification"))["id"] == result.notification.id
        stored = await server.hub.get_notifications_for_user("u")
        assert [n.id for n in stored] == [result.notification.id]
        notification, delivered = result  # unpacks as the NamedTuple it was
        assert (notification, delivered) == (result.notification, 1)
        assert not gc.is_tracked(result)  # tens of thousands a second, never in a cycle

    async def test_calls_in_one_turn_share_one_store_call(
        self, server: Running, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Concurrent send_notification calls made in the same loop turn are
        stored with one insert_many; each caller gets its own result, a live
        user's pushes keep the call order, an offline user's are stored."""
        store = server.hub.store
        calls: list[int] = []
        real_insert_many = store.insert_many

        async def counted(notifications):  # type: ignore[no-untyped-def]
            calls.append(len(notifications))
            return await real_insert_many(notifications)

        monkeypatch.setattr(store, "insert_many", counted)
        tab = await server.user("live", receipts=False)
        await server.replays_done()
        sends = [("live", "a"), ("away", "b"), ("live", "c"), ("away", "d")]
        results = await asyncio.gather(
            *(server.hub.send_notification(u, {"message": m}) for u, m in sends)
        )
        assert calls == [4]
        assert [(r.notification.user_id, r.notification.message) for r in results] == sends
        assert [r.delivered for r in results] == [1, 0, 1, 0]
        assert [(await tab.next("notification"))["message"] for _ in range(2)] == ["a", "c"]
        away = await server.hub.get_notifications_for_user("away")
        assert [n.message for n in away] == ["d", "b"]  # newest first

    async def test_a_failed_shared_store_call_fails_each_caller(self, server: Running) -> None:
        """When the shared write fails (an SQLite trigger refuses inserts),
        every caller in the turn gets StoreError, with the sessions that got
        it live: none is lost silently."""
        await server.user("live", receipts=False)
        await server.replays_done()
        with sqlite3.connect(server.hub.store.path) as db:  # type: ignore[attr-defined]
            db.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON notifications"
                " BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        results = await asyncio.gather(
            server.hub.send_notification("live", {"message": "a"}),
            server.hub.send_notification("away", {"message": "b"}),
            return_exceptions=True,
        )
        assert all(isinstance(r, StoreError) for r in results)
        assert [r.delivered for r in results] == [1, 0]  # type: ignore[union-attr]

    async def test_send_rejects_invalid_payload(self, server: Running) -> None:
        """A payload without message raises ProtocolError and stores nothing."""
        with pytest.raises(ProtocolError) as err:
            await server.hub.send_notification("u", {"type": "info"})
        assert err.value.code == "bad_request"
        assert await server.hub.get_notifications_for_user("u") == []

    async def test_save_notification_is_stored_not_pushed(self, server: Running) -> None:
        """save_notification stores only; the next register delivers it."""
        tab = await server.user("u")
        saved = await server.hub.save_notification("u", {"message": "quiet"})
        await asyncio.sleep(0.05)
        assert tab.pending() == []
        later = await server.user("u")
        assert (await later.next("notification"))["id"] == saved.id

    async def test_get_notifications_for_user_unread_only(self, server: Running) -> None:
        """get_notifications_for_user(unread_only=True) skips read ones."""
        a = await server.hub.send_notification("u", {"message": "a"})
        await server.hub.send_notification("u", {"message": "b"})
        await server.hub.mark_read("u", [a.notification.id])
        unread = await server.hub.get_notifications_for_user("u", unread_only=True)
        assert [n.message for n in unread] == ["b"]

    async def test_direct_message_to_missing_session(self, server: Running) -> None:
        """send_direct_message returns 0 for a session that is not here."""
        assert await server.hub.send_direct_message("gone", {"message": "x"}) == 0

    async def test_threadsafe_calls_hop_onto_the_loop(self, server: Running) -> None:
        """Other threads call the API through hub.threadsafe and get results."""
        tab = await server.user("t")
        results: list[object] = []

        def worker() -> None:
            fut = server.hub.threadsafe.send_notification("t", {"message": "from a thread"})
            results.append(fut.result(timeout=5).delivered)
            results.append(server.hub.threadsafe.get_user_sessions("t").result(timeout=5))

        thread = threading.Thread(target=worker)
        thread.start()
        while thread.is_alive():  # noqa: ASYNC110 (a thread, not a task)
            await asyncio.sleep(0.01)
        assert results == [1, [tab.session_id]]
        assert (await tab.next("notification"))["message"] == "from a thread"


class TestSessions:
    async def test_user_holds_many_sessions_and_closing_one_keeps_others(
        self, server: Running
    ) -> None:
        """Two tabs of a user both receive; after one closes the other still does."""
        tab1, tab2 = await server.user("multi"), await server.user("multi")
        assert set(server.hub.get_user_sessions("multi")) == {tab1.session_id, tab2.session_id}
        await tab1.close()
        for _ in range(100):
            if len(server.hub.get_user_sessions("multi")) == 1:
                break
            await asyncio.sleep(0.01)
        assert server.hub.get_user_sessions("multi") == [tab2.session_id]
        result = await server.hub.send_notification("multi", {"message": "x"})
        assert result.delivered == 1

    async def test_connection_counts(self, server: Running) -> None:
        """Current, peak and total connection counts are kept."""
        clients = [await server.connect() for _ in range(3)]
        await clients[0].close()
        for _ in range(100):
            if len(server.hub.sessions) == 2:
                break
            await asyncio.sleep(0.01)
        m = server.hub.get_connection_metrics()
        assert m["connections"] == 2
        assert m["connections_peak"] == 3
        assert m["connections_accepted_total"] == 3

    async def test_metrics_count_frames_deliveries_and_store(self, server: Running) -> None:
        """get_connection_metrics counts frames in/out, deliveries and store ops."""
        tab = await server.user("m")
        await server.hub.send_notification("m", {"message": "x"})
        await tab.next("notification")
        m = server.hub.get_connection_metrics()
        assert m["frames_in"]["register"] == 1
        assert m["frames_out"]["notification"] == 1
        assert m["deliveries"]["user"] == 1
        assert m["store_seconds"]["insert"]["count"] == 1
        assert m["registered_users"] == 1
