"""Beyond one process: Redis pub/sub between rtserver nodes.

Without ``broker`` in the config every node is alone (``LocalBroker``: no
work at all). With ``broker: {backend: redis, url: ...}`` nodes share:

- ``<prefix>:u:<user_id>``: one publish per notification (the frame encoded
  once), subscribed only by nodes holding a session of that user, so a node
  without the user does no per-frame work;
- ``<prefix>:b``: broadcasts; ``<prefix>:n:<node_id>``: direct messages to a
  session on that node;
- ``<prefix>:node:<node_id>``: a hash of the node's sessions and metrics,
  rewritten every ``heartbeat`` seconds with an expiry of ``session_ttl``, so a
  crashed node's sessions disappear within seconds.

A message is ``<origin node>|<kind>|<notification id>|<excluded session>\\n``
followed by the WebSocket frame exactly as the origin built it (for kind ``r``,
receipts confirmed on the origin, the JSON list of their ids); the origin
ignores its own. While Redis is down each node goes on delivering to its own
sessions; it reconnects with backoff and resubscribes by itself, and whatever a
user missed meanwhile reaches them through offline delivery or ``last_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import TYPE_CHECKING, Any

import msgspec

from rtserver.backoff import Backoff
from rtserver.config import BrokerConfig
from rtserver.log import get_logger

if TYPE_CHECKING:
    from rtserver.hub import Hub

log = get_logger("rtserver.broker")


class BrokerUnavailable(Exception):
    """Redis cannot be reached: whether another node can act is unknown."""


class LocalBroker:
    """A single process: nothing to share."""

    node_id = "local"
    healthy = True
    enabled = False

    async def start(self, hub: Hub) -> None:
        return None

    async def stop(self) -> None:
        return None

    def publish_user(
        self, user_id: str, framed: bytes, nid: str | None, exclude: str | None
    ) -> None:
        return None

    def publish_broadcast(self, framed: bytes) -> None:
        return None

    async def send_to_session(self, session_id: str, framed: bytes) -> bool:
        return False

    def publish_settled(self, user_id: str, ids: list[str]) -> None:
        return None

    def watch_user(self, user_id: str) -> None:
        return None

    def unwatch_user(self, user_id: str) -> None:
        return None

    async def nodes(self) -> dict[str, Any]:
        return {}


class RedisBroker(LocalBroker):
    enabled = True

    def __init__(self, config: BrokerConfig) -> None:
        import redis.asyncio as aioredis  # an extra: only clusters need it
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self.config = config
        self.node_id = config.node_id or secrets.token_hex(4)
        self.prefix = config.prefix
        self._redis = aioredis.Redis.from_url(
            config.url or "redis://127.0.0.1:6379",
            socket_connect_timeout=config.timeout,
            socket_timeout=config.timeout,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._pubsub: Any = None
        self._hub: Hub | None = None
        self._users: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._publishes: set[asyncio.Task[None]] = set()
        self._outbox: list[tuple[str, bytes]] = []
        self._wake = asyncio.Event()
        #: Publishes skipped because the outbox was full.
        self.dropped = 0
        self.healthy = False
        self._stopping = False
        self._header = self.node_id.encode()

    # -- lifecycle --------------------------------------------------------

    async def start(self, hub: Hub) -> None:
        self._hub = hub
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen()),
            loop.create_task(self._heartbeat()),
            loop.create_task(self._sender()),
        ]
        # Give the first connection a moment so a healthy cluster starts ready.
        for _ in range(50):
            if self.healthy:
                break
            await asyncio.sleep(0.02)
        log.info("broker.started", node_id=self.node_id, healthy=self.healthy)

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._publishes, return_exceptions=True)
        with contextlib.suppress(Exception):  # Redis may be down; the key expires anyway
            await self._redis.delete(self._node_key(self.node_id))
        await self._redis.aclose()

    # -- channels ---------------------------------------------------------

    def _user_channel(self, user_id: str) -> str:
        return f"{self.prefix}:u:{user_id}"

    def _node_key(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"

    def _message(self, kind: str, nid: str | None, exclude: str | None, framed: bytes) -> bytes:
        return (
            b"|".join([self._header, kind.encode(), (nid or "").encode(), (exclude or "").encode()])
            + b"\n"
            + framed
        )

    def _publish(self, channel: str, message: bytes) -> None:
        """Queue a publish; one sender task sends them in order, pipelined."""
        if not self.healthy:
            return  # offline delivery and last_id cover what others miss now
        if len(self._outbox) >= self.config.outbox_limit:
            self.dropped += 1  # Redis cannot keep up: the same cover applies
            return
        self._outbox.append((channel, message))
        self._wake.set()

    async def _sender(self) -> None:
        """Publishes in the order they were made: one pipeline per batch."""
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                batch, self._outbox = self._outbox, []
                for attempt in (1, 2):  # a second try replaces a stale connection
                    try:
                        pipe = self._redis.pipeline(transaction=False)
                        for channel, message in batch:
                            pipe.publish(channel, message)
                        await pipe.execute()
                        break
                    except asyncio.CancelledError:
                        raise
                    except Exception as err:
                        if attempt == 2:
                            # The listener notices an outage and reports it;
                            # receivers recover these through last_id.
                            self.dropped += len(batch)
                            log.warning("broker.publish_failed", count=len(batch), error=str(err))

    def _published(self, task: asyncio.Task[None]) -> None:
        self._publishes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("broker.command_failed", error=str(task.exception()))

    def publish_user(
        self, user_id: str, framed: bytes, nid: str | None, exclude: str | None
    ) -> None:
        self._publish(self._user_channel(user_id), self._message("u", nid, exclude, framed))

    def publish_broadcast(self, framed: bytes) -> None:
        self._publish(f"{self.prefix}:b", self._message("b", None, None, framed))

    def publish_settled(self, user_id: str, ids: list[str]) -> None:
        """Receipts confirmed here: the user's other nodes stop waiting for them."""
        self._publish(
            self._user_channel(user_id), self._message("r", None, None, msgspec.json.encode(ids))
        )

    async def send_to_session(self, session_id: str, framed: bytes) -> bool:
        """Route a direct message to the node that holds ``session_id``: True
        when one does, False when none does; ``BrokerUnavailable`` when Redis
        cannot say (no node can be asked, so "no such session" would be false)."""
        if not self.healthy:
            raise BrokerUnavailable("redis is unreachable")
        try:
            for node_id, info in (await self.nodes()).items():
                if node_id != self.node_id and session_id in info.get("sessions", {}):
                    await self._redis.publish(
                        f"{self.prefix}:n:{node_id}", self._message("s", None, session_id, framed)
                    )
                    return True
        except Exception as err:
            log.warning("broker.command_failed", error=str(err))
            raise BrokerUnavailable(str(err)) from None
        return False

    def watch_user(self, user_id: str) -> None:
        if user_id not in self._users:
            self._users.add(user_id)
            if self.healthy and self._pubsub is not None:
                self._spawn(self._pubsub.subscribe(self._user_channel(user_id)))

    def unwatch_user(self, user_id: str) -> None:
        if user_id in self._users:
            self._users.discard(user_id)
            if self.healthy and self._pubsub is not None:
                self._spawn(self._pubsub.unsubscribe(self._user_channel(user_id)))

    def _spawn(self, awaitable: Any) -> None:
        async def run() -> None:
            await awaitable

        task = asyncio.get_running_loop().create_task(run())
        self._publishes.add(task)
        task.add_done_callback(self._published)

    def _lost(self, err: BaseException | None) -> None:
        if self.healthy:
            log.warning("broker.unreachable", node_id=self.node_id, error=str(err))
        self.healthy = False

    # -- receiving --------------------------------------------------------

    async def _listen(self) -> None:
        backoff = Backoff(0.05, 2.0)
        while not self._stopping:
            try:
                self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                channels = [f"{self.prefix}:b", f"{self.prefix}:n:{self.node_id}"]
                channels += [self._user_channel(u) for u in self._users]
                await self._pubsub.subscribe(*channels)
                if not self.healthy:
                    log.info("broker.connected", node_id=self.node_id, channels=len(channels))
                self.healthy = True
                backoff.reset()
                while True:
                    msg = await self._pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._deliver(msg["channel"], msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self._lost(err)
                with_pubsub, self._pubsub = self._pubsub, None
                if with_pubsub is not None:
                    with contextlib.suppress(Exception):
                        await with_pubsub.aclose()
                await asyncio.sleep(backoff.next_delay())

    def _deliver(self, channel: bytes, data: bytes) -> None:
        head, _, framed = data.partition(b"\n")
        origin, kind, nid, exclude = head.split(b"|", 3)
        if origin == self._header or self._hub is None:
            return
        hub = self._hub
        if kind == b"u":
            user_id = channel.decode().split(":u:", 1)[1]
            hub.deliver_from_cluster(
                user_id, framed, nid.decode() or None, exclude.decode() or None
            )
        elif kind == b"r":
            user_id = channel.decode().split(":u:", 1)[1]
            hub.settled_elsewhere(user_id, msgspec.json.decode(framed, type=list[str]))
        elif kind == b"b":
            hub.delivery.broadcast_framed(framed, fan_out=False)
        elif kind == b"s":
            conn = hub.sessions.get(exclude.decode())
            if conn is not None and conn.registered:
                hub.delivery.to_connection_framed(conn, framed, "message")

    # -- the cluster's view -----------------------------------------------

    async def _heartbeat(self) -> None:
        interval = max(0.2, self.config.session_ttl / 3)
        while not self._stopping:
            if self.healthy and self._hub is not None:
                hub = self._hub
                state = {
                    "node_id": self.node_id,
                    "at": time.time(),
                    "sessions": {c.session_id: c.info() for c in hub.sessions.registered()},
                    "metrics": hub.get_connection_metrics(),
                }
                key = self._node_key(self.node_id)
                try:
                    await self._redis.set(
                        key, msgspec.json.encode(state), ex=max(1, int(self.config.session_ttl))
                    )
                except Exception as err:
                    log.debug("broker.heartbeat_failed", error=str(err))
            await asyncio.sleep(interval)

    async def nodes(self) -> dict[str, Any]:
        """Every live node's sessions and metrics (expired nodes are gone)."""
        out: dict[str, Any] = {}
        async for key in self._redis.scan_iter(match=f"{self.prefix}:node:*", count=100):
            raw = await self._redis.get(key)
            if raw:
                state = msgspec.json.decode(raw)
                out[state["node_id"]] = state
        return out


def make_broker(config: BrokerConfig | None) -> LocalBroker:
    if config is None or config.backend == "none":
        return LocalBroker()
    return RedisBroker(config)
