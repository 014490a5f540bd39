"""The WebSocket protocol at /ws, driven over a real socket."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from rtserver.client import Client, ClientError

from .conftest import Running, StartServer, hold_writes


async def raw_reply(client: Client, text: str) -> dict[str, Any]:
    await client.send_raw(text)
    return await client.next(timeout=5)


class TestRegister:
    async def test_ack_carries_user_session_and_unread(self, server: Running) -> None:
        """register answers with user_id, session_id and the unread count."""
        await server.hub.save_notification("alice", {"message": "one"})
        client = await server.connect()
        ack = await client.register(server.token("alice"))
        assert ack["user_id"] == "alice"
        assert ack["unread_count"] == 1
        assert ack["session_id"] in server.hub.get_user_sessions("alice")

    async def test_events_before_register_are_refused(self, server: Running) -> None:
        """Any user event before register gets not_registered."""
        client = await server.connect()
        with pytest.raises(ClientError) as err:
            await client.request("get_notifications")
        assert err.value.code == "not_registered"

    @pytest.mark.parametrize("bad", ["garbage", "a.b.c"])
    async def test_bad_token_is_unauthorized(self, server: Running, bad: str) -> None:
        """A malformed or forged token gets unauthorized and no session."""
        client = await server.connect()
        with pytest.raises(ClientError) as err:
            await client.register(bad)
        assert err.value.code == "unauthorized"
        assert server.hub.get_user_sessions("alice") == []

    async def test_expired_token_is_unauthorized(self, server: Running) -> None:
        """An expired token is refused with a message saying so."""
        client = await server.connect()
        with pytest.raises(ClientError) as err:
            await client.register(server.token("alice", ttl=-60))
        assert err.value.code == "unauthorized"
        assert "expired" in err.value.message

    async def test_register_twice_is_refused(self, server: Running) -> None:
        """A connection registers once."""
        client = await server.user("alice")
        with pytest.raises(ClientError) as err:
            await client.register(server.token("alice"))
        assert err.value.code == "already_registered"


class TestOfflineDelivery:
    async def test_stored_notifications_arrive_oldest_first_after_ack(
        self, server: Running
    ) -> None:
        """Notifications sent while offline are pushed after register, oldest first."""
        for i in range(3):
            await server.hub.send_notification("bob", {"message": f"m{i}"})
        client = await server.connect()
        await client.register(server.token("bob"))
        got = [(await client.next("notification"))["message"] for _ in range(3)]
        assert got == ["m0", "m1", "m2"]

    async def test_delivered_notifications_are_not_replayed(self, server: Running) -> None:
        """What a session received is not pushed again at the next register."""
        first = await server.user("bob")
        await server.hub.send_notification("bob", {"message": "live"})
        assert (await first.next("notification"))["message"] == "live"
        await asyncio.sleep(0.05)  # delivered_at is written in the background
        await first.close()
        await server.hub.send_notification("bob", {"message": "missed"})
        second = await server.user("bob")
        assert (await second.next("notification"))["message"] == "missed"
        await asyncio.sleep(0.1)
        assert second.pending() == []

    async def test_last_id_resumes_after_that_id(self, server: Running) -> None:
        """With last_id the server pushes every notification after it, delivered or not."""
        client = await server.user("carol")
        ids = []
        for i in range(4):
            result = await server.hub.send_notification("carol", {"message": f"m{i}"})
            ids.append(result.notification.id)
        await client.close()
        resumed = await server.user("carol", last_id=ids[1])
        got = [(await resumed.next("notification"))["id"] for _ in range(2)]
        assert got == ids[2:]

    async def test_resume_sees_a_push_still_being_written(
        self, server: Running, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A notification pushed live to one tab while its row is still being
        written reaches a tab that resumes with last_id meanwhile: the replay
        waits for the write instead of missing it."""
        tab = await server.user("ivy")
        first = await server.hub.send_notification("ivy", {"message": "seen"})
        assert (await tab.next("notification"))["id"] == first.notification.id
        gate = hold_writes(server, monkeypatch)
        sending = asyncio.ensure_future(server.hub.send_notification("ivy", {"message": "new"}))
        pushed = await tab.next("notification")
        assert pushed["message"] == "new" and not sending.done()
        resumed = await server.user("ivy", last_id=first.notification.id)
        await asyncio.sleep(0.05)
        assert resumed.pending() == []
        gate.set()
        assert (await resumed.next("notification"))["id"] == pushed["id"]
        assert (await sending).delivered == 1

    async def test_nothing_lost_between_disconnect_and_register(self, server: Running) -> None:
        """Sends racing a register are neither lost nor duplicated, and stay in order."""
        for i in range(20):
            await server.hub.send_notification("dave", {"message": f"old{i}"})
        client = await server.connect()

        async def sender() -> None:
            for i in range(20):
                await server.hub.send_notification("dave", {"message": f"new{i}"})
                await asyncio.sleep(0)

        await asyncio.gather(client.register(server.token("dave")), sender())
        got = [(await client.next("notification"))["message"] for _ in range(40)]
        assert sorted(got) == sorted(
            [f"old{i}" for i in range(20)] + [f"new{i}" for i in range(20)]
        )
        assert got[:20] == [f"old{i}" for i in range(20)]
        assert [m for m in got if m.startswith("new")] == [f"new{i}" for i in range(20)], got
        await asyncio.sleep(0.1)
        assert client.pending() == []


class TestMarkRead:
    async def test_mark_ids_read_and_tell_other_sessions(self, server: Running) -> None:
        """mark_read acks counts; the user's other sessions get a read push."""
        tab1, tab2 = await server.user("erin"), await server.user("erin")
        r1 = await server.hub.send_notification("erin", {"message": "a"})
        await server.hub.send_notification("erin", {"message": "b"})
        ack = await tab1.mark_read([r1.notification.id])
        assert ack == {"updated": 1, "unread_count": 1}
        push = await tab2.next("read")
        assert push == {"ids": [r1.notification.id], "unread_count": 1}

    async def test_mark_all_read(self, server: Running) -> None:
        """{"all": true} marks every unread notification of the caller."""
        client = await server.user("erin")
        for i in range(3):
            await server.hub.send_notification("erin", {"message": str(i)})
        assert await client.mark_read() == {"updated": 3, "unread_count": 0}
        assert await client.get_notifications(unread_only=True) == []

    async def test_only_own_notifications_change(self, server: Running) -> None:
        """Ids of another user's notifications are not marked."""
        other = await server.hub.send_notification("frank", {"message": "private"})
        client = await server.user("erin")
        ack = await client.mark_read([other.notification.id])
        assert ack["updated"] == 0
        assert (await server.hub.get_notifications_for_user("frank"))[0].read is False

    @pytest.mark.parametrize(
        "data", [{}, {"ids": ["x"], "all": True}, {"ids": "x"}, {"all": "yes"}]
    )
    async def test_bad_mark_read_is_bad_request(self, server: Running, data: dict) -> None:  # type: ignore[type-arg]
        """Neither or both of ids/all, or wrong types, get bad_request."""
        client = await server.user("erin")
        with pytest.raises(ClientError) as err:
            await client.request("mark_read", data)
        assert err.value.code == "bad_request"


class TestHistory:
    async def test_newest_first_with_limit_and_before(self, server: Running) -> None:
        """get_notifications pages newest first with limit and before."""
        client = await server.user("gina")
        ids = [
            (await server.hub.send_notification("gina", {"message": str(i)})).notification.id
            for i in range(5)
        ]
        page = await client.get_notifications(limit=2)
        assert [n["id"] for n in page] == [ids[4], ids[3]]
        page = await client.get_notifications(limit=2, before=ids[3])
        assert [n["id"] for n in page] == [ids[2], ids[1]]

    async def test_unread_only(self, server: Running) -> None:
        """unread_only leaves out what was read."""
        client = await server.user("gina")
        a = await server.hub.send_notification("gina", {"message": "a"})
        await server.hub.send_notification("gina", {"message": "b"})
        await client.mark_read([a.notification.id])
        assert [n["message"] for n in await client.get_notifications(unread_only=True)] == ["b"]

    @pytest.mark.parametrize("limit", [0, 501, -1])
    async def test_limit_out_of_range(self, server: Running, limit: int) -> None:
        """limit must be 1..500."""
        client = await server.user("gina")
        with pytest.raises(ClientError) as err:
            await client.get_notifications(limit=limit)
        assert err.value.code == "bad_request"
        assert "limit" in err.value.message


class TestPushes:
    async def test_notification_shape_keeps_extras(self, server: Running) -> None:
        """A push has id, user_id, message, type, created_at (ISO UTC), read, and extras."""
        client = await server.user("hank")
        await server.hub.send_notification(
            "hank",
            {
                "message": "Form submitted",
                "type": "success",
                "form_id": 42,
                "category": "immigration",
            },
        )
        note = await client.next("notification")
        assert note["message"] == "Form submitted"
        assert note["type"] == "success"
        assert note["user_id"] == "hank"
        assert note["read"] is False
        assert note["form_id"] == 42 and note["category"] == "immigration"
        assert note["created_at"].endswith("Z") and "T" in note["created_at"]

    async def test_broadcast_reaches_every_registered_session(self, server: Running) -> None:
        """Broadcasts carry broadcast: true and reach all users, not unregistered sockets."""
        a, b = await server.user("u1"), await server.user("u2")
        anon = await server.connect()
        n = await server.hub.send_broadcast_notification(
            {"message": "maintenance", "type": "warning"}
        )
        assert n == 2
        for c in (a, b):
            note = await c.next("notification")
            assert note["broadcast"] is True and note["message"] == "maintenance"
        await asyncio.sleep(0.05)
        assert anon.pending() == []

    async def test_direct_message_arrives_as_message_event(self, server: Running) -> None:
        """send_direct_message reaches one session as event 'message'."""
        tab1, tab2 = await server.user("ivy"), await server.user("ivy")
        assert await server.hub.send_direct_message(tab2.session_id or "", {"message": "hi"}) == 1
        assert await tab2.next("message") == {"message": "hi"}
        await asyncio.sleep(0.05)
        assert tab1.pending() == []


class TestWriteCoalescing:
    @pytest.mark.parametrize(("turns", "writes"), [(8, 2), (0, 10)])
    async def test_a_burst_goes_out_in_one_write_per_client(
        self, start_server: StartServer, turns: int, writes: int
    ) -> None:
        """Broadcasts in consecutive loop turns reach each client in order and,
        with coalescing, as one socket write per client (counted by the
        rtserver_socket_writes metric); with coalesce_turns 0, one per frame."""
        server = await start_server(server={"coalesce_turns": turns})
        clients = [await server.user(u, receipts=False) for u in ("u1", "u2")]
        await server.replays_done()
        before = server.hub.get_connection_metrics()["socket_writes_total"]
        for i in range(5):
            await server.hub.send_broadcast_notification({"message": f"m{i}"})
            await asyncio.sleep(0)
        for c in clients:
            got = [(await c.next("notification"))["message"] for _ in range(5)]
            assert got == [f"m{i}" for i in range(5)]
        after = server.hub.get_connection_metrics()["socket_writes_total"]
        assert after - before == writes

    async def test_a_long_burst_is_flushed_at_the_time_bound(
        self, start_server: StartServer
    ) -> None:
        """A loop busy in every turn (each at least 1 ms here) holds frames for
        at most coalesce_max_delay (50 ms), however many turns coalesce_turns
        allows: the first frame arrives while the burst still goes on."""
        server = await start_server(server={"coalesce_turns": 1000, "coalesce_max_delay": 0.05})
        client = await server.user("u1", receipts=False)
        await server.replays_done()
        before = server.hub.get_connection_metrics()["socket_writes_total"]
        first = asyncio.ensure_future(client.next("notification"))
        turns = 0
        while not first.done() and turns < 1000:
            await server.hub.send_broadcast_notification({"message": f"m{turns}"})
            busy_until = time.perf_counter() + 0.001
            while time.perf_counter() < busy_until:
                pass  # a turn busy for 1 ms
            turns += 1
            await asyncio.sleep(0)
        assert first.done() and first.result()["message"] == "m0"
        # Held while the burst went on (so several frames shared the write),
        # flushed at 50 ms: about 50 turns of at least 1 ms, far from 1,000.
        assert 2 <= turns <= 150
        for i in range(1, turns):
            assert (await client.next("notification"))["message"] == f"m{i}"
        writes = server.hub.get_connection_metrics()["socket_writes_total"] - before
        assert writes < turns / 2

    async def test_at_capacity_frames_wait_for_the_busy_delay(
        self, start_server: StartServer
    ) -> None:
        """Once a flush reached coalesce_busy_connections (2 here) with the
        process busy since the flush before, frames that follow within
        coalesce_busy_delay wait it out across quiet turns and reach each
        client in one write, in order; the held flush is counted."""
        server = await start_server(
            server={"coalesce_busy_delay": 0.3, "coalesce_busy_connections": 2}
        )
        clients = [await server.user(u, receipts=False) for u in ("u1", "u2")]
        await server.replays_done()
        await _busy_flush(server, clients[0], "m0")
        for c in clients:
            assert (await c.next("notification"))["message"] == "m0"
        metrics = server.hub.get_connection_metrics
        before = metrics()["socket_writes_total"]
        started = time.monotonic()
        await server.hub.send_broadcast_notification({"message": "m1"})
        await asyncio.sleep(0.05)  # quiet turns: frames would have gone out by now
        await server.hub.send_broadcast_notification({"message": "m2"})
        for c in clients:
            assert (await c.next("notification"))["message"] == "m1"
            assert (await c.next("notification"))["message"] == "m2"
        assert time.monotonic() - started >= 0.25
        assert metrics()["socket_writes_total"] - before == 2  # m1 and m2 share one each
        assert metrics()["held_flushes_total"] == 1

    @pytest.mark.parametrize("case", ["few clients", "idle", "after a pause", "off"])
    async def test_below_capacity_frames_are_not_held(
        self, start_server: StartServer, case: str
    ) -> None:
        """Nothing is held after a busy flush to fewer than
        coalesce_busy_connections clients, after a big flush by an idle
        process (a broadcast now and then), after a pause longer than
        coalesce_busy_delay, or with coalesce_busy_delay 0: the next push goes
        out at the first quiet turn."""
        server = await start_server(
            server={
                "coalesce_busy_delay": 0 if case == "off" else 0.3,
                "coalesce_busy_connections": 3 if case == "few clients" else 2,
            }
        )
        clients = [await server.user(u, receipts=False) for u in ("u1", "u2")]
        await server.replays_done()
        if case == "idle":
            await asyncio.sleep(0.2)
            await server.hub.send_broadcast_notification({"message": "m0"})
        else:
            await _busy_flush(server, clients[0], "m0")
        for c in clients:
            assert (await c.next("notification"))["message"] == "m0"
        if case == "after a pause":
            await asyncio.sleep(0.35)
        started = time.monotonic()
        await server.hub.send_notification("u1", {"message": "next"})
        assert (await clients[0].next("notification"))["message"] == "next"
        assert time.monotonic() - started < 0.2
        assert server.hub.get_connection_metrics()["held_flushes_total"] == 0

    async def test_a_close_sends_what_was_written_before_it(self, server: Running) -> None:
        """A push and a close in the same loop turn: the push arrives, then the close."""
        client = await server.user("ivy")
        await server.replays_done()
        sid = client.session_id or ""
        assert await server.hub.send_direct_message(sid, {"message": "bye"}) == 1
        assert server.hub.disconnect_session(sid, "maintenance")
        assert await client.next("message") == {"message": "bye"}
        await asyncio.wait_for(client.closed.wait(), 5)
        assert client.close_code == 1008


class TestBadInput:
    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("not json", "invalid JSON"),
            ("[1, 2]", "expected `object`"),
            ('"str"', "expected `object`"),
            ('{"data": {}}', "frame.event: required"),
            ('{"event": 5}', "frame.event"),
            ('{"event": "register", "data": []}', "data"),
            ('{"event": "x", "id": 1.5}', "frame.id"),
        ],
    )
    async def test_malformed_frames_get_bad_request_naming_the_field(
        self, server: Running, text: str, fragment: str
    ) -> None:
        """Bad frames get bad_request naming what is wrong; the connection stays up."""
        client = await server.connect()
        frame = await raw_reply(client, text)
        assert frame["event"] == "error"
        assert frame["data"]["code"] == "bad_request"
        assert fragment in frame["data"]["message"]
        ack = await client.register(server.token("ok"))
        assert ack["user_id"] == "ok"

    async def test_wrong_field_type_names_the_field(self, server: Running) -> None:
        """A wrong type inside data names the field path."""
        client = await server.user("jo")
        with pytest.raises(ClientError) as err:
            await client.request("get_notifications", {"limit": "ten"})
        assert err.value.code == "bad_request"
        assert "data.limit" in err.value.message

    async def test_unknown_event(self, server: Running) -> None:
        """An unknown event gets unknown_event with the frame's id."""
        client = await server.user("jo")
        await client.send_raw(json.dumps({"event": "nope", "id": "abc"}))
        frame = await client.next()
        assert frame == {
            "event": "error",
            "id": "abc",
            "data": {"code": "unknown_event", "message": "unknown event 'nope'"},
        }

    async def test_error_reply_keeps_id_of_invalid_frame(self, server: Running) -> None:
        """A frame that fails validation still gets its id back."""
        client = await server.connect()
        frame = await raw_reply(client, '{"event": 3, "id": 77}')
        assert frame["id"] == 77 and frame["data"]["code"] == "bad_request"

    async def test_exactly_one_reply_per_id(self, server: Running) -> None:
        """Each id gets one reply, in order, string and integer ids alike."""
        client = await server.user("kim")
        for fid in ("a", 2, "c"):
            await client.send_raw(json.dumps({"event": "get_notifications", "id": fid}))
        frames = [await client.next() for _ in range(3)]
        assert [f["id"] for f in frames] == ["a", 2, "c"]
        assert all(f["event"] == "ack" for f in frames)
        await asyncio.sleep(0.05)
        assert client.pending() == []

    async def test_binary_frames_are_refused(self, server: Running) -> None:
        """Binary frames get a clear 'unsupported' error."""
        client = await server.connect()
        await client.send_raw(b"\x00\x01", binary=True)
        frame = await client.next()
        assert frame["data"]["code"] == "unsupported"

    async def test_other_sessions_do_not_notice(self, server: Running) -> None:
        """Garbage from one client does not disturb another's deliveries."""
        bad, good = await server.connect(), await server.user("lee")
        for _ in range(20):
            await bad.send_raw("{{{{")
        await server.hub.send_notification("lee", {"message": "still here"})
        assert (await good.next("notification"))["message"] == "still here"
        assert (await bad.next())["data"]["code"] == "bad_request"


async def _busy_flush(server: Running, u1: Client, message: str) -> None:
    """Flush, keep the process busy for 0.15 s, then broadcast ``message``:
    its flush finds the process at capacity since the flush before."""
    await server.hub.send_notification("u1", {"message": "warm-up"})
    assert (await u1.next("notification"))["message"] == "warm-up"  # flushed
    busy_until = time.perf_counter() + 0.15
    while time.perf_counter() < busy_until:
        pass  # one loop turn of 0.15 s of CPU
    await server.hub.send_broadcast_notification({"message": message})
