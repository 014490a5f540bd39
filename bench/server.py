"""rtserver for the benchmark: the real app plus a bench-only plugin whose
routes trigger server-side load (broadcasts, per-user sends) so that the
measurement is of the delivery path, not of an HTTP client.

    python -m bench.server PORT DATA_DIR SECRET [REDIS_URL]
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rtserver.app import make_app
from rtserver.config import parse_config
from rtserver.log import configure_logging
from rtserver.plugins import Route, hookimpl
from rtserver.protocol import Notification
from rtserver.stores.base import StoreError
from rtserver.stores.sqlite import SQLiteStore, _rows
from rtserver.web import APIHandler


def pad(size: int) -> str:
    return "x" * max(1, size - 60)  # the frame around it makes up the rest


class BroadcastLoad(APIHandler):
    """POST {"count", "size"}: that many broadcasts, yielding between them."""

    async def post(self) -> None:
        req = self.body()
        payload = {"message": pad(req.get("size", 150))}
        t0 = time.perf_counter()
        for _ in range(req["count"]):
            await self.hub.send_broadcast_notification(payload)
            await asyncio.sleep(0)
        self.send({"seconds": time.perf_counter() - t0})


class SubscribeAll(APIHandler):
    """POST {"topic"}: every registered session subscribes to the topic (as
    each would with a ``subscribe`` frame; the tokens grant it)."""

    async def post(self) -> None:
        topic = self.body()["topic"]
        conns = self.hub.sessions.registered()
        for conn in conns:
            await self.hub.topics.subscribe(conn, topic)
        self.send({"subscribed": len(conns)})


class TopicLoad(APIHandler):
    """POST {"topic", "count", "size"}: that many publications, one after
    another, each stored and then pushed to the topic's subscribers."""

    async def post(self) -> None:
        req = self.body()
        data = {"message": pad(req.get("size", 150))}
        t0 = time.perf_counter()
        for _ in range(req["count"]):
            await self.hub.publish(req["topic"], data)
        self.send({"seconds": time.perf_counter() - t0})


class SendLoad(APIHandler):
    """POST {"count", "users", "batch"}: notifications to random users through
    the Python API, as a busy application would call it, with up to
    ``window`` in flight: ``send_notification`` once per notification
    (``batch`` 1), or ``send_notifications`` with ``batch`` at a time. Each
    is stored and delivered before it counts."""

    async def post(self) -> None:
        req = self.body()
        users, count = req["users"], req["count"]
        batch, window = req.get("batch", 1), req.get("window", 20_000)
        payload = {"message": pad(req.get("size", 150))}
        hub = self.hub
        # The names are made before the clock starts: the random picks are the
        # application's, the string formatting is not rtserver's to pay for.
        names = [f"u{i}" for i in range(users)]
        t0 = time.perf_counter()
        chunk = 1000 if batch == 1 else batch
        running: set[asyncio.Future[Any]] = set()
        for start in range(0, count, chunk):
            if len(running) * chunk >= window:
                _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            targets = random.choices(names, k=min(chunk, count - start))
            if batch == 1:
                running.add(asyncio.gather(*(hub.send_notification(u, payload) for u in targets)))
            else:
                running.add(
                    asyncio.ensure_future(hub.send_notifications([(u, payload) for u in targets]))
                )
            await asyncio.sleep(0)
        await asyncio.gather(*running)
        self.send({"seconds": time.perf_counter() - t0})


class UnwrittenStore(SQLiteStore):
    """A diagnostic for the per-user figure (``RTBENCH_STORE=unwritten``):
    rows are made as for SQLite (here on the event loop; the real store makes
    them on its own thread), then dropped instead of written, so the run
    shows what the delivery path costs without the disk's share. It loses
    every notification: never a mode of rtserver."""

    async def insert_many(self, notifications: Sequence[Notification]) -> list[StoreError | None]:
        _rows(notifications)
        return [None] * len(notifications)


class Stalls:
    """The event loop's longest stall of its own making: a task asks to wake
    every millisecond, and each time records the CPU time the loop's thread
    spent meanwhile (time the process was merely not scheduled, because the
    other node or Redis had the core, is not the loop's doing)."""

    longest = 0.0

    @classmethod
    async def watch(cls) -> None:
        while True:
            t0 = time.thread_time()
            await asyncio.sleep(0.001)
            cls.longest = max(cls.longest, time.thread_time() - t0)

    #: The heartbeat's own CPU time, the most of any beat.
    beat = 0.0

    @classmethod
    def time_beats(cls, broker: Any) -> None:
        beat = broker._beat

        async def timed() -> None:
            t0 = time.thread_time()
            await beat()
            cls.beat = max(cls.beat, time.thread_time() - t0)

        broker._beat = timed


class StallLoad(APIHandler):
    """POST: the longest stall and the costliest heartbeat since the last
    call, in ms (and start over)."""

    async def post(self) -> None:
        longest, Stalls.longest = Stalls.longest, 0.0
        beat, Stalls.beat = Stalls.beat, 0.0
        self.send({"longest_ms": longest * 1000, "beat_ms": beat * 1000})


class BenchPlugin:
    @hookimpl
    def rtserver_routes(self, config: Any) -> list[Route]:
        return [
            Route(r"/bench/broadcast", BroadcastLoad),
            Route(r"/bench/send", SendLoad),
            Route(r"/bench/stall", StallLoad),
            Route(r"/bench/subscribe_all", SubscribeAll),
            Route(r"/bench/topic", TopicLoad),
        ]


async def main(port: int, data_dir: str, secret: str, redis_url: str | None = None) -> None:
    broker = {"broker": {"backend": "redis", "url": redis_url}} if redis_url else {}
    config = parse_config(
        {
            **broker,
            "server": {
                "port": port,
                "ping_interval": 0,
                "max_outbound_bytes": 64 * 1024 * 1024,
                "max_body_bytes": 64 * 1024 * 1024,
                "websocket": os.environ.get("RTBENCH_WEBSOCKET", "rtserver"),
            },
            "auth": {"secret": secret},
            "store": {"data_dir": data_dir, "cleanup_interval": 0},
            "logging": {"format": "json", "level": "warning", "metrics_interval": 0},
            "limits": {
                "http_requests_per_second": 1e9,
                "connections_per_second": 1e9,
                "frames_per_second": 1e9,
                "frame_burst": 10**9,
            },
        }
    )
    configure_logging(config.logging)
    store = None
    if os.environ.get("RTBENCH_STORE") == "unwritten":
        store = UnwrittenStore(Path(config.store.data_dir) / config.store.filename)
    app = make_app(config, store=store, plugins=[("bench", BenchPlugin())])
    await app.startup()
    import gc

    if os.environ.get("RTBENCH_GC") == "off":
        gc.disable()
    elif os.environ.get("RTBENCH_GC"):
        gc.set_threshold(*map(int, os.environ["RTBENCH_GC"].split(",")))
    server = app.make_server()
    server.listen(port, "127.0.0.1", backlog=4096)
    if os.environ.get("RTBENCH_STALLS"):
        if app.hub.broker.enabled:
            Stalls.time_beats(app.hub.broker)
        watcher = asyncio.get_running_loop().create_task(Stalls.watch())  # noqa: F841 (kept)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], *sys.argv[4:5]))
