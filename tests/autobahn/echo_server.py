"""rtserver with message handling replaced by echo, for the Autobahn|Testsuite.

    python -m tests.autobahn.echo_server PORT {rtserver,tornado} DATA_DIR

Everything the fuzzing client exercises (framing, fragmentation, UTF-8,
control frames, the closing handshake, limits on size) is rtserver's real
code: the server, the WebSocket layer and the Connection as ``run.py`` builds
them. Only ``Endpoint.message``, which would hand a message to the event
dispatcher, sends it back instead; the limits are raised to what the suite
sends (16 MiB messages, thousands of frames a second).
"""

from __future__ import annotations

import asyncio
import struct
import sys

from tornado.netutil import bind_sockets

from rtserver.app import make_app
from rtserver.config import parse_config
from rtserver.limits import TokenBucket
from rtserver.log import configure_logging
from rtserver.protocol import ws_text_frame
from rtserver.sessions import Connection

BIG = 64 * 1024 * 1024


def binary_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x82, n)) + payload
    if n <= 0xFFFF:
        return struct.pack("!BBH", 0x82, 126, n) + payload
    return struct.pack("!BBQ", 0x82, 127, n) + payload


def echo(conn: Connection, bucket: TokenBucket, message: str | bytes) -> None:
    if isinstance(message, str):
        conn.write(ws_text_frame(message.encode()))
    else:
        conn.write(binary_frame(message))


async def serve(port: int, websocket: str, data_dir: str) -> None:
    config = parse_config(
        {
            "server": {
                "websocket": websocket,
                "max_frame_bytes": BIG,
                "max_outbound_bytes": BIG,
                "ping_interval": 0,
            },
            "auth": {"secret": "autobahn-" * 4},
            "store": {"data_dir": data_dir},
            "limits": {"frames_per_second": 1e9, "frame_burst": 10**9},
            "logging": {"format": "json", "level": "warning"},
        },
        source="<autobahn>",
    )
    configure_logging(config.logging)
    app = make_app(config)
    app.endpoint.message = echo  # type: ignore[method-assign]
    await app.startup()
    server = app.make_server()
    server.add_sockets(bind_sockets(port, "127.0.0.1"))
    print("listening", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
