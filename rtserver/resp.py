"""A small Redis client for the broker: RESP2 over an asyncio protocol.

The broker's hot path is a publish and a received message per frame that
crosses nodes (a direct message is two of each). redis-py's asyncio client
spends about 0.2 ms of CPU on each (a coroutine, a connection checkout and a
timeout per command, a task step per received message), which made a direct
message through another node cost three times a local one. Here a command is
a write and a future resolved in ``data_received``, a pipeline is one write,
and a subscriber's messages are handed over as they are parsed, with no task
in between.

    redis = Redis("redis://:password@127.0.0.1:6379/0", timeout=2.0)
    await redis.execute("SET", "k", "v")
    replies = await redis.pipeline([("PUBLISH", "c", b"m"), ("HSET", "h", "f", "v")])
    conn = await redis.subscriber(on_push)  # on_push([b"message", channel, data])
    conn.write(("SUBSCRIBE", "c"))

URLs: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS) and
``unix:///path/to.sock[?db=N]``.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

Arg = bytes | str | int | float
Command = Sequence[Arg]

#: Kinds of the arrays a subscribed connection is pushed, not replies.
PUSHES = frozenset((b"message", b"subscribe", b"unsubscribe", b"pong"))


class RedisError(Exception):
    """Redis answered a command with an error."""


class RedisUnavailable(ConnectionError):
    """Redis cannot be reached, or did not answer in time."""


INCOMPLETE = object()


class Reader:
    """Incremental RESP2: feed bytes, take whole values."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def get(self) -> Any:
        """The next whole value, or ``INCOMPLETE``. An error reply is
        returned as a ``RedisError``, not raised."""
        value, end = self._parse(self._pos)
        if end < 0:
            return INCOMPLETE
        self._pos = end
        return value

    def _parse(self, pos: int) -> tuple[Any, int]:
        buf = self._buf
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return None, -1
        kind = buf[pos]
        line = buf[pos + 1 : nl]
        pos = nl + 2
        if kind == 0x24:  # $ bulk string
            size = int(line)
            if size < 0:
                return None, pos
            end = pos + size
            if len(buf) < end + 2:
                return None, -1
            return bytes(buf[pos:end]), end + 2
        if kind == 0x3A:  # : integer
            return int(line), pos
        if kind == 0x2A:  # * array
            count = int(line)
            if count < 0:
                return None, pos
            items = []
            for _ in range(count):
                item, pos = self._parse(pos)
                if pos < 0:
                    return None, -1
                items.append(item)
            return items, pos
        if kind == 0x2B:  # + simple string
            return bytes(line), pos
        if kind == 0x2D:  # - error
            return RedisError(line.decode(errors="replace")), pos
        raise RedisError(f"not RESP: {bytes(buf[pos - len(line) - 3 : pos])!r}")


def _arg(value: Arg) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


def encode(commands: Sequence[Command]) -> bytes:
    out = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for value in command:
            data = _arg(value)
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Connection(asyncio.Protocol):
    """One connection: each command's reply resolves its future, in order;
    with ``on_push``, a subscribed connection's messages go there instead."""

    def __init__(self, on_push: Callable[[list[Any]], None] | None = None) -> None:
        self.on_push = on_push
        self._reader = Reader()
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def open(self) -> bool:
        return self._transport is not None and not self.lost.done()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            while (value := reader.get()) is not INCOMPLETE:
                if (
                    self.on_push is not None
                    and isinstance(value, list)
                    and value
                    and value[0] in PUSHES
                ):
                    self.on_push(value)
                elif self._waiting:
                    future = self._waiting.popleft()
                    if not future.done():
                        future.set_result(value)  # an error reply too: the caller decides
        except (RedisError, ValueError) as err:  # not RESP: no reply can be trusted
            self.close(RedisUnavailable(f"bad reply from redis: {err}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisUnavailable(f"connection to redis lost: {exc or 'closed'}"))

    def _fail(self, err: Exception) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(err)
        if not self.lost.done():
            self.lost.set_result(None)

    def write(self, *commands: Command) -> None:
        """Send without waiting for replies (a subscriber's commands)."""
        if not self.open:
            raise RedisUnavailable("not connected to redis")
        assert self._transport is not None
        self._transport.write(encode(commands))

    def send(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        """Send all in one write; a future per reply."""
        self.write(*commands)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._waiting.extend(futures)
        return futures

    def close(self, err: Exception | None = None) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._fail(err or RedisUnavailable("connection to redis closed"))


class Redis:
    """Commands over one lazily (re)opened connection, pipelined: replies
    come in order, so any number of callers share it."""

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.timeout = timeout
        self._unix = parts.path if parts.scheme == "unix" else None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{url}: not a redis://, rediss:// or unix:// URL")
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        path_db = parts.path.strip("/") if parts.scheme != "unix" else ""
        self._db = int(path_db or query.get("db", ["0"])[0])
        self._conn: Connection | None = None
        self._opening: asyncio.Lock | None = None

    async def _open(self, on_push: Callable[[list[Any]], None] | None) -> Connection:
        loop = asyncio.get_running_loop()
        conn: Connection | None = None
        try:
            async with asyncio.timeout(self.timeout):
                if self._unix is not None:
                    _, conn = await loop.create_unix_connection(
                        lambda: Connection(on_push), self._unix
                    )
                else:
                    _, conn = await loop.create_connection(
                        lambda: Connection(on_push), self._host, self._port, ssl=self._ssl
                    )
                hello: list[Command] = []
                if self._password is not None:
                    auth = (self._user, self._password) if self._user else (self._password,)
                    hello.append(("AUTH", *auth))
                if self._db and on_push is None:
                    hello.append(("SELECT", self._db))
                if hello:
                    for reply in await asyncio.gather(*conn.send(hello), return_exceptions=True):
                        if isinstance(reply, Exception):
                            conn.close()
                            raise reply
        except (OSError, TimeoutError) as err:
            if conn is not None:
                conn.close()
            raise RedisUnavailable(f"cannot connect to redis: {err or 'timed out'}") from None
        return conn

    async def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and conn.open:
            return conn
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._conn is None or not self._conn.open:
                self._conn = await self._open(None)
            return self._conn

    async def pipeline(self, commands: Sequence[Command]) -> list[Any]:
        """Send the commands in one write; their replies, in order (an error
        reply is a ``RedisError`` in the list). ``RedisUnavailable`` when the
        connection fails or the replies do not come within ``timeout``."""
        if not commands:
            return []
        conn = await self._connection()
        futures = conn.send(commands)
        try:
            async with asyncio.timeout(self.timeout):
                replies = await asyncio.gather(*futures, return_exceptions=True)
        except TimeoutError:
            # Replies still to come would answer the wrong callers.
            conn.close(RedisUnavailable("redis did not answer in time"))
            raise RedisUnavailable("redis did not answer in time") from None
        for reply in replies:
            if isinstance(reply, RedisUnavailable):
                raise reply
        return replies

    async def execute(self, *command: Arg) -> Any:
        """One command's reply; raises its error."""
        (reply,) = await self.pipeline([command])
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def subscriber(self, on_push: Callable[[list[Any]], None]) -> Connection:
        """A connection of its own for ``SUBSCRIBE``: whatever Redis pushes
        (``[b"message", channel, data]``, confirmations, pongs) goes to ``on_push``."""
        return await self._open(on_push)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
