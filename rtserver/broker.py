"""Beyond one process: Redis between rtserver nodes.

Without ``broker`` in the config every node is alone (``LocalBroker``: no
work at all). With ``broker: {backend: redis, url: ...}`` nodes share one
Redis, through these channels:

- ``<prefix>:u:<user_id>``: one publish per push to a user (the frame encoded
  once), subscribed only by nodes holding a session of that user, so a node
  without the user does no per-frame work;
- ``<prefix>:b``: broadcasts;
- ``<prefix>:n:<node_id>``: the node's own: requests for one of its sessions
  (a direct message, a disconnect), each answered on the asking node's
  channel, and receipts settled elsewhere for notifications it sent.

A session id is ``<node_id>.<random>``, so any node routes a request for a
session with one publish to the node that holds it and one answer back: no
lookup, and a session is reachable the moment it is registered and gone the
moment it closes. These keys say who is where, for the admin views:

- ``<prefix>:nodes``: a sorted set of node ids by last heartbeat (Redis's own
  clock); a node silent for ``session_ttl`` seconds is dead, and the first node
  to notice removes it and its sessions;
- ``<prefix>:node:<node_id>`` and ``<prefix>:user:<user_id>``: hashes of
  session id -> session info, written as sessions register and close
  (pipelined, off the hot path), read page by page (``HSCAN``) or per user;
- ``<prefix>:metrics``: node id -> that node's summary figures, per heartbeat.

Nothing rewrites a node's sessions periodically: a heartbeat is one small
script whatever the number of sessions. A node writes all its sessions back
only when Redis lost them (restarted empty, or the node was taken for dead) or
missed some of its writes, in chunks.

A message is ``<origin node>|<kind>|<a>|<b>|<c>\\n`` followed by a body: for a
push, the WebSocket frame exactly as the origin built it. While Redis is down
each node goes on delivering to its own sessions; it reconnects with backoff
and resubscribes by itself, and whatever a user missed meanwhile reaches them
through offline delivery or ``last_id``. Anything that needs another node
raises ``BrokerUnavailable`` (the API answers 503), and the views say
``"partial": true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import Collection, Sequence
from typing import Any, Protocol

import msgspec

from rtserver.backoff import Backoff
from rtserver.config import BrokerConfig
from rtserver.log import get_logger
from rtserver.resp import Arg, Command, Connection, Redis, RedisError, RedisUnavailable
from rtserver.sessions import Connection as Session
from rtserver.sessions import SessionRegistry

log = get_logger("rtserver.broker")

#: Seconds a request to another node's session waits for the answer.
ANSWER_TIMEOUT = 1.0
#: Sessions per pipeline when a node writes all of them back, or cleans up
#: after a dead node.
CHUNK = 500
#: Most commands in one pipeline.
SEND_BATCH = 1000
#: Largest page of the admin session list.
MAX_SESSIONS_PAGE = 10000


class BrokerUnavailable(Exception):
    """Redis, or the node holding a session, cannot be reached: whether
    another node can act is unknown."""


class Node(Protocol):
    """What a broker needs of the process it serves (``Hub`` is one): its
    sessions, where frames from other nodes go, and its summary figures."""

    sessions: SessionRegistry

    def from_cluster(
        self,
        user_id: str,
        framed: bytes,
        notification_id: str | None,
        exclude_session: str | None,
        origin: str,
        waiting: bool,
    ) -> None: ...

    def broadcast_from_cluster(self, framed: bytes) -> None: ...

    def message_from_cluster(self, session_id: str, framed: bytes) -> bool: ...

    def disconnect_session(self, session_id: str, reason: str = ...) -> bool: ...

    def settled_elsewhere(self, user_id: str, ids: list[str]) -> None: ...

    def topic_from_cluster(
        self, topic: str, publication_id: str | None, framed: bytes, *, presence: bool
    ) -> None: ...

    def summary(self) -> dict[str, Any]: ...


def session_info(conn: Session, node_id: str, *, live: bool = True) -> dict[str, Any]:
    """What the admin views show of a session (``live``: with its queue,
    which only the node holding it knows)."""
    info = conn.info()
    if not live:
        del info["outbound_bytes"]
    info["node_id"] = node_id
    return info


class LocalBroker:
    """A single process: nothing to share; the views are this node's."""

    node_id = "local"
    healthy = True
    enabled = False
    #: What this node's session ids start with.
    session_prefix = ""

    def __init__(self) -> None:
        self.node: Node | None = None

    async def start(self, node: Node) -> None:
        self.node = node

    async def stop(self) -> None:
        return None

    # -- fan-out ----------------------------------------------------------

    def publish_user(
        self,
        user_id: str,
        framed: bytes,
        notification_id: str | None,
        exclude: str | None,
        *,
        waiting: bool = False,
    ) -> None:
        """A push to ``user_id`` for the user's sessions on other nodes.
        ``waiting``: the notification is not delivered yet, so a node whose
        session gets it tells this one (``settle``)."""
        return None

    def publish_broadcast(self, framed: bytes) -> None:
        return None

    def settle(self, origin: str, user_id: str, ids: list[str]) -> None:
        """Tell the node that sent these notifications they are delivered."""
        return None

    # -- presence ---------------------------------------------------------

    def session_added(self, conn: Session) -> None:
        return None

    def session_removed(self, conn: Session) -> None:
        return None

    # -- topics -------------------------------------------------------------

    def topic_joined(self, conn: Session, topic: str, *, first: bool) -> None:
        """``conn`` subscribed to ``topic`` (``first``: this node's first)."""
        return None

    def topic_left(self, conn: Session, topic: str, *, last: bool) -> None:
        """``conn`` unsubscribed (``last``: this node has no subscriber left)."""
        return None

    def publish_topic(
        self, topic: str, framed: bytes, publication_id: str | None, *, presence: bool = False
    ) -> None:
        """A publication (or with ``presence``, a join or leave) for the
        topic's subscribers on other nodes."""
        return None

    async def topic_members(self, topic: str) -> tuple[list[tuple[str, str]], bool]:
        """Other nodes' subscribers of ``topic`` as (user id, session id),
        and whether that is partial (Redis could not be read)."""
        return [], False

    # -- requests to one session -------------------------------------------

    def holder(self, session_id: str) -> str | None:
        """The node holding ``session_id``, by its id; None when the id names
        no node (then no node holds it)."""
        node_id, dot, _ = session_id.rpartition(".")
        return node_id if dot and node_id else None

    async def send_to_session(self, session_id: str, framed: bytes) -> bool:
        """Push a frame to a session on another node: True when it got it,
        False when no node has it (``BrokerUnavailable``: cannot say)."""
        return False

    async def disconnect(self, session_id: str, reason: str) -> bool:
        """Close a session on another node; False when no node has it."""
        return False

    # -- views -------------------------------------------------------------

    async def sessions(
        self,
        user_id: str | None = None,
        *,
        cursor: str | None = None,
        limit: int = MAX_SESSIONS_PAGE,
    ) -> dict[str, Any]:
        """``{"sessions": [...], "next": cursor or None}`` (``"partial":
        true`` when other nodes could not be read): the user's sessions on
        every node, or a page of everyone's (``next`` gets the following one)."""
        assert self.node is not None
        if user_id is not None:
            return {"sessions": self._mine(self.node.sessions.of_user(user_id)), "next": None}
        page, after = self._local_page(cursor or "", limit)
        return {"sessions": page, "next": after}

    def _mine(self, conns: Collection[Session]) -> list[dict[str, Any]]:
        return [session_info(c, self.node_id) for c in conns]

    def _local_page(self, after: str, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """This node's sessions in session id order, after ``after``."""
        assert self.node is not None
        registry = self.node.sessions
        ids = sorted(sid for sid in registry.ids() if sid > after)
        page = [registry.get(sid) for sid in ids[:limit]]
        more = ids[limit - 1] if len(ids) > limit else None
        return self._mine([c for c in page if c is not None]), more

    async def metrics(self) -> dict[str, Any]:
        """Every live node's summary figures by node id, and ``partial``."""
        assert self.node is not None
        return {"nodes": {self.node_id: self.node.summary()}, "partial": False}


def _header(*fields: str) -> bytes:
    return "|".join(fields).encode() + b"\n"


# Scripts run in Redis, so that "now" is Redis's clock (the nodes' clocks may
# disagree) and each step is atomic.

#: KEYS: nodes, metrics, gone. ARGV: node id, ttl, summary JSON.
#: Returns {1 if the node was not in the set (Redis lost it), dead nodes}.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local added = redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if added == 1 then redis.call('SREM', KEYS[3], ARGV[1]) end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])))
for _, node in ipairs(dead) do
  redis.call('ZREM', KEYS[1], node)
  redis.call('HDEL', KEYS[2], node)
  redis.call('SADD', KEYS[3], node)
end
return {added, redis.call('SRANDMEMBER', KEYS[3])}
"""

#: KEYS: nodes. ARGV: ttl. Live node ids.
LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"""

#: KEYS: nodes, gone, then a hash per field to remove. ARGV: the dead node's
#: id, then the fields (session ids) in the same order. Unless the node came
#: back (it then writes its own sessions again), removes them: each session
#: from its node's, its user's and its topics' hashes.
FORGET = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('SREM', KEYS[2], ARGV[1])
  return 0
end
for i = 2, #ARGV do
  redis.call('HDEL', KEYS[i + 1], ARGV[i])
end
return 1
"""


class RedisBroker(LocalBroker):
    enabled = True

    def __init__(self, config: BrokerConfig) -> None:
        super().__init__()
        self.config = config
        self.node_id = config.node_id or secrets.token_hex(4)
        self.session_prefix = self.node_id + "."
        prefix = self.prefix = config.prefix
        self._redis = Redis(config.url or "redis://127.0.0.1:6379", timeout=config.timeout)
        self._nodes_key = f"{prefix}:nodes"
        self._metrics_key = f"{prefix}:metrics"
        self._gone_key = f"{prefix}:gone"
        self._own_channel = self._name("n", self.node_id)
        self._own_key = self._name("node", self.node_id)
        #: The subscribed connection, while there is one.
        self._sub: Connection | None = None
        self._pong = 0.0
        self._ponged = asyncio.Event()
        self._users: set[str] = set()
        #: Topics with a subscriber here: their channels are subscribed.
        self._topics: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        #: Publishes waiting for the sender, and presence writes.
        self._outbox: list[Command] = []
        self._presence: list[Command] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing queued or being sent
        self._idle.set()
        #: Receipts to tell other nodes, by (origin, user), sent once a turn.
        self._settling: dict[tuple[str, str], list[str]] = {}
        #: Requests to other nodes' sessions awaiting their answer.
        self._requests: dict[str, asyncio.Future[bool]] = {}
        self._request_ids = itertools.count(1)
        #: Publishes skipped because the outbox was full or Redis failed.
        self.dropped = 0
        self.healthy = False
        #: Redis may not hold all of this node's sessions (writes failed, or
        #: were skipped while it was down): the next heartbeat writes them back.
        self._stale = True
        self._resyncing: asyncio.Task[None] | None = None
        #: Dead nodes whose sessions this node is removing.
        self._forgetting: set[str] = set()
        self._stopping = False
        self._origin = self.node_id.encode()

    # -- lifecycle --------------------------------------------------------

    async def start(self, node: Node) -> None:
        self.node = node
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen()),
            loop.create_task(self._heartbeat()),
            loop.create_task(self._sender()),
        ]
        # Give the first connection a moment so a healthy cluster starts
        # ready: this node in the views before it takes a connection.
        for _ in range(50):
            if self.healthy:
                await self._beat()
                break
            await asyncio.sleep(0.02)
        log.info("broker.started", node_id=self.node_id, healthy=self.healthy)

    async def stop(self) -> None:
        """Leave the cluster: this node's sessions (closed by now) are
        written away, then the node is removed from the views at once."""
        if self.healthy:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained(), self.config.timeout)
        self._stopping = True
        for task in (*self._tasks, *self._background):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        with contextlib.suppress(RedisUnavailable):  # down: the others time us out
            await self._redis.pipeline(
                [
                    ("ZREM", self._nodes_key, self.node_id),
                    ("HDEL", self._metrics_key, self.node_id),
                    ("SADD", self._gone_key, self.node_id),  # sessions left: the next beat's
                ]
            )
        if self._sub is not None:
            self._sub.close()
        self._redis.close()

    async def _drained(self) -> None:
        """Until everything queued so far is sent (or failed)."""
        await self._idle.wait()

    async def _hscan(self, key: str, cursor: int, count: int) -> tuple[int, dict[bytes, bytes]]:
        after, flat = await self._redis.execute("HSCAN", key, cursor, "COUNT", count)
        return int(after), dict(zip(flat[::2], flat[1::2], strict=True))

    async def _eval(self, script: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        return await self._redis.execute("EVAL", script, len(keys), *keys, *args)

    # -- channels and keys ------------------------------------------------

    def _name(self, kind: str, name: str) -> str:
        """``<prefix>:<kind>:<name>``. Channels: ``u`` (a user's pushes), ``n``
        (a node's own), ``t`` (a topic's). Hashes: ``user``, ``node``, ``topic``
        (their sessions)."""
        return f"{self.prefix}:{kind}:{name}"

    # -- sending ----------------------------------------------------------

    def _publish(self, channel: str, message: bytes) -> None:
        """Queue a publish; one sender task sends them in order, pipelined."""
        if not self.healthy:
            return  # offline delivery and last_id cover what others miss now
        if len(self._outbox) >= self.config.outbox_limit:
            self.dropped += 1  # Redis cannot keep up: the same cover applies
            return
        self._outbox.append(("PUBLISH", channel, message))
        self._idle.clear()
        self._wake.set()

    def _write(self, *command: Arg) -> None:
        """Queue a presence write (never skipped for a full outbox: a lost one
        would leave the views wrong until the next write-back)."""
        if not self.healthy:
            self._stale = True
            return
        self._presence.append(command)
        self._idle.clear()
        self._wake.set()

    async def _sender(self) -> None:
        """Publishes and presence writes, in the order they were made: one
        pipeline per batch."""
        while not self._stopping:
            await self._wake.wait()
            while self._outbox or self._presence:
                # At most SEND_BATCH a write, so that parsing their replies
                # never holds the loop for long (a burst of registers).
                writes = self._presence[:SEND_BATCH]
                del self._presence[:SEND_BATCH]
                room = SEND_BATCH - len(writes)
                batch = self._outbox[:room]
                del self._outbox[:room]
                for attempt in (1, 2):  # a second try replaces a stale connection
                    try:
                        await self._redis.pipeline(writes + batch)
                        break
                    except RedisUnavailable as err:
                        if attempt == 2:
                            # The listener notices an outage and reports it;
                            # receivers recover these through last_id.
                            self.dropped += len(batch)
                            self._stale = self._stale or bool(writes)
                            log.warning("broker.publish_failed", count=len(batch), error=str(err))
            self._wake.clear()
            self._idle.set()

    def publish_user(
        self,
        user_id: str,
        framed: bytes,
        notification_id: str | None,
        exclude: str | None,
        *,
        waiting: bool = False,
    ) -> None:
        head = _header(
            self.node_id, "u", notification_id or "", exclude or "", "w" if waiting else ""
        )
        self._publish(self._name("u", user_id), head + framed)

    def publish_broadcast(self, framed: bytes) -> None:
        self._publish(f"{self.prefix}:b", _header(self.node_id, "b", "", "", "") + framed)

    def settle(self, origin: str, user_id: str, ids: list[str]) -> None:
        if not self._settling:
            asyncio.get_running_loop().call_soon(self._send_settled)
        self._settling.setdefault((origin, user_id), []).extend(ids)

    def _send_settled(self) -> None:
        settling, self._settling = self._settling, {}
        for (origin, user_id), ids in settling.items():
            self._publish(
                self._name("n", origin),
                _header(self.node_id, "r", "", "", "") + msgspec.json.encode([user_id, ids]),
            )

    def _spawn(self, awaitable: Any) -> None:
        async def run() -> None:
            try:
                await awaitable
            except Exception as err:
                log.warning("broker.command_failed", error=str(err))

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- presence ---------------------------------------------------------

    def session_added(self, conn: Session) -> None:
        user_id = conn.user_id
        assert user_id is not None
        if user_id not in self._users:
            self._users.add(user_id)
            self._subscribe("SUBSCRIBE", self._name("u", user_id))
        self._write_session(conn)

    def _write_session(self, conn: Session) -> None:
        assert conn.user_id is not None
        info = msgspec.json.encode(session_info(conn, self.node_id, live=False))
        self._write("HSET", self._own_key, conn.session_id, info)
        self._write("HSET", self._name("user", conn.user_id), conn.session_id, info)

    def session_removed(self, conn: Session) -> None:
        user_id = conn.user_id
        assert user_id is not None and self.node is not None
        self._write("HDEL", self._own_key, conn.session_id)
        self._write("HDEL", self._name("user", user_id), conn.session_id)
        if user_id in self._users and not self.node.sessions.view_of_user(user_id):
            self._users.discard(user_id)
            self._subscribe("UNSUBSCRIBE", self._name("u", user_id))

    def topic_joined(self, conn: Session, topic: str, *, first: bool) -> None:
        if first:
            self._topics.add(topic)
            self._subscribe("SUBSCRIBE", self._name("t", topic))
        self._write_member(conn, topic)
        self._write_session(conn)  # its topics, for the cleanup after a crash

    def _write_member(self, conn: Session, topic: str) -> None:
        member = msgspec.json.encode({"user_id": conn.user_id, "node_id": self.node_id})
        self._write("HSET", self._name("topic", topic), conn.session_id, member)

    def topic_left(self, conn: Session, topic: str, *, last: bool) -> None:
        if last:
            self._topics.discard(topic)
            self._subscribe("UNSUBSCRIBE", self._name("t", topic))
        self._write("HDEL", self._name("topic", topic), conn.session_id)
        assert self.node is not None
        if self.node.sessions.get(conn.session_id) is conn:  # not closing
            self._write_session(conn)

    def publish_topic(
        self, topic: str, framed: bytes, publication_id: str | None, *, presence: bool = False
    ) -> None:
        head = _header(self.node_id, "t", publication_id or "", "", "p" if presence else "")
        self._publish(self._name("t", topic), head + framed)

    async def topic_members(self, topic: str) -> tuple[list[tuple[str, str]], bool]:
        try:
            live = set(await self._live()) - {self.node_id}
            held = await self._redis.execute("HGETALL", self._name("topic", topic))
        except (RedisUnavailable, RedisError) as err:
            log.warning("broker.command_failed", error=str(err))
            return [], True
        members = []
        for sid, raw in zip(held[::2], held[1::2], strict=True):
            member = msgspec.json.decode(raw)
            if member.get("node_id") in live:
                members.append((member["user_id"], sid.decode()))
        return members, False

    def _subscribe(self, command: str, channel: str) -> None:
        """(Un)subscribe now; while disconnected, ``_listen`` subscribes to
        every watched channel when it connects again."""
        if self._sub is not None and self._sub.open:
            self._sub.write((command, channel))

    async def _write_back(self) -> None:
        """Make Redis hold exactly this node's sessions again: remove those
        it holds that are gone, then write every session, in chunks, through
        the same ordered queue as register and close (so a session that
        closes meanwhile is not written back after its removal)."""
        assert self.node is not None
        registry = self.node.sessions
        self._stale = False
        cursor = 0
        while True:
            cursor, entries = await self._hscan(self._own_key, cursor, count=CHUNK)
            for sid, raw in entries.items():
                if registry.get(sid.decode()) is None:
                    info = msgspec.json.decode(raw)
                    self._write("HDEL", self._own_key, sid)
                    self._write("HDEL", self._name("user", info["user_id"]), sid)
                    for topic in info.get("topics", ()):
                        self._write("HDEL", self._name("topic", topic), sid)
            if cursor == 0:
                break
        conns = registry.registered()
        for start in range(0, len(conns), CHUNK):
            for conn in conns[start : start + CHUNK]:
                if registry.get(conn.session_id) is conn:
                    self._write_session(conn)
                    for topic in conn.topics:
                        self._write_member(conn, topic)
            await self._drained()
        log.info("broker.written_back", node_id=self.node_id, sessions=len(conns))

    async def _forget_node(self, node_id: str) -> None:
        """A dead node: remove its sessions from the user hashes, in chunks;
        stops if the node comes back (it then writes its own again)."""
        self._forgetting.add(node_id)
        try:
            await self._forget(node_id, self._name("node", node_id))
        finally:
            self._forgetting.discard(node_id)

    async def _forget(self, node_id: str, key: str) -> None:
        count = 0
        while True:
            _, entries = await self._hscan(key, 0, count=CHUNK)
            if not entries:
                break
            hashes, fields = [], []
            for sid, raw in entries.items():
                info = msgspec.json.decode(raw)
                for held_in in (key, self._name("user", info["user_id"])):
                    hashes.append(held_in)
                    fields.append(sid)
                for topic in info.get("topics", ()):
                    hashes.append(self._name("topic", topic))
                    fields.append(sid)
            keys = [self._nodes_key, self._gone_key, *hashes]
            if not await self._eval(FORGET, keys, [node_id, *fields]):
                return
            count += len(entries)
        await self._redis.execute("SREM", self._gone_key, node_id)
        log.info("broker.node_forgotten", node_id=node_id, sessions=count)

    # -- requests to one session -------------------------------------------

    async def send_to_session(self, session_id: str, framed: bytes) -> bool:
        return await self._request(session_id, "m", framed)

    async def disconnect(self, session_id: str, reason: str) -> bool:
        return await self._request(session_id, "d", reason.encode())

    async def _request(self, session_id: str, op: str, body: bytes) -> bool:
        """One publish to the node holding the session and its answer: it
        did (True) or has no such session (False). No answer within a
        second, or Redis unreachable: ``BrokerUnavailable``."""
        node_id = self.holder(session_id)
        if node_id is None or node_id == self.node_id:
            return False
        if not self.healthy:
            raise BrokerUnavailable("redis is unreachable")
        request = str(next(self._request_ids))
        answer = asyncio.get_running_loop().create_future()
        self._requests[request] = answer
        message = _header(self.node_id, "q", request, session_id, op) + body
        try:
            if not await self._redis.execute("PUBLISH", self._name("n", node_id), message):
                # Nobody listens there: a dead node's sessions are gone; a
                # live one's listener is reconnecting.
                if node_id in await self._live():
                    raise BrokerUnavailable(f"node {node_id} is not listening")
                return False
            return await asyncio.wait_for(answer, ANSWER_TIMEOUT)
        except TimeoutError:
            raise BrokerUnavailable(f"node {node_id} did not answer") from None
        except (RedisUnavailable, RedisError) as err:
            log.warning("broker.command_failed", error=str(err))
            raise BrokerUnavailable(str(err)) from None
        finally:
            del self._requests[request]

    def _answer(self, origin: str, request: bytes, session_id: str, op: bytes, body: bytes) -> None:
        assert self.node is not None
        if op == b"m":
            done = self.node.message_from_cluster(session_id, body)
        else:
            done = self.node.disconnect_session(session_id, body.decode())
        self._publish(
            self._name("n", origin),
            _header(self.node_id, "a", request.decode(), "1" if done else "", ""),
        )

    # -- receiving --------------------------------------------------------

    def _lost(self, err: BaseException | None) -> None:
        if self.healthy:
            log.warning("broker.unreachable", node_id=self.node_id, error=str(err))
        self.healthy = False
        self._stale = True

    async def _listen(self) -> None:
        """Keep a subscribed connection: its messages are delivered as they
        are parsed; a ping every second (and its pong within
        ``broker.timeout``) proves it alive; a lost one is replaced, with
        backoff, and subscribed again to every channel."""
        backoff = Backoff(0.05, 2.0)
        loop = asyncio.get_running_loop()
        while not self._stopping:
            sub = None
            try:
                sub = await self._redis.subscriber(self._pushed)
                channels = [f"{self.prefix}:b", self._own_channel]
                channels += [self._name("u", u) for u in self._users]
                channels += [self._name("t", t) for t in self._topics]
                self._ponged.clear()
                sub.write(("SUBSCRIBE", *channels), ("PING",))
                # The pong comes after every subscription is confirmed.
                await asyncio.wait_for(self._ponged.wait(), self.config.timeout)
                self._sub = sub
                if not self.healthy:
                    log.info("broker.connected", node_id=self.node_id, channels=len(channels))
                self.healthy = True
                backoff.reset()
                while not sub.lost.done():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(sub.lost), 1.0)
                    if loop.time() - self._pong > 1.0 + self.config.timeout:
                        raise RedisUnavailable("redis stopped answering pings")
                    if not sub.lost.done():
                        sub.write(("PING",))
                raise RedisUnavailable("connection to redis lost")
            except (RedisUnavailable, TimeoutError) as err:
                self._lost(err)
                self._sub = None
                if sub is not None:
                    sub.close()
                await asyncio.sleep(backoff.next_delay())

    def _pushed(self, push: list[Any]) -> None:
        kind = push[0]
        if kind == b"message":
            try:
                self._deliver(push[1], push[2])
            except Exception:
                log.exception("broker.bad_message", channel=push[1])
        elif kind == b"pong":
            self._pong = asyncio.get_running_loop().time()
            self._ponged.set()

    def _deliver(self, channel: bytes, data: bytes) -> None:
        head, _, body = data.partition(b"\n")
        origin, kind, a, b, c = head.split(b"|", 4)
        node = self.node
        if origin == self._origin or node is None:
            return
        if kind == b"u":
            user_id = channel[len(self._name("u", "")) :].decode()
            node.from_cluster(
                user_id, body, a.decode() or None, b.decode() or None, origin.decode(), c == b"w"
            )
        elif kind == b"b":
            node.broadcast_from_cluster(body)
        elif kind == b"t":
            topic = channel[len(self._name("t", "")) :].decode()
            node.topic_from_cluster(topic, a.decode() or None, body, presence=c == b"p")
        elif kind == b"q":
            self._answer(origin.decode(), a, b.decode(), c, body)
        elif kind == b"a":
            answer = self._requests.get(a.decode())
            if answer is not None and not answer.done():
                answer.set_result(b == b"1")
        elif kind == b"r":
            user_id, ids = msgspec.json.decode(body, type=tuple[str, list[str]])
            node.settled_elsewhere(user_id, ids)

    # -- liveness ---------------------------------------------------------

    async def _heartbeat(self) -> None:
        """One script a beat, whatever the number of sessions: this node is
        alive (with its summary); the dead are removed, and their sessions
        forgotten; Redis lost this node's sessions (or some writes): write
        them back."""
        interval = max(0.1, self.config.session_ttl / 3)
        while not self._stopping:
            await asyncio.sleep(interval)
            if self.healthy:
                await self._beat()

    async def _beat(self) -> None:
        assert self.node is not None
        try:
            added, gone = await self._eval(
                HEARTBEAT,
                [self._nodes_key, self._metrics_key, self._gone_key],
                [self.node_id, self.config.session_ttl, msgspec.json.encode(self.node.summary())],
            )
        except (RedisUnavailable, RedisError) as err:
            log.debug("broker.heartbeat_failed", error=str(err))
            return
        if (added or self._stale) and self._resyncing is None:
            self._resyncing = asyncio.get_running_loop().create_task(self._resync())
        dead = None if gone is None else gone.decode()
        if dead not in (None, self.node_id) and dead not in self._forgetting:
            self._spawn(self._forget_node(dead))

    async def _resync(self) -> None:
        try:
            await self._write_back()
        except (RedisUnavailable, RedisError) as err:
            self._stale = True
            log.warning("broker.write_back_failed", error=str(err))
        finally:
            self._resyncing = None

    async def _live(self) -> list[str]:
        nodes = await self._eval(LIVE, [self._nodes_key], [self.config.session_ttl])
        return [n.decode() for n in nodes]

    # -- views -------------------------------------------------------------

    async def sessions(
        self,
        user_id: str | None = None,
        *,
        cursor: str | None = None,
        limit: int = MAX_SESSIONS_PAGE,
    ) -> dict[str, Any]:
        """This node's sessions from memory (with their queues), the others'
        from Redis: a user's with one read, everyone's a page at a time.
        ``next`` is ``<node id>:<position>``."""
        assert self.node is not None
        if user_id is not None:
            mine = self._mine(self.node.sessions.of_user(user_id))
            try:
                live = set(await self._live()) - {self.node_id}
                held = await self._redis.execute("HVALS", self._name("user", user_id))
            except (RedisUnavailable, RedisError) as err:
                log.warning("broker.command_failed", error=str(err))
                return {"sessions": mine, "next": None, "partial": True}
            others = [msgspec.json.decode(raw) for raw in held]
            others = [info for info in others if info.get("node_id") in live]
            return {"sessions": mine + others, "next": None, "partial": False}
        node_id, _, position = (cursor or f"{self.node_id}:").partition(":")
        out: list[dict[str, Any]] = []
        if node_id == self.node_id:
            out, after = self._local_page(position, limit)
            if after is not None:
                return {"sessions": out, "next": f"{self.node_id}:{after}", "partial": False}
            node_id, position = "", "0"
        try:
            todo = sorted(n for n in await self._live() if n != self.node_id and n >= node_id)
            scan = int(position) if todo and todo[0] == node_id and position.isdigit() else 0
            for other in todo:
                if len(out) >= limit:
                    return {"sessions": out, "next": f"{other}:{scan}", "partial": False}
                while True:
                    scan, entries = await self._hscan(
                        self._name("node", other), scan, count=limit - len(out)
                    )
                    out += [msgspec.json.decode(raw) for raw in entries.values()]
                    if scan == 0 or len(out) >= limit:
                        break
                if scan:
                    return {"sessions": out, "next": f"{other}:{scan}", "partial": False}
        except (RedisUnavailable, RedisError) as err:
            log.warning("broker.command_failed", error=str(err))
            return {"sessions": out, "next": None, "partial": True}
        return {"sessions": out, "next": None, "partial": False}

    async def metrics(self) -> dict[str, Any]:
        assert self.node is not None
        nodes = {self.node_id: self.node.summary()}
        try:
            live = [n for n in await self._live() if n != self.node_id]
            if live:
                for node_id, raw in zip(
                    live, await self._redis.execute("HMGET", self._metrics_key, *live), strict=True
                ):
                    if raw is not None:
                        nodes[node_id] = msgspec.json.decode(raw)
        except (RedisUnavailable, RedisError) as err:
            log.warning("broker.command_failed", error=str(err))
            return {"nodes": nodes, "partial": True}
        return {"nodes": nodes, "partial": False}


def make_broker(config: BrokerConfig | None) -> LocalBroker:
    if config is None or config.backend == "none":
        return LocalBroker()
    return RedisBroker(config)
