"""rtserver.publisher against a real server (and, for what a server says
only when it is in trouble, a small real HTTP server on loopback that answers
as told): every method, retries across a restart stored once, 4xx not
retried, Retry-After honoured, eight threads at once, the async flavour."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from rtserver.publisher import AsyncPublisher, Publisher, PublishError

from .conftest import Running
from .processes import ServerProcess
from .test_run import RUN, write_config


async def test_every_method(server: Running) -> None:
    admin = Publisher(server.base, server.token("ops", "admin"), retries=0)
    tab = await server.user("ann", receipts=False)

    def use() -> dict[str, Any]:
        sent = admin.send_notification("ann", {"message": "Case updated", "case": 881})
        batch = admin.send_notifications([("ann", {"message": f"b{i}"}) for i in range(5)])
        dm = admin.send_direct_message(tab.session_id or "", {"message": "hi"})
        everyone = admin.send_broadcast_notification({"message": "Maintenance"})
        history = admin.get_notifications_for_user("ann", unread_only=True, limit=3)
        unread = admin.unread_count("ann")
        read = admin.mark_read("ann", [sent["notification"]["id"]])
        published = admin.publish("case:881", {"status": "filed"})
        with pytest.raises(PublishError) as err:
            admin.send_direct_message("nobody", {"message": "x"})
        admin.close()
        return locals()

    out = await asyncio.to_thread(use)
    assert out["sent"]["delivered"] == 1 and len(out["batch"]) == 5
    assert out["dm"] == 1 and out["everyone"] == 1
    assert [n["message"] for n in out["history"]] == ["b4", "b3", "b2"]
    assert out["unread"] == 6 and out["read"] == {"updated": 1, "unread_count": 5}
    assert len(out["published"]["id"]) == 24
    assert (out["err"].value.status, out["err"].value.code) == (404, "not_found")
    assert (await tab.next("notification"))["case"] == 881
    assert await tab.next("message") == {"message": "hi"}


async def test_the_async_flavour(server: Running) -> None:
    rt = AsyncPublisher(server.base, server.token("svc", "publisher"))
    results = await asyncio.gather(
        *(rt.send_notification(f"u{i}", {"message": "m"}) for i in range(10))
    )
    assert len({r["notification"]["id"] for r in results}) == 10
    assert await rt.unread_count("u3") == 1
    await rt.close()


async def test_batches_split_at_max_batch(start_server: Any) -> None:
    server = await start_server(limits={"max_batch": 10})
    rt = Publisher(server.base, server.token("svc", "publisher"), max_batch=10)
    results = await asyncio.to_thread(
        rt.send_notifications, [(f"u{i % 3}", {"message": str(i)}) for i in range(25)]
    )
    rt.close()
    assert len(results) == 25 and len({r["id"] for r in results}) == 25
    assert await server.hub.unread_count("u0") == 9


async def test_eight_threads_share_one_publisher(server: Running) -> None:
    rt = Publisher(server.base, server.token("svc", "publisher"))

    def work(n: int) -> list[str]:
        return [
            rt.send_notification("tom", {"message": f"{n}-{i}"})["notification"]["id"]
            for i in range(25)
        ]

    batches = await asyncio.gather(*(asyncio.to_thread(work, n) for n in range(8)))
    assert len(rt._conns) <= 8  # kept alive, one per thread at most
    rt.close()
    ids = [nid for batch in batches for nid in batch]
    assert len(set(ids)) == 200
    assert await server.hub.unread_count("tom") == 200


def test_a_call_made_while_the_server_is_down_lands_once(tmp_path: Path) -> None:
    """The server is down when the call starts; it comes back within the
    retries: the call succeeds, and the notification is stored once."""
    node = ServerProcess(write_config(tmp_path))
    node.start()
    mint = subprocess.run(
        [*RUN, "token", "svc", "--role", "publisher", "--config", str(node.config)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    rt = Publisher(node.base, mint, retries=20, backoff=0.2, backoff_max=0.5, timeout=2)
    node.stop()
    result: dict[str, Any] = {}
    call = threading.Thread(
        target=lambda: result.update(rt.send_notification("gus", {"message": "back"}))
    )
    call.start()
    time.sleep(1.0)
    node.start()
    call.join(30)
    try:
        assert result["notification"]["message"] == "back"
        history = rt.get_notifications_for_user("gus")
        assert [n["message"] for n in history] == ["back"]
    finally:
        rt.close()
        node.stop()


class Scripted(tornado.web.RequestHandler):
    """Answers each request with the next of ``answers`` and records it."""

    def initialize(self, answers: list[tuple[int, dict[str, str], bytes]], seen: list[Any]) -> None:
        self.answers = answers
        self.seen = seen

    def post(self, *_: str) -> None:
        self.seen.append((time.monotonic(), dict(self.request.headers)))
        status, headers, body = self.answers.pop(0)
        self.set_status(status)
        for k, v in headers.items():
            self.set_header(k, v)
        self.finish(body)


@pytest.fixture
def scripted() -> Iterator[tuple[str, list[Any], list[Any]]]:
    answers: list[tuple[int, dict[str, str], bytes]] = []
    seen: list[Any] = []
    ready = threading.Event()
    state: dict[str, Any] = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = tornado.web.Application([(r"/(.*)", Scripted, {"answers": answers, "seen": seen})])
        sockets = bind_sockets(0, "127.0.0.1")
        state["port"] = sockets[0].getsockname()[1]
        srv = HTTPServer(app)
        srv.add_sockets(sockets)
        state["loop"], state["srv"] = loop, srv
        ready.set()
        loop.run_forever()
        srv.stop()
        loop.run_until_complete(srv.close_all_connections())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(5)
    yield f"http://127.0.0.1:{state['port']}", answers, seen
    state["loop"].call_soon_threadsafe(state["loop"].stop)
    thread.join(5)


def test_retry_after_is_honoured_and_the_key_kept(
    scripted: tuple[str, list[Any], list[Any]],
) -> None:
    url, answers, seen = scripted
    ok = b'{"notification": {"id": "x"}, "delivered": 0}'
    busy = b'{"error": {"code": "rate_limited", "message": "slow down"}}'
    answers += [(429, {"Retry-After": "1"}, busy), (503, {}, b"{}"), (201, {}, ok)]
    rt = Publisher(url, "t", retries=3, backoff=0.01)
    assert rt.send_notification("u", {"message": "m"})["notification"]["id"] == "x"
    rt.close()
    assert seen[1][0] - seen[0][0] >= 0.95  # Retry-After: 1
    keys = {headers["Idempotency-Key"] for _, headers in seen}
    assert len(seen) == 3 and len(keys) == 1  # the same key on every try


def test_a_4xx_is_not_retried(scripted: tuple[str, list[Any], list[Any]]) -> None:
    url, answers, seen = scripted
    answers += [(400, {}, b'{"error": {"code": "bad_request", "message": "message: required"}}')]
    rt = Publisher(url, "t", retries=5)
    with pytest.raises(PublishError) as err:
        rt.send_notification("u", {})
    rt.close()
    assert (err.value.status, err.value.code, err.value.message) == (
        400,
        "bad_request",
        "message: required",
    )
    assert len(seen) == 1


def test_giving_up_says_why(scripted: tuple[str, list[Any], list[Any]]) -> None:
    url, answers, seen = scripted
    answers += [(503, {}, b'{"error": {"code": "unavailable", "message": "store down"}}')] * 3
    rt = Publisher(url, "t", retries=2, backoff=0.01)
    with pytest.raises(PublishError) as err:
        rt.send_notification("u", {"message": "m"})
    rt.close()
    assert (err.value.status, err.value.code, len(seen)) == (503, "unavailable", 3)
    with pytest.raises(PublishError) as err:
        Publisher("http://127.0.0.1:1", "t", retries=1, backoff=0.01).unread_count("u")
    assert err.value.status == 0 and err.value.code == "unreachable"
    with pytest.raises(ValueError):
        Publisher("ftp://x", "t")
