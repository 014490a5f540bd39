"""The broker's Redis client (rtserver/resp.py): the RESP2 reader byte by
byte, then commands, pipelines, errors, AUTH, databases, a unix socket,
subscriptions and outages against a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rtserver.resp import INCOMPLETE, Reader, Redis, RedisError, RedisUnavailable, encode

from .test_cluster import REDIS
from .test_cluster import Redis as RedisServer

needs_redis = pytest.mark.skipif(
    REDIS is None, reason="needs redis-server: apt-get install redis-server (.ci/run does)"
)


def read_all(data: bytes, step: int) -> list[Any]:
    """Feed ``data`` ``step`` bytes at a time; every value that completes."""
    reader = Reader()
    out = []
    for i in range(0, len(data), step):
        reader.feed(data[i : i + step])
        while (value := reader.get()) is not INCOMPLETE:
            out.append(value)
    return out


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_the_reader_takes_values_split_anywhere(step: int) -> None:
    data = (
        b"+OK\r\n:42\r\n$5\r\nhe\r\no\r\n$-1\r\n*-1\r\n*0\r\n-ERR bad thing\r\n"
        b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$0\r\n\r\n"
        b"*2\r\n:1\r\n*2\r\n$1\r\na\r\n:-7\r\n"
    )
    values = read_all(data, step)
    assert values[:7] == [b"OK", 42, b"he\r\no", None, None, [], values[6]]
    assert isinstance(values[6], RedisError) and str(values[6]) == "ERR bad thing"
    assert values[7:] == [[b"message", b"ch", b""], [1, [b"a", -7]]]


def test_the_reader_refuses_what_is_not_resp() -> None:
    reader = Reader()
    reader.feed(b"?what\r\n")
    with pytest.raises(RedisError):
        reader.get()


def test_encode_makes_bulk_strings_of_everything() -> None:
    assert encode([("SET", b"k\r\n", 5, 1.5)]) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n5\r\n$3\r\n1.5\r\n"
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    srv = RedisServer(("--requirepass", "s3cret", "--unixsocket", str(tmp_path / "r.sock")))
    srv.start()
    yield srv
    srv.stop()


@needs_redis
async def test_commands_pipelines_and_errors(server: RedisServer, tmp_path: Path) -> None:
    redis = Redis(f"redis://:s3cret@127.0.0.1:{server.port}/3", timeout=2.0)
    try:
        assert await redis.execute("SET", "k", b"v\x00\xff") == b"OK"
        assert await redis.execute("GET", "k") == b"v\x00\xff"
        with pytest.raises(RedisError, match="WRONGTYPE"):
            await redis.execute("HGET", "k", "f")
        replies = await redis.pipeline(
            [("HSET", "h", "a", 1), ("LPUSH", "h", "x"), ("HGETALL", "h"), ("DEL", "h")]
        )
        assert replies[0] == 1 and isinstance(replies[1], RedisError)
        assert replies[2:] == [[b"a", b"1"], 1]
        # Many callers share the one connection; each gets its own reply.
        got = await asyncio.gather(*(redis.execute("ECHO", str(i)) for i in range(200)))
        assert got == [str(i).encode() for i in range(200)]
        other = Redis(f"redis://:s3cret@127.0.0.1:{server.port}/0")
        assert await other.execute("GET", "k") is None  # database 3 is not 0
        other.close()
        sock = Redis(f"unix://:s3cret@{tmp_path / 'r.sock'}?db=3")
        assert await sock.execute("GET", "k") == b"v\x00\xff"
        sock.close()
    finally:
        redis.close()
    wrong = Redis(f"redis://:nope@127.0.0.1:{server.port}/0")
    with pytest.raises(RedisError, match=r"WRONGPASS|invalid"):
        await wrong.execute("PING")
    wrong.close()


@needs_redis
async def test_a_subscriber_gets_messages_as_they_come(server: RedisServer) -> None:
    url = f"redis://:s3cret@127.0.0.1:{server.port}/0"
    redis = Redis(url)
    pushed: list[list[Any]] = []
    arrived, done = asyncio.Event(), asyncio.Event()

    def on_push(push: list[Any]) -> None:
        pushed.append(push)
        if push[0] == b"pong":
            arrived.set()
        if push[:2] == [b"message", b"b"]:
            done.set()

    sub = await redis.subscriber(on_push)
    sub.write(("SUBSCRIBE", "a", "b"), ("PING",))
    await asyncio.wait_for(arrived.wait(), 2)
    assert await redis.execute("PUBLISH", "a", b"x" * 100_000) == 1
    assert await redis.execute("PUBLISH", "c", b"nobody") == 0
    await redis.execute("PUBLISH", "b", b"")
    await asyncio.wait_for(done.wait(), 2)
    messages = [p for p in pushed if p[0] == b"message"]
    assert messages == [[b"message", b"a", b"x" * 100_000], [b"message", b"b", b""]]
    sub.close()
    await asyncio.wait_for(sub.lost, 1)
    redis.close()


@needs_redis
async def test_an_outage_is_an_error_not_a_hang(server: RedisServer) -> None:
    """Redis killed: the next command fails at once with RedisUnavailable,
    and the connection comes back by itself once Redis does."""
    redis = Redis(f"redis://:s3cret@127.0.0.1:{server.port}/0", timeout=0.5)
    assert await redis.execute("PING") == b"PONG"
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable):
        await redis.execute("PING")
    with pytest.raises(RedisUnavailable):
        await redis.execute("PING")
    assert time.monotonic() - t0 < 1.5
    server.start()
    assert await redis.execute("PING") == b"PONG"
    redis.close()


@needs_redis
async def test_a_silent_redis_times_out() -> None:
    """A server that accepts and never answers: RedisUnavailable after the
    timeout, not a hang."""
    held: list[asyncio.StreamWriter] = []
    srv = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    redis = Redis(f"redis://127.0.0.1:{port}/0", timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable, match="in time"):
        await redis.execute("PING")
    assert time.monotonic() - t0 < 1.0
    redis.close()
    for writer in held:
        writer.close()
    srv.close()
    await srv.wait_closed()


def test_urls() -> None:
    with pytest.raises(ValueError, match="redis://"):
        Redis("http://127.0.0.1")
