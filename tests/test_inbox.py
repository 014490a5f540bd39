"""The inbox over HTTP, for a server-rendered page, an email link or a
privacy request: unread count, mark read, delete one, erase all, export; the
user's live sessions are told."""

from __future__ import annotations

import json

from .conftest import Running


async def test_unread_count_and_mark_read_tell_live_sessions(server: Running) -> None:
    tab = await server.user("ann", receipts=False)
    publisher = server.token("svc", "publisher")
    ids = [
        (await server.http("POST", "/api/notifications/ann", {"message": str(i)}, token=publisher))[
            1
        ]["notification"]["id"]
        for i in range(3)
    ]
    for _ in ids:
        await tab.next("notification")
    status, body = await server.http(
        "GET", "/api/users/ann/unread_count", token=server.token("ann")
    )
    assert (status, body) == (200, {"unread_count": 3})
    status, body = await server.http(
        "POST", "/api/users/ann/notifications/read", {"ids": ids[:1]}, token=publisher
    )
    assert (status, body) == (200, {"updated": 1, "unread_count": 2})
    assert await tab.next("read") == {"ids": ids[:1], "unread_count": 2}
    status, body = await server.http(
        "POST", "/api/users/ann/notifications/read", {"all": True}, token=server.token("ann")
    )
    assert body == {"updated": 2, "unread_count": 0}
    assert (await tab.next("read"))["all"] is True
    for bad in ({}, {"ids": ["x"], "all": True}, {"ids": "x"}):
        status, body = await server.http(
            "POST", "/api/users/ann/notifications/read", bad, token=publisher
        )
        assert status == 400 and body["error"]["code"] == "bad_request"
    status, _ = await server.http("GET", "/api/users/ann/unread_count", token=server.token("bob"))
    assert status == 403


async def test_delete_one_and_erase_all_with_two_live_tabs(server: Running) -> None:
    tabs = [await server.user("cy", receipts=False) for _ in range(2)]
    publisher = server.token("svc", "publisher")
    ids = [
        (await server.http("POST", "/api/notifications/cy", {"message": str(i)}, token=publisher))[
            1
        ]["notification"]["id"]
        for i in range(4)
    ]
    for tab in tabs:
        for _ in ids:
            await tab.next("notification")
    status, body = await server.http(
        "DELETE", f"/api/users/cy/notifications/{ids[0]}", token=server.token("cy")
    )
    assert (status, body) == (204, None)
    for tab in tabs:
        assert await tab.next("deleted") == {"ids": [ids[0]], "unread_count": 3}
    status, _ = await server.http(
        "DELETE", f"/api/users/cy/notifications/{ids[0]}", token=publisher
    )
    assert status == 404
    # A publisher may not erase; another user may not either.
    for token in (publisher, server.token("eve")):
        status, body = await server.http("DELETE", "/api/users/cy/notifications", token=token)
        assert status == 403 and body["error"]["code"] == "forbidden"
    status, body = await server.http(
        "DELETE", "/api/users/cy/notifications", token=server.token("root", "admin")
    )
    assert (status, body) == (200, {"deleted": 3})
    for tab in tabs:
        assert await tab.next("deleted") == {"all": True, "unread_count": 0}
    status, body = await server.http("GET", "/api/users/cy/notifications", token=server.token("cy"))
    assert body == {"notifications": []}


async def test_export_streams_every_page(server: Running) -> None:
    """1,200 notifications (three store pages): one JSON document, newest
    first, each once, as an attachment."""
    await server.hub.send_notifications([("dee", {"message": f"n{i}"}) for i in range(1200)])
    from tornado.httpclient import AsyncHTTPClient

    resp = await AsyncHTTPClient().fetch(
        f"{server.base}/api/users/dee/export",
        headers={"Authorization": f"Bearer {server.token('dee')}"},
    )
    assert resp.headers["Content-Disposition"] == 'attachment; filename="notifications-dee.json"'
    doc = json.loads(resp.body)
    assert doc["user_id"] == "dee"
    messages = [n["message"] for n in doc["notifications"]]
    assert messages == [f"n{i}" for i in reversed(range(1200))]
    status, _ = await server.http("GET", "/api/users/dee/export", token=server.token("x"))
    assert status == 403
