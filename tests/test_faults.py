"""Nothing answered 201 is lost, nothing is stored twice: faults over real processes.

rtserver runs as ``python run.py`` and nx-27017 (a MongoDB wire-protocol
server) as its own process; both are killed with SIGKILL and restarted, and
rtserver is also stopped with SIGTERM while MongoDB is down. Every test ends by
reading what the database holds, with a client of its own, and asserting that
the set of stored ids is exactly the set of ids answered 201. (A full disk on
the SQLite store is in ``test_durability.py``.)
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from pymongo import MongoClient
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from rtserver.auth import Authenticator
from rtserver.config import AuthConfig
from rtserver.protocol import IdGenerator, Notification

from .mongo_support import NxServer, pymongo_orphan_sockets  # noqa: F401 (autouse)
from .processes import ServerProcess

pytestmark = pytest.mark.slow
SECRET = "faults-secret-0123456789-0123456789"
USER = "client-7"


class Deployment:
    """One rtserver process on a store (MongoDB on nx-27017, or SQLite), with
    a client that sends as a publisher and one that reads the database."""

    def __init__(self, tmp_path: Path, backend: str) -> None:
        self.tmp_path = tmp_path
        self.backend = backend
        self.nx = NxServer(tmp_path / "nx") if backend == "mongodb" else None
        self.database = f"faults_{uuid.uuid4().hex[:8]}"
        store = f"store:\n  data_dir: {tmp_path / 'data'}\n  cleanup_interval: 0\n"
        if self.nx is not None:
            self.nx.start()
            store += (
                f"  backend: mongodb\n  uri: {self.nx.uri}\n  database: {self.database}\n"
                "  retry_base: 0.05\n  retry_max: 0.3\n  server_selection_timeout: 0.5\n"
            )
        config = tmp_path / "faults.yaml"
        config.write_text(
            f"auth:\n  secret: {SECRET}\n"
            + store
            + "server:\n  idempotency_lease: 2\n"
            + "logging:\n  format: json\n  metrics_interval: 0\n"
        )
        self.rt = ServerProcess(config, log=tmp_path / "rtserver.log")
        self.rt.start()
        auth = Authenticator(AuthConfig(secret=SECRET))
        self.publisher = auth.mint("billing", "publisher", 3600)
        self.admin = auth.mint("ops", "admin", 3600)
        self.http = AsyncHTTPClient()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> HTTPResponse:
        return await self.http.fetch(
            self.rt.base + path,
            method=method,
            body=None if body is None else json.dumps(body),
            headers={"Authorization": f"Bearer {token or self.publisher}", **(headers or {})},
            raise_error=False,
            request_timeout=20,
        )

    async def send(self, payload: dict[str, Any], key: str | None = None) -> tuple[int, Any]:
        """POST one notification for USER: the status and the answer's body
        (599 and None when the connection failed)."""
        headers = {"Idempotency-Key": key} if key else {}
        resp = await self.request("POST", f"/api/notifications/{USER}", payload, headers=headers)
        return resp.code, json.loads(resp.body) if resp.body else None

    async def ready(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until /readyz says ready (the spool is flushed)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            resp = await self.request("GET", "/readyz")
            body: dict[str, Any] = json.loads(resp.body) if resp.body else {}
            if resp.code == 200 and body.get("buffered") == 0:
                return body
            assert asyncio.get_running_loop().time() < deadline, body
            await asyncio.sleep(0.1)

    def stored(self) -> list[str]:
        """Every id stored for USER, read straight from the database."""
        if self.nx is not None:
            client: MongoClient[dict[str, Any]] = MongoClient(
                self.nx.uri, serverSelectionTimeoutMS=5000
            )
            with client:
                docs = client[self.database]["notifications"].find({"user_id": USER}, {"_id": 1})
                return [d["_id"] for d in docs]
        with sqlite3.connect(self.tmp_path / "data" / "rtserver.db") as db:
            return [
                r[0] for r in db.execute("SELECT id FROM notifications WHERE user_id = ?", (USER,))
            ]

    def close(self) -> None:
        self.rt.kill()
        if self.nx is not None:
            self.nx.stop()


@pytest.fixture
def mongo(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path, "mongodb")
    yield d
    d.close()


@pytest.fixture(params=["sqlite", "mongodb"])
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    d = Deployment(tmp_path, request.param)
    yield d
    d.close()


def accepted(answers: list[tuple[int, Any]]) -> set[str]:
    """The ids answered 201."""
    return {body["notification"]["id"] for status, body in answers if status == 201}


def assert_stored_exactly(d: Deployment, ids: set[str]) -> None:
    stored = d.stored()
    assert len(stored) == len(set(stored)), "an id is stored twice"
    assert set(stored) == ids, (
        f"answered 201, not stored: {sorted(ids - set(stored))}; "
        f"stored, never answered 201: {sorted(set(stored) - ids)}"
    )


@pytest.mark.parametrize("stop", ["sigterm", "kill"])
async def test_rtserver_stopped_during_an_outage_keeps_what_it_accepted(
    mongo: Deployment, stop: str
) -> None:
    """MongoDB is down, rtserver answers 201 from its spool, then rtserver is
    stopped (SIGTERM: it exits 0 and says the spool is kept) or killed. Back
    up with MongoDB, it flushes the spool first: all of it is stored."""
    assert mongo.nx is not None
    answers = [await mongo.send({"message": f"before {i}"}) for i in range(3)]
    mongo.nx.stop()
    during = [await mongo.send({"message": f"during {i}"}) for i in range(8)]
    assert [s for s, _ in during] == [201] * 8
    resp = await mongo.request("GET", "/readyz")
    assert resp.code == 503 and json.loads(resp.body)["buffered"] == 8
    if stop == "sigterm":
        mongo.rt.stop()
        assert mongo.rt.returncode == 0
        [kept] = mongo.rt.events("store.spool_kept")
        assert kept["pending"] == 8
    else:
        mongo.rt.kill()
    mongo.nx.start()
    mongo.rt.start()
    await mongo.ready()
    assert mongo.rt.events("store.spool_flushed")
    assert_stored_exactly(mongo, accepted(answers + during))


async def test_mongodb_killed_and_restarted_mid_stream(mongo: Deployment) -> None:
    """Four senders post 240 notifications while MongoDB is killed (kill -9)
    and started again twice: every 201 is stored, nothing else is."""
    assert mongo.nx is not None
    nx = mongo.nx
    answers: list[tuple[int, Any]] = []
    reached = {40: asyncio.Event(), 140: asyncio.Event()}

    async def sender(worker: int) -> None:
        for i in range(60):
            answers.append(await mongo.send({"message": f"w{worker} #{i}"}))
            if len(answers) in reached:
                reached[len(answers)].set()

    async def faults() -> None:
        for event in reached.values():
            await event.wait()
            await asyncio.to_thread(nx.stop)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(nx.start)

    await asyncio.gather(faults(), *(sender(w) for w in range(4)))
    statuses = {status for status, _ in answers}
    assert statuses <= {201, 503}, statuses
    assert len(accepted(answers)) >= 200
    await mongo.ready()
    assert_stored_exactly(mongo, accepted(answers))


async def test_poison_mixed_in_with_mongodb_up_and_down(mongo: Deployment) -> None:
    """Values no store can hold, sent among valid ones while MongoDB is up,
    then down: each is a 400 naming the field, the valid ones are all
    stored, and the spool is not stuck on anything."""
    assert mongo.nx is not None
    poison: list[dict[str, Any]] = [
        {"message": "p", "n": 123456789012345678901234567890},
        {"message": "p", "a\u0000b": 1},
        {"message": "p", "case": {"$where": 1}},
    ]
    answers: list[tuple[int, Any]] = []
    for phase in ("up", "down"):
        if phase == "down":
            mongo.nx.stop()
        calls = [mongo.send({"message": f"{phase} {i}"}) for i in range(10)]
        calls += [mongo.send(p) for p in poison]
        got = await asyncio.gather(*calls)
        assert [s for s, _ in got[:10]] == [201] * 10, got[:10]
        for status, body in got[10:]:
            assert status == 400 and body["error"]["code"] == "bad_request", body
        answers += got
    mongo.nx.start()
    ready = await mongo.ready()
    assert ready["dead_letters"] == 0
    assert_stored_exactly(mongo, accepted(answers))


async def test_what_mongodb_refuses_after_recovery_is_a_dead_letter(mongo: Deployment) -> None:
    """A spooled notification MongoDB refuses (here an integer past int64
    written into the spool by hand, as an older version might have let in)
    goes to the dead letters with a log line and a metric; the rest of the
    spool is stored behind it, and the operator reads and removes it."""
    assert mongo.nx is not None
    mongo.nx.stop()
    answers = [await mongo.send({"message": f"during {i}"}) for i in range(2)]
    mongo.rt.kill()
    spool = mongo.tmp_path / "data" / "mongodb-spool.db"
    poison = Notification(
        id=IdGenerator()(), user_id=USER, message="too big", created_at=1.0, extra={"n": 2**64 - 1}
    )
    with sqlite3.connect(spool) as db:
        db.execute(
            "INSERT INTO spool (id, body) VALUES (?, ?)",
            (poison.id, msgspec.msgpack.encode(poison)),
        )
    mongo.nx.start()
    mongo.rt.start()
    answers.append(await mongo.send({"message": "after"}))
    ready = await mongo.ready()
    assert ready["dead_letters"] == 1 and ready["status"] == "ready"
    [event] = mongo.rt.events("store.dead_letter")
    assert event["notification_id"] == poison.id
    resp = await mongo.request("GET", "/api/admin/dead_letters", token=mongo.admin)
    [letter] = json.loads(resp.body)["dead_letters"]
    assert letter["id"] == poison.id and letter["notification"]["n"] == 2**64 - 1
    metrics = (await mongo.request("GET", "/metrics", token=mongo.admin)).body.decode()
    assert "rtserver_store_dead_letters 1.0" in metrics
    resp = await mongo.request(
        "DELETE", f"/api/admin/dead_letters/{letter['seq']}", token=mongo.admin
    )
    assert resp.code == 200 and json.loads(resp.body) == {"removed": letter["seq"]}
    assert (await mongo.ready())["dead_letters"] == 0
    assert_stored_exactly(mongo, accepted(answers))


async def test_a_retry_after_a_crash_is_answered_not_stored_again(
    deployment: Deployment,
) -> None:
    """A publisher's request succeeds, rtserver is killed before the
    publisher hears back, and the publisher retries with the same
    Idempotency-Key against the restarted process: the retry gets the first
    answer, and the notification is stored once. A new key stores anew."""
    first = await deployment.send({"message": "hearing set"}, key="case-9-hearing")
    assert first[0] == 201
    deployment.rt.kill()
    deployment.rt.start()
    resp = await deployment.request(
        "POST",
        f"/api/notifications/{USER}",
        {"message": "hearing set"},
        headers={"Idempotency-Key": "case-9-hearing"},
    )
    assert resp.code == 201 and resp.headers["Idempotent-Replayed"] == "true"
    assert json.loads(resp.body)["notification"]["id"] == first[1]["notification"]["id"]
    other = await deployment.send({"message": "hearing set"}, key="case-9-hearing-2")
    assert other[0] == 201 and other[1]["notification"]["id"] != first[1]["notification"]["id"]
    assert_stored_exactly(deployment, accepted([first, other]))


async def test_retries_with_the_same_key_across_an_outage(mongo: Deployment) -> None:
    """Keys taken while MongoDB is down are kept in the spool and reach
    MongoDB with it: a retry after rtserver restarts (kill -9) and MongoDB
    returns still gets the first answer."""
    assert mongo.nx is not None
    mongo.nx.stop()
    answers = [await mongo.send({"message": f"m{i}"}, key=f"k{i}") for i in range(5)]
    assert [s for s, _ in answers] == [201] * 5
    mongo.rt.kill()
    mongo.nx.start()
    mongo.rt.start()
    await mongo.ready()
    again = [await mongo.send({"message": f"m{i}"}, key=f"k{i}") for i in range(5)]
    assert [b["notification"]["id"] for _, b in again] == [
        b["notification"]["id"] for _, b in answers
    ]
    assert_stored_exactly(mongo, accepted(answers))
