"""Property-based fuzzing: random frames at the decoder and the dispatcher of a
real server (running on its own thread and loop, so hypothesis can drive it)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from rtserver.app import make_app
from rtserver.client import Client
from rtserver.protocol import ERROR_CODES

from ..conftest import make_config

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
        server = HTTPServer(app)
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
