"""Property-based fuzzing: random frames at the decoder and the dispatcher of a
real server, and random WebSocket frames (bad opcodes, reserved bits, unmasked,
fragments out of order, invalid UTF-8, bad close frames) at rtserver's own
WebSocket code. The server runs on its own thread and loop, so hypothesis can
drive it."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tornado.netutil import bind_sockets

from rtserver.app import make_app
from rtserver.client import Client
from rtserver.protocol import ERROR_CODES

from ..conftest import make_config
from ..rawws import RawWebSocket, encode_frame

EVENTS = [
    "register",
    "refresh",
    "mark_read",
    "get_notifications",
    "admin.broadcast",
    "admin.sessions",
    "nope",
    "",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

frame_objects = st.fixed_dictionaries(
    {"event": st.sampled_from(EVENTS) | st.text(max_size=10)},
    optional={
        "data": json_values
        | st.dictionaries(
            st.sampled_from(["token", "ids", "all", "limit", "before", "last_id", "unread_only"]),
            json_values,
        ),
        "id": st.integers() | st.text(max_size=6) | st.floats(allow_nan=False) | st.booleans(),
        "extra": json_values,
    },
)

frames = st.one_of(
    frame_objects.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=60),
)


@pytest.fixture(scope="module")
def threaded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state: dict[str, Any] = {}
    ready = threading.Event()
    cfg = make_config(
        Path(tmp_path_factory.mktemp("fuzz")),
        limits={"frames_per_second": 1e9, "frame_burst": 10**9, "connections_per_second": 1e9},
    )

    async def main() -> None:
        app = make_app(cfg)
        await app.startup()
        sockets = bind_sockets(0, "127.0.0.1")
        server = app.make_server()
        server.add_sockets(sockets)
        stop = asyncio.Event()
        state.update(port=sockets[0].getsockname()[1], loop=asyncio.get_running_loop(), stop=stop)
        ready.set()
        await stop.wait()
        server.stop()
        await app.shutdown(timeout=1)
        await server.close_all_connections()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(15)
    yield state
    state["loop"].call_soon_threadsafe(state["stop"].set)
    thread.join(15)


async def drive(port: int, sent: list[str]) -> list[dict[str, Any]]:
    client = await Client.connect(f"ws://127.0.0.1:{port}/ws")
    try:
        for text in sent:
            await client.send_raw(text)
        await client.send_raw(json.dumps({"event": "get_notifications", "id": "sentinel"}))
        replies = []
        while True:
            frame = await client.next(timeout=10)
            if frame.get("id") == "sentinel":
                break
            replies.append(frame)
        assert not client.closed.is_set()
        return replies
    finally:
        await client.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sent=st.lists(frames, min_size=1, max_size=15))
def test_random_frames_each_get_one_error_and_nothing_escapes(
    threaded_server: dict[str, Any], sent: list[str]
) -> None:
    """On an unregistered connection no random frame can succeed, so each gets
    exactly one error reply with a known code (never internal_error), in order,
    and the connection stays up."""
    replies = asyncio.run(drive(threaded_server["port"], sent))
    assert len(replies) == len(sent)
    for reply in replies:
        assert reply["event"] == "error"
        assert reply["data"]["code"] in ERROR_CODES
        assert reply["data"]["code"] != "internal_error"
        assert reply["data"]["message"]


wire_frames = st.tuples(
    st.booleans(),  # FIN
    st.sampled_from([0, 0, 0, 0x40, 0x10]),  # reserved bits, mostly none
    st.sampled_from([0x0, 0x1, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3, 0xB]),
    st.sampled_from([True, True, True, False]),  # masked
    st.one_of(
        st.binary(max_size=40),
        frames.map(str.encode),
        st.just(b"\xff\xfe"),
        st.integers(0, 5000).map(lambda code: struct.pack("!H", code)),
    ),
)


async def drive_wire(port: int, sent: list[tuple[bool, int, int, bool, bytes]]) -> None:
    raw = await RawWebSocket.open(port)
    try:
        assert raw.response.startswith(b"HTTP/1.1 101")
        for fin, rsv, opcode, masked, payload in sent:
            raw.writer.write(encode_frame(opcode, payload, fin=fin, rsv=rsv, masked=masked))
        raw.text({"event": "get_notifications", "id": "end"})
        # The codes of the client's own close frames (None: one without a code).
        client_closed = {
            int.from_bytes(payload[:2], "big") if payload else None
            for _, _, opcode, _, payload in sent
            if opcode == 0x8
        }
        while True:
            opcode, payload = await raw.frame(timeout=10)
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if payload else None
                # A protocol error's code, or the echo of a close the client sent.
                assert code in {1002, 1007, 1009} | client_closed, code
                assert await asyncio.wait_for(raw.reader.read(), 10) == b""
                return
            if opcode == 0x1:
                reply = json.loads(payload)
                if reply["event"] == "error":
                    assert reply["data"]["code"] != "internal_error", reply
                if reply.get("id") == "end":
                    return
            else:
                assert opcode == 0xA, opcode  # the answer to a ping
    finally:
        raw.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sent=st.lists(wire_frames, min_size=1, max_size=8))
def test_random_websocket_frames_close_cleanly_or_are_answered(
    threaded_server: dict[str, Any], sent: list[tuple[bool, int, int, bool, bytes]]
) -> None:
    """Whatever frames arrive, the connection either answers every message
    (never internal_error) or closes with the code that says why (1002, 1007,
    1009, or the echo of the client's own close); and the server goes on
    serving a fresh client."""
    asyncio.run(drive_wire(threaded_server["port"], sent))
    assert asyncio.run(drive(threaded_server["port"], ["{}"]))[0]["event"] == "error"
