"""rtserver's own WebSocket code (``rtserver.websocket``) at the byte level:
a real server on a loopback port and a raw socket speaking RFC 6455, so that
what a library client would smooth over (fragments, control frames, bad
frames, the closing handshake) is seen as sent. Which implementation answered
shows in the 101: Tornado's carries a ``Server`` header, rtserver's does not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from rtserver.client import ClientError
from rtserver.protocol import close_payload
from rtserver.websocket import accept_key

from .conftest import Running, StartServer
from .rawws import KEY, RawWebSocket


class Raw(RawWebSocket):
    """Remembers every client opened, for the fixture below to close."""

    opened: list[Raw] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        Raw.opened.append(self)


@pytest.fixture(autouse=True)
async def close_raw_clients() -> AsyncIterator[None]:
    yield
    while Raw.opened:
        Raw.opened.pop().close()
    await asyncio.sleep(0)  # the transports finish closing


@pytest.fixture
async def raw(server: Running) -> Raw:
    return await Raw.open(server.port)


def served_by_rtserver(raw: Raw) -> bool:
    return b"\r\nserver:" not in raw.response.lower()


async def test_handshake_answer(raw: Raw) -> None:
    """101 with the RFC 6455 accept value for the key (RFC 6455 1.3's example)."""
    assert raw.response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in raw.response
    assert accept_key(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert served_by_rtserver(raw)


async def test_fragmented_message_with_a_ping_between(server: Running, raw: Raw) -> None:
    """A message in three fragments with a ping among them: the pong comes
    first, then the reply to the whole message."""
    token = server.token("frag")
    text = json.dumps({"event": "register", "id": 7, "data": {"token": token}}).encode()
    raw.send(0x1, text[:10], fin=False)
    raw.send(0x0, text[10:20], fin=False)
    raw.send(0x9, b"are you there")
    raw.send(0x0, text[20:])
    assert await raw.frame() == (0xA, b"are you there")
    ack = await raw.json()
    assert ack["event"] == "ack" and ack["id"] == 7 and ack["data"]["user_id"] == "frag"
    await server.hub.send_notification("frag", {"message": "over raw frames"})
    note = await raw.json()
    assert note["event"] == "notification" and note["data"]["message"] == "over raw frames"


async def test_messages_are_handled_in_order(server: Running, raw: Raw) -> None:
    """Frames sent back to back are answered in order, each after the previous
    handler finished (register awaits the store; the next frame waits)."""
    raw.text({"event": "register", "id": 1, "data": {"token": server.token("order")}})
    for i in range(2, 6):
        raw.text({"event": "get_notifications", "id": i, "data": {}})
    ids = [(await raw.json())["id"] for _ in range(5)]
    assert ids == [1, 2, 3, 4, 5]


async def test_client_close_is_answered(server: Running) -> None:
    """The client's close (1000) is echoed and the server closes the socket;
    the session is gone and the log, in the connection's context, says the
    client closed with 1000."""
    with capture_logs(processors=[merge_contextvars]) as logs:
        raw = await Raw.open(server.port)
        raw.text({"event": "register", "id": 1, "data": {"token": server.token("bye")}})
        await raw.json()
        raw.send(0x8, (1000).to_bytes(2, "big") + b"done")
        assert await raw.closed_with() == (1000, "")
        for _ in range(100):
            if any(e["event"] == "connection.closed" for e in logs):
                break
            await asyncio.sleep(0.01)
    assert server.hub.get_user_sessions("bye") == []
    by_event = {e["event"]: e for e in logs}
    closed = by_event["connection.closed"]
    assert closed["code"] == 1000 and closed["reason"] == "done" and closed["user_id"] == "bye"
    assert closed["session_id"] == by_event["connection.opened"]["session_id"]


@pytest.mark.parametrize(
    ("send", "code"),
    [
        (lambda raw: raw.send(0x1, b'{"event":"x"}', masked=False), 1002),
        (lambda raw: raw.send(0x1, b'"\xff\xfe"'), 1007),
        (lambda raw: raw.send(0x3, b"reserved opcode"), 1002),
        (lambda raw: raw.send(0x0, b"continuation of nothing"), 1002),
        (lambda raw: raw.send(0x9, b"x", fin=False), 1002),
        (lambda raw: raw.send(0x8, b"\x03"), 1002),
    ],
    ids=[
        "unmasked",
        "bad-utf8",
        "reserved-opcode",
        "stray-continuation",
        "fragmented-ping",
        "one-byte-close",
    ],
)
async def test_protocol_errors_close_with_a_code(
    server: Running, raw: Raw, send: Any, code: int
) -> None:
    """A frame that breaks RFC 6455 closes that connection with the code that
    says why; other clients never notice."""
    bystander = await server.user("bystander")
    send(raw)
    assert (await raw.closed_with())[0] == code
    await server.hub.send_notification("bystander", {"message": "still here"})
    assert (await bystander.next("notification"))["message"] == "still here"


async def test_server_close_waits_for_the_answer(server: Running, raw: Raw) -> None:
    """An admin disconnect sends close 1008; the server closes TCP once the
    client answers."""
    raw.text({"event": "register", "id": 1, "data": {"token": server.token("kicked")}})
    await raw.json()
    (conn,) = server.hub.sessions.of_user("kicked")
    conn.close(1008, "disconnected by an administrator")
    opcode, payload = await raw.frame()
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1008
    assert payload[2:] == b"disconnected by an administrator"
    raw.send(0x8, payload[:2])
    assert await asyncio.wait_for(raw.reader.read(), 5) == b""


async def test_upgrade_in_pieces_goes_to_tornado(server: Running) -> None:
    """A request head that does not arrive in one piece is served by Tornado's
    WebSocketHandler: the same protocol, a little slower."""
    raw = await Raw.open(server.port, pieces=3)
    assert raw.response.startswith(b"HTTP/1.1 101") and not served_by_rtserver(raw)
    raw.text({"event": "register", "id": 1, "data": {"token": server.token("slowpoke")}})
    assert (await raw.json())["data"]["user_id"] == "slowpoke"


async def test_repeated_headers_go_to_tornado(server: Running) -> None:
    """A head rtserver does not parse itself (a repeated header) is Tornado's."""
    raw = await Raw.open(server.port, headers="Cookie: a=1\r\nCookie: b=2\r\n")
    assert raw.response.startswith(b"HTTP/1.1 101") and not served_by_rtserver(raw)


def test_close_reason_fits_a_control_frame() -> None:
    """A reason is cut to 123 bytes at a character boundary (valid UTF-8)."""
    payload = close_payload(1001, "é" * 100)
    assert len(payload) <= 125 and payload[:2] == b"\x03\xe9"
    assert payload[2:].decode() == "é" * 61


async def test_cross_origin_refusal_is_tornados(start_server: StartServer) -> None:
    """A browser from an origin not configured gets Tornado's 403; a configured
    one (and the same origin) is upgraded by rtserver."""
    server = await start_server(server={"allowed_origins": ["https://app.example.com"]})
    evil = await Raw.open(server.port, headers="Origin: https://evil.example.net\r\n")
    assert evil.response.startswith(b"HTTP/1.1 403")
    ok = await Raw.open(server.port, headers="Origin: https://app.example.com\r\n")
    same = await Raw.open(server.port, headers=f"Origin: http://127.0.0.1:{server.port}\r\n")
    assert served_by_rtserver(ok) and served_by_rtserver(same)
    # Sec-Fetch-Site decides first when a browser sends it, as in Tornado 6.6.
    site = "Sec-Fetch-Site: {}\r\nOrigin: {}\r\n"
    fetched_same = await Raw.open(
        server.port, headers=site.format("same-origin", "https://evil.example.net")
    )
    cross_ok = await Raw.open(
        server.port, headers=site.format("cross-site", "https://app.example.com")
    )
    cross_evil = await Raw.open(
        server.port, headers=site.format("same-site", f"http://127.0.0.1:{server.port}")
    )
    assert served_by_rtserver(fetched_same) and served_by_rtserver(cross_ok)
    assert cross_evil.response.startswith(b"HTTP/1.1 403")


async def test_refused_while_shutting_down(server: Running) -> None:
    """During shutdown an upgrade is refused with 503 and a JSON error."""
    server.hub.shutting_down = True
    raw = await Raw.open(server.port)
    server.hub.shutting_down = False
    head = raw.response
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert b"Content-Type: application/json" in head and b"Connection: close" in head
    body = await asyncio.wait_for(raw.reader.read(), 5)  # then the server closes
    assert json.loads(body)["error"]["code"] == "unavailable"


@pytest.mark.parametrize("engine", ["rtserver", "tornado"])
async def test_both_engines_speak_the_same_protocol(start_server: StartServer, engine: str) -> None:
    """register, a push, mark_read, an error reply, a server close: identical
    whichever code speaks WebSocket (``server.websocket``)."""
    server = await start_server(server={"websocket": engine})
    raw = await Raw.open(server.port)
    assert served_by_rtserver(raw) == (engine == "rtserver")
    client = await server.user("same")
    sent = await server.hub.send_notification("same", {"message": "hello"})
    note = await client.next("notification")
    assert note["message"] == "hello" and note["id"] == sent.notification.id
    await client.request("mark_read", {"ids": [sent.notification.id]})
    with pytest.raises(ClientError) as err:
        await client.request("no_such_event", {})
    assert err.value.code == "unknown_event"
    (conn,) = server.hub.sessions.of_user("same")
    conn.close(1008, "bye")
    await asyncio.wait_for(client.closed.wait(), 5)
    assert (client.close_code, client.close_reason) == (1008, "bye")
    raw.close()


@pytest.mark.parametrize("engine", ["rtserver", "tornado"])
async def test_remote_ip_behind_a_proxy(start_server: StartServer, engine: str) -> None:
    """With ``server.xheaders`` both engines take the client's address from
    X-Real-Ip, else the last X-Forwarded-For hop; without it, from the socket."""
    server = await start_server(server={"xheaders": True, "websocket": engine})
    forwarded = await Raw.open(server.port, headers="X-Forwarded-For: 203.0.113.9, 10.0.0.1\r\n")
    real = await Raw.open(
        server.port, headers="X-Forwarded-For: 203.0.113.9\r\nX-Real-Ip: 198.51.100.7\r\n"
    )
    bogus = await Raw.open(server.port, headers="X-Real-Ip: not-an-address\r\n")
    plain = await start_server(server={"websocket": engine})
    ignored = await Raw.open(plain.port, headers="X-Real-Ip: 198.51.100.7\r\n")
    for raw, srv, user in [
        (forwarded, server, "f"),
        (real, server, "r"),
        (bogus, server, "b"),
        (ignored, plain, "i"),
    ]:
        raw.text({"event": "register", "id": 1, "data": {"token": srv.token(user)}})
        await raw.json()
    ips = {
        user: conn.remote_ip
        for srv in (server, plain)
        for user in "frbi"
        for conn in srv.hub.sessions.of_user(user)
    }
    assert ips == {"f": "10.0.0.1", "r": "198.51.100.7", "b": "127.0.0.1", "i": "127.0.0.1"}


async def test_silent_connections_count_and_time_out(start_server: StartServer) -> None:
    """A connection that has not sent its request counts toward
    ``limits.max_connections`` (when they are all taken, the next one is
    closed before its handshake) and is closed after
    ``server.handshake_timeout``; then there is room again."""
    server = await start_server(server={"handshake_timeout": 0.5}, limits={"max_connections": 2})
    silent = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed unanswered
    writer.close()
    for r, w in silent:
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
    client = await server.user("after")
    assert client.session_id in {c.session_id for c in server.hub.sessions}


async def test_pipelined_frames_while_a_handler_waits(start_server: StartServer) -> None:
    """Frames sent while ``register`` waits for the store (more than the
    256 KiB held before reading pauses) are each answered, in order."""
    server = await start_server(limits={"frames_per_second": 1e9, "frame_burst": 10**9})
    raw = await Raw.open(server.port)
    raw.text({"event": "register", "id": 0, "data": {"token": server.token("pipe")}})
    for i in range(1, 41):
        raw.text({"event": "no_such_event", "id": i, "data": {"pad": "x" * 8000}})
    replies = [await raw.json() for _ in range(41)]
    assert [r["id"] for r in replies] == list(range(41))
    assert replies[0]["event"] == "ack"
    assert {r["data"]["code"] for r in replies[1:]} == {"unknown_event"}


async def test_largest_message_fits_exactly(server: Running) -> None:
    """A message of exactly ``max_frame_bytes`` (64 KiB, sent in two fragments
    with the 16-bit length form) is handled; one byte more (the 64-bit form)
    closes with 1009."""
    limit = server.hub.config.server.max_frame_bytes
    raw = await Raw.open(server.port)
    text = json.dumps({"event": "no_such_event", "id": 1, "data": {"pad": ""}}).encode()
    text = text.replace(b'"pad": ""', b'"pad": "' + b"x" * (limit - len(text)) + b'"')
    assert len(text) == limit
    raw.send(0x1, text[:40000], fin=False)
    raw.send(0x0, text[40000:])
    assert (await raw.json())["data"]["code"] == "unknown_event"
    raw.send(0x1, text + b" ")
    assert (await raw.closed_with())[0] == 1009
