"""Delivery receipts: delivered means a client confirmed it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rtserver.plugins import hookimpl

from .conftest import Running, StartServer, hold_writes


async def stored(server: Running, user_id: str, nid: str) -> dict[str, Any]:
    status, body = await server.http(
        "GET", f"/api/users/{user_id}/notifications/{nid}", token=server.token("svc", "publisher")
    )
    assert status == 200
    return body  # type: ignore[no-any-return]


async def receipts_client(server: Running, user_id: str, *, confirm: bool):  # type: ignore[no-untyped-def]
    client = await server.connect()
    client.auto_confirm = confirm
    await client.register(server.token(user_id), receipts=True)
    return client


async def test_unconfirmed_comes_again_on_next_register(server: Running) -> None:
    """Received but not confirmed, then disconnected: offered again at the next register."""
    phone = await receipts_client(server, "ana", confirm=False)
    sent = await server.hub.send_notification("ana", {"message": "hearing moved"})
    assert (await phone.next("notification"))["id"] == sent.notification.id
    await asyncio.sleep(0.05)
    assert (await stored(server, "ana", sent.notification.id))["delivered"] is False
    await phone.close()
    again = await receipts_client(server, "ana", confirm=True)
    assert (await again.next("notification"))["id"] == sent.notification.id
    for _ in range(100):
        if (await stored(server, "ana", sent.notification.id))["delivered"]:
            break
        await asyncio.sleep(0.02)
    body = await stored(server, "ana", sent.notification.id)
    assert body["delivered"] is True and body["delivered_at"].endswith("Z")


async def test_confirmed_never_comes_again(server: Running) -> None:
    """Once confirmed, a notification is not pushed at later registers."""
    tab = await receipts_client(server, "ben", confirm=True)
    sent = await server.hub.send_notification("ben", {"message": "x"})
    await tab.next("notification")
    for _ in range(100):
        if (await stored(server, "ben", sent.notification.id))["delivered"]:
            break
        await asyncio.sleep(0.02)
    await tab.close()
    later = await receipts_client(server, "ben", confirm=True)
    await asyncio.sleep(0.2)
    assert later.pending() == []
    assert server.hub.get_connection_metrics()["receipts_confirmed_total"] == 1


async def test_drop_between_write_and_receipt_loses_nothing(server: Running) -> None:
    """The connection dies after the write and before the receipt: nothing is lost."""
    doomed = await receipts_client(server, "cy", confirm=False)
    ids = [
        (await server.hub.send_notification("cy", {"message": str(i)})).notification.id
        for i in range(5)
    ]
    for _ in ids:
        await doomed.next("notification")
    doomed.ws.protocol._abort()  # the network goes away
    await asyncio.sleep(0.1)
    back = await receipts_client(server, "cy", confirm=True)
    got = [(await back.next("notification"))["id"] for _ in ids]
    assert got == ids
    await doomed.close()


async def test_resent_to_other_receipts_session_after_timeout(start_server: StartServer) -> None:
    """Unconfirmed past receipt_timeout: pushed to the user's other receipts-session
    (here one that resumed past it with last_id, so offline delivery skipped it),
    with the same id; the client drops any duplicate."""
    srv = await start_server(server={"receipt_timeout": 0.2})
    silent = await receipts_client(srv, "dee", confirm=False)
    sent = await srv.hub.send_notification("dee", {"message": "x"})
    await silent.next("notification")
    other = await srv.connect()
    await other.register(srv.token("dee"), last_id=sent.notification.id, receipts=True)
    note = await other.next("notification", timeout=3)
    assert note["id"] == sent.notification.id
    assert srv.hub.get_connection_metrics()["receipts_resent_total"] >= 1
    await asyncio.sleep(0.5)
    assert other.pending() == []  # any further copy was dropped as a duplicate


async def test_sessions_without_receipts_behave_as_before(server: Running) -> None:
    """Without receipts, written means delivered (no confirmation needed)."""
    tab = await server.connect()
    await tab.register(server.token("eve"), receipts=False)
    sent = await server.hub.send_notification("eve", {"message": "x"})
    await tab.next("notification")
    for _ in range(100):
        if (await stored(server, "eve", sent.notification.id))["delivered"]:
            break
        await asyncio.sleep(0.02)
    assert (await stored(server, "eve", sent.notification.id))["delivered"] is True


async def test_confirming_someone_elses_id_changes_nothing(server: Running) -> None:
    """A receipt for another user's notification does not mark it delivered."""
    victim = await server.hub.send_notification("vic", {"message": "private"})
    attacker = await receipts_client(server, "att", confirm=False)
    assert await attacker.request("received", {"ids": [victim.notification.id]}) == {"confirmed": 0}
    await asyncio.sleep(0.05)
    assert (await stored(server, "vic", victim.notification.id))["delivered"] is False


async def test_visible_state_and_owner_access(server: Running) -> None:
    """delivered_at/read_at in history; the owner may ask, others may not; 404 for unknown."""
    tab = await server.user("fay")
    sent = await server.hub.send_notification("fay", {"message": "x"})
    await tab.next("notification")
    await tab.mark_read([sent.notification.id])
    for _ in range(100):
        notes = await tab.get_notifications()
        if notes[0]["delivered_at"]:
            break
        await asyncio.sleep(0.02)
    assert notes[0]["delivered_at"] and notes[0]["read_at"]
    own = await server.http(
        "GET", f"/api/users/fay/notifications/{sent.notification.id}", token=server.token("fay")
    )
    assert own[0] == 200 and own[1]["read"] is True
    assert (
        await server.http(
            "GET", f"/api/users/fay/notifications/{sent.notification.id}", token=server.token("x")
        )
    )[0] == 403
    assert (
        await server.http("GET", "/api/users/fay/notifications/nope", token=server.token("fay"))
    )[0] == 404


async def test_delivered_hook(start_server: StartServer) -> None:
    """Plugins hear about deliveries: confirmed ones with their session."""
    heard: list[tuple[str, list[str], bool]] = []

    class Listener:
        @hookimpl
        def rtserver_delivered(self, user_id: str, ids: list[str], connection: Any) -> None:
            heard.append((user_id, ids, connection is not None))

    srv = await start_server(extra_plugins=[("listener", Listener())])
    tab = await receipts_client(srv, "gus", confirm=True)
    sent = await srv.hub.send_notification("gus", {"message": "x"})
    await tab.next("notification")
    for _ in range(100):
        if heard:
            break
        await asyncio.sleep(0.02)
    assert heard == [("gus", [sent.notification.id], True)]
    plain = await srv.connect()
    await plain.register(srv.token("hal"), receipts=False)
    written = await srv.hub.send_notification("hal", {"message": "y"})
    for _ in range(100):
        if len(heard) == 2:
            break
        await asyncio.sleep(0.02)
    assert heard[1] == ("hal", [written.notification.id], False)


async def test_confirmation_before_the_row_is_written_still_marks_it(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push goes out before its row is written, so a quick client can confirm
    first: the mark waits for the row instead of updating nothing."""
    phone = await receipts_client(server, "cy", confirm=True)
    gate = hold_writes(server, monkeypatch)
    sending = asyncio.ensure_future(server.hub.send_notification("cy", {"message": "fast"}))
    pushed = await phone.next("notification")
    await asyncio.sleep(0.05)  # the confirmation has arrived; the row is not written
    assert not sending.done()
    gate.set()
    assert (await sending).notification.id == pushed["id"]
    for _ in range(100):
        if (await stored(server, "cy", pushed["id"]))["delivered"]:
            break
        await asyncio.sleep(0.02)
    assert (await stored(server, "cy", pushed["id"]))["delivered"] is True


async def test_confirmed_on_another_node_before_the_row_is_written(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a cluster another node's session can confirm a notification (its
    mark finding no row yet) while this node still writes it. The settled
    message this node then gets makes it mark the row itself once written.
    The other node is stood in for: its mark on the shared store and the
    ``settled_elsewhere`` call its broker message makes (the Redis path is
    covered in test_cluster.py)."""
    phone = await receipts_client(server, "dee", confirm=False)
    gate = hold_writes(server, monkeypatch)
    sending = asyncio.ensure_future(server.hub.send_notification("dee", {"message": "both"}))
    nid = (await phone.next("notification"))["id"]
    await server.hub.store.mark_delivered([nid], 1.0, user_id="dee")  # no row yet: nothing
    server.hub.settled_elsewhere("dee", [nid])
    await asyncio.sleep(0.05)
    assert not sending.done()
    gate.set()
    await sending
    for _ in range(100):
        if (await stored(server, "dee", nid))["delivered"]:
            break
        await asyncio.sleep(0.02)
    assert (await stored(server, "dee", nid))["delivered"] is True
