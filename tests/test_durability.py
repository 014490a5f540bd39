"""Nothing accepted is lost or sent twice: values no store can hold are refused
at the door, ``Idempotency-Key`` answers a repeat with the first answer, and
readiness tells the truth about a store that refuses writes. (The faults over
real processes, kill -9 included, are in ``test_faults.py``.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from rtserver import websocket
from rtserver.protocol import ProtocolError
from rtserver.stores.keys import KeyRecord

from .conftest import Running, StartServer, make_config
from .rawws import RawWebSocket
from .test_operations import wait_until

POISON: list[tuple[dict[str, Any], str]] = [
    ({"message": "m", "n": 123456789012345678901234567890}, "notification.n: integer"),
    ({"message": "m", "n": -(2**63) - 1}, "notification.n: integer"),
    ({"message": "m", "a\u0000b": 1}, "NUL"),
    ({"message": "m", "$set": 1}, "starts with '$'"),
    ({"message": "m", "case": {"a.b": 1}}, "notification.case: key 'a.b'"),
    ({"message": "m", "list": [1, {"$x": 2}]}, "notification.list[1]: key '$x'"),
]


async def stored_ids(server: Running, user_id: str) -> set[str]:
    return {n.id for n in await server.hub.store.history(user_id, limit=500)}


class TestRefusedAtTheDoor:
    @pytest.mark.parametrize(("payload", "says"), POISON)
    async def test_http_send_refuses_naming_the_field(
        self, server: Running, payload: dict[str, Any], says: str
    ) -> None:
        """A value some store cannot hold is a 400 naming the field, and
        nothing is stored."""
        token = server.token("svc", "publisher")
        status, body = await server.http("POST", "/api/notifications/u", payload, token=token)
        assert status == 400, body
        assert body["error"]["code"] == "bad_request" and says in body["error"]["message"]
        assert await stored_ids(server, "u") == set()

    async def test_batch_and_broadcast_refuse_too(self, server: Running) -> None:
        """The batch names the item; the broadcast refuses as a send does."""
        publisher, admin = server.token("svc", "publisher"), server.token("root", "admin")
        items = [
            {"user_id": "u", "notification": {"message": "fine"}},
            {"user_id": "u", "notification": POISON[0][0]},
        ]
        status, body = await server.http("POST", "/api/notifications", items, token=publisher)
        assert status == 400 and body["error"]["message"].startswith("[1]: notification.n")
        status, body = await server.http("POST", "/api/broadcast", POISON[3][0], token=admin)
        assert status == 400 and "'$set'" in body["error"]["message"]
        assert await stored_ids(server, "u") == set()

    async def test_python_api_refuses_what_json_cannot_say(self, server: Running) -> None:
        """Tuples, NaN, non-string keys and lone surrogates are refused by the
        Python API (they would not come back as given)."""
        for extra in ({"t": (1, 2)}, {"f": float("nan")}, {"k": {1: 2}}, {"s": "\ud800"}):
            with pytest.raises(ProtocolError) as caught:
                await server.hub.send_notification("u", {"message": "m", **extra})
            assert caught.value.code == "bad_request"
        result = await server.hub.send_notification("u", {"message": "m", "n": 2**63 - 1})
        assert result.notification.extra == {"n": 2**63 - 1}

    async def test_bystanders_of_a_poisoned_request_are_stored(self, server: Running) -> None:
        """Poison sent alongside ten concurrent valid sends costs none of them."""
        token = server.token("svc", "publisher")
        calls = [
            server.http("POST", "/api/notifications/u", {"message": f"ok {i}"}, token=token)
            for i in range(10)
        ] + [server.http("POST", "/api/notifications/u", p, token=token) for p, _ in POISON]
        answers = await asyncio.gather(*calls)
        assert [s for s, _ in answers] == [201] * 10 + [400] * len(POISON)
        assert await stored_ids(server, "u") == {b["notification"]["id"] for _, b in answers[:10]}


class TestIdempotencyKey:
    async def test_a_repeat_gets_the_first_answer_and_is_stored_once(self, server: Running) -> None:
        """Same key, same body: the same status and id, marked replayed, one row,
        one push."""
        tab = await server.user("u", receipts=False)
        token = server.token("svc", "publisher")
        key = {"Idempotency-Key": "order-1042-confirmed"}
        first = await server.http(
            "POST", "/api/notifications/u", {"message": "m"}, token=token, headers=key
        )
        again = await server.http(
            "POST", "/api/notifications/u", {"message": "m"}, token=token, headers=key
        )
        assert first[0] == again[0] == 201 and first[1] == again[1]
        assert await stored_ids(server, "u") == {first[1]["notification"]["id"]}
        assert (await tab.next("notification"))["id"] == first[1]["notification"]["id"]
        with pytest.raises(asyncio.TimeoutError):
            await tab.next("notification", timeout=0.3)
        assert server.hub.metrics.snapshot()["idempotent_replays_total"] == 1

    async def test_the_same_key_with_another_body_is_422(self, server: Running) -> None:
        token = server.token("svc", "publisher")
        key = {"Idempotency-Key": "k1"}
        await server.http(
            "POST", "/api/notifications/u", {"message": "a"}, token=token, headers=key
        )
        status, body = await server.http(
            "POST", "/api/notifications/u", {"message": "b"}, token=token, headers=key
        )
        assert status == 422 and body["error"]["code"] == "idempotency_mismatch"
        status, body = await server.http(
            "POST", "/api/notifications/other", {"message": "a"}, token=token, headers=key
        )
        assert status == 422, "another route is another request"
        assert len(await stored_ids(server, "u")) == 1

    async def test_keys_belong_to_their_token_subject(self, server: Running) -> None:
        """Two publishers using the same key string send two notifications."""
        key = {"Idempotency-Key": "shared"}
        for sub in ("billing", "cases"):
            status, _ = await server.http(
                "POST",
                "/api/notifications/u",
                {"message": "m"},
                token=server.token(sub, "publisher"),
                headers=key,
            )
            assert status == 201
        assert len(await stored_ids(server, "u")) == 2

    @pytest.mark.parametrize("key", ["", "x" * 201, "tab\there", "caf\u00e9"])
    async def test_a_malformed_key_is_400(self, server: Running, key: str) -> None:
        status, body = await server.http(
            "POST",
            "/api/notifications/u",
            {"message": "m"},
            token=server.token("svc", "publisher"),
            headers={"Idempotency-Key": key},
        )
        assert status == 400 and "Idempotency-Key" in body["error"]["message"]

    async def test_concurrent_repeats_send_once(self, server: Running) -> None:
        """Five requests with one key at once: one runs, the others wait for
        its answer and get it."""
        token = server.token("svc", "publisher")
        answers = await asyncio.gather(
            *(
                server.http(
                    "POST",
                    "/api/notifications/u",
                    {"message": "m"},
                    token=token,
                    headers={"Idempotency-Key": "burst"},
                )
                for _ in range(5)
            )
        )
        assert {s for s, _ in answers} == {201}
        assert len({b["notification"]["id"] for _, b in answers}) == 1
        assert len(await stored_ids(server, "u")) == 1

    async def test_batch_items_are_sent_once_per_key(self, server: Running) -> None:
        """With a header key each item is keyed by it and its index; an item's
        own key wins. A repeat with one item more sends only that one."""
        token = server.token("svc", "publisher")
        items = [
            {"user_id": "a", "notification": {"message": "1"}},
            {"user_id": "b", "notification": {"message": "2"}, "idempotency_key": "own-b"},
        ]
        hdr = {"Idempotency-Key": "batch-7"}
        s1, b1 = await server.http("POST", "/api/notifications", items, token=token, headers=hdr)
        more = [*items, {"user_id": "c", "notification": {"message": "3"}}]
        s2, b2 = await server.http("POST", "/api/notifications", more, token=token, headers=hdr)
        assert s1 == s2 == 201 and b2["results"][:2] == b1["results"]
        single = [{"user_id": "b", "notification": {"message": "2"}, "idempotency_key": "own-b"}]
        s3, b3 = await server.http("POST", "/api/notifications", single, token=token)
        assert s3 == 201 and b3["results"] == [b1["results"][1]]
        for user in ("a", "b", "c"):
            assert len(await stored_ids(server, user)) == 1
        changed = [{"user_id": "a", "notification": {"message": "changed"}}]
        status, body = await server.http(
            "POST", "/api/notifications", changed, token=token, headers=hdr
        )
        assert status == 422 and body["error"]["code"] == "idempotency_mismatch"

    async def test_broadcast_and_direct_message_are_sent_once(self, server: Running) -> None:
        tab = await server.user("u", receipts=False)
        admin = server.token("root", "admin")
        hdr = {"Idempotency-Key": "maintenance-notice"}
        for _ in range(2):
            status, body = await server.http(
                "POST", "/api/broadcast", {"message": "Maintenance"}, token=admin, headers=hdr
            )
            assert status == 200 and body == {"delivered": 1}
        session = server.hub.get_user_sessions("u")[0]
        hdr = {"Idempotency-Key": "dm-1"}
        for _ in range(2):
            status, body = await server.http(
                "POST",
                f"/api/sessions/{session}/messages",
                {"message": "hello"},
                token=admin,
                headers=hdr,
            )
            assert status == 200 and body == {"delivered": 1}
        assert (await tab.next("notification"))["message"] == "Maintenance"
        assert (await tab.next("message"))["message"] == "hello"
        for event in ("notification", "message"):
            with pytest.raises(asyncio.TimeoutError):
                await tab.next(event, timeout=0.2)

    async def test_a_client_error_is_kept_a_server_error_is_not(
        self, server: Running, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A 404 is the key's answer; a 503 (nothing sent) leaves the key to the
        retry, which then runs with the same notification id."""
        admin = server.token("root", "admin")
        hdr = {"Idempotency-Key": "to-nobody"}
        for _ in range(2):
            status, _ = await server.http(
                "POST", "/api/sessions/nope/messages", {"message": "x"}, token=admin, headers=hdr
            )
            assert status == 404
        store = server.hub.store
        real = store.insert_many
        seen: list[str] = []

        async def refuse_once(notifications: Any) -> Any:
            seen.extend(n.id for n in notifications)
            if len(seen) == 1:
                from rtserver.stores.base import StoreError

                return [StoreError("disk full")]
            return await real(notifications)

        monkeypatch.setattr(store, "insert_many", refuse_once)
        hdr = {"Idempotency-Key": "retry-me"}
        token = server.token("svc", "publisher")
        first = await server.http(
            "POST", "/api/notifications/u", {"message": "m"}, token=token, headers=hdr
        )
        second = await server.http(
            "POST", "/api/notifications/u", {"message": "m"}, token=token, headers=hdr
        )
        assert first[0] == 503 and second[0] == 201
        assert seen[0] == seen[1] == second[1]["notification"]["id"]

    async def test_an_unfinished_claim_is_taken_after_the_lease(
        self, start_server: StartServer, tmp_path: Path
    ) -> None:
        """A key claimed by a request that never finished (its server died):
        409 until the lease ends, then the retry runs with the ids it reserved."""
        srv = await start_server(
            config=make_config(tmp_path, server={"test_routes": True, "idempotency_lease": 0.5})
        )
        token = srv.token("svc", "publisher")
        now = time.time()
        reserved = srv.hub.new_id()
        body = {"message": "m"}
        import json

        from rtserver.idempotency import Keys, body_fingerprint

        fp = body_fingerprint("POST", "/api/notifications/u", json.dumps(body).encode())
        await srv.hub.store.claim_keys(
            [
                KeyRecord(
                    key=Keys.scoped("svc", "crashed"),
                    fingerprint=fp,
                    ids=[reserved],
                    claimed_at=now,
                    expires_at=now + 60,
                )
            ],
            now,
            0.5,
        )
        hdr = {"Idempotency-Key": "crashed"}
        status, err = await srv.http("POST", "/api/notifications/u", body, token=token, headers=hdr)
        assert status == 409 and err["error"]["code"] == "idempotency_in_progress"
        await asyncio.sleep(0.6)
        status, ok = await srv.http("POST", "/api/notifications/u", body, token=token, headers=hdr)
        assert status == 201 and ok["notification"]["id"] == reserved


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 2 MiB tmpfs mounted for the test (root only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {err}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_answers_503_and_readiness_says_so(
    start_server: StartServer, tmp_path: Path, small_disk: Path
) -> None:
    """SQLite on a full filesystem: sends are 503 (never 201 and lost),
    /readyz is degraded until space is free again, and the stored set is
    exactly the set answered 201."""
    srv = await start_server(config=make_config(small_disk, store={"data_dir": str(small_disk)}))
    token = srv.token("svc", "publisher")
    accepted: set[str] = set()
    refused = 0

    async def send(i: int) -> None:
        nonlocal refused
        status, body = await srv.http(
            "POST", "/api/notifications/u", {"message": f"m{i}", "pad": "p" * 4000}, token=token
        )
        if status == 201:
            accepted.add(body["notification"]["id"])
        else:
            assert status == 503 and body["error"]["code"] == "unavailable"
            refused += 1

    for i in range(10):
        await send(i)
    filler = small_disk / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    for i in range(10, 60):
        await send(i)
    assert refused > 0
    status, body = await srv.http("GET", "/readyz")
    assert status == 503 and body["store"] == "degraded"
    os.unlink(filler)
    status, body = await srv.http("GET", "/readyz")
    assert status == 200 and body["store"] == "ok"
    await send(60)
    assert await stored_ids(srv, "u") == accepted
    shutil.rmtree(small_disk / "nothing", ignore_errors=True)


class TestQueuedIsNotDelivered:
    """Without receipts a notification counts as delivered once the kernel
    has it, not while it waits in rtserver's own queue: a session that ends
    with frames still queued (cut off as a slow client, or gone abruptly)
    leaves those undelivered, and the next register offers them."""

    async def test_a_slow_client_cut_off_gets_the_rest_at_the_next_register(
        self, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A client that stops reading is cut off (1013) and never answers the
        close: what the server still queued when it dropped the socket comes
        at the next register; what its kernel had come before, exactly once."""
        monkeypatch.setattr(websocket, "CLOSE_TIMEOUT", 0.3)
        srv = await start_server(
            server={"max_outbound_bytes": 256 * 1024}, limits={"max_notification_bytes": 100_000}
        )
        slow = await RawWebSocket.open(srv.port, rcvbuf=4096)
        assert (await slow.register(srv.token("slow")))["event"] == "ack"
        body = "x" * 20_000
        sent = []
        for i in range(300):
            result = await srv.hub.send_notification("slow", {"message": body, "n": i})
            sent.append(result.notification.id)
            if i % 20 == 0:
                await asyncio.sleep(0)
        assert await wait_until(lambda: srv.hub.metrics.requeued._value.get() > 0)
        requeued = int(srv.hub.metrics.requeued._value.get())
        # What reached the client's kernel whole, read only now.
        received = []
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            while True:
                opcode, payload = await slow.frame(timeout=1)
                if opcode == 0x1:
                    received.append(json.loads(payload)["data"]["id"])
        slow.close()
        assert received == sent[: len(received)] and len(received) < len(sent)
        again = await srv.user("slow", receipts=False)
        backlog = len(sent) - len(received)
        replayed = [(await again.next("notification"))["id"] for _ in range(backlog)]
        # Nothing lost. A frame the kernel had whole may come twice (the close
        # frame counts as queued too: the reckoning errs that way), no more.
        assert set(received) | set(replayed) == set(sent)
        assert len(set(received) & set(replayed)) <= 1
        assert requeued >= 5  # the queue held 256 KiB of 20 KB frames

    async def test_a_peer_gone_abruptly_leaves_the_queued_undelivered(
        self, start_server: StartServer
    ) -> None:
        srv = await start_server(
            server={"max_outbound_bytes": 64 << 20}, limits={"max_notification_bytes": 100_000}
        )
        gone = await RawWebSocket.open(srv.port, rcvbuf=4096)
        assert (await gone.register(srv.token("gone")))["event"] == "ack"
        body = "y" * 20_000
        for i in range(400):
            await srv.hub.send_notification("gone", {"message": body, "n": i})
        [conn] = srv.hub.sessions.of_user("gone")
        assert await wait_until(lambda: conn.outbound_buffer() > 1 << 20)
        queued = conn.unsent_notifications()
        assert len(queued) > 10
        gone.close()  # a reset: what the server still queues is dropped
        assert await wait_until(lambda: srv.hub.get_user_sessions("gone") == [])
        await asyncio.sleep(0.1)
        undelivered = {n.id for n in await srv.hub.store.undelivered("gone", limit=500)}
        assert set(queued) <= undelivered
        # A receipts-session, or one that drained its queue, changes nothing.
        calm = await srv.user("calm", receipts=False)
        result = await srv.hub.send_notification("calm", {"message": "m"})
        assert (await calm.next("notification"))["id"] == result.notification.id
        await calm.close()
        await asyncio.sleep(0.1)
        assert await srv.hub.store.undelivered("calm") == []
