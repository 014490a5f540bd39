"""A WebSocket client on a bare socket, for what a library client smooths over
or cannot do: frames exactly as sent (fragments, control frames, bad frames),
a request head in pieces, a peer that plays dead (answers no pings) or stops
reading (a tiny receive buffer)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any, Self

from rtserver.websocket import unmask

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example key


def encode_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """A client frame; ``rsv`` sets reserved bits (0x40, 0x20, 0x10)."""
    n = len(payload)
    if n < 126:
        length = bytes([n])
    elif n < 65536:
        length = bytes([126]) + n.to_bytes(2, "big")
    else:
        length = bytes([127]) + n.to_bytes(8, "big")
    first = bytes([(0x80 if fin else 0) | rsv | opcode])
    second = bytes([(0x80 if masked else 0) | length[0]]) + length[1:]
    if not masked:
        return first + second + payload
    mask = os.urandom(4)
    return first + second + mask + unmask(payload, mask)


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        #: The server's answer to the upgrade request (status line and headers).
        self.response = b""

    @classmethod
    async def open(
        cls, port: int, *, headers: str = "", pieces: int = 1, rcvbuf: int | None = None
    ) -> Self:
        """Send the upgrade request (``headers``: extra lines, each ending in
        CRLF; ``pieces``: sent in that many writes 50 ms apart) and read the
        answer's head, whatever its status."""
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        raw = cls(reader, writer)
        head = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
        ).encode()
        step = len(head) // pieces + 1
        for i in range(0, len(head), step):
            if i:
                await asyncio.sleep(0.05)
            writer.write(head[i : i + step])
            await writer.drain()
        raw.response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return raw

    def send(self, opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> None:
        self.writer.write(encode_frame(opcode, payload, fin=fin, masked=masked))

    def text(self, obj: Any) -> None:
        self.send(0x1, json.dumps(obj).encode())

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame: (opcode, payload)."""
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        assert not b1 & 0x80, "server frames are never masked"
        return b0 & 0x0F, await self.reader.readexactly(n)

    async def json(self) -> dict[str, Any]:
        """The next frame, which must be a text frame."""
        opcode, payload = await self.frame()
        assert opcode == 0x1, (opcode, payload)
        return json.loads(payload)  # type: ignore[no-any-return]

    async def read_text(self) -> dict[str, Any]:
        """The next text frame, skipping pings (which this peer never answers)."""
        while True:
            opcode, payload = await self.frame(timeout=30)
            if opcode == 0x1:
                return json.loads(payload)  # type: ignore[no-any-return]

    async def register(self, token: str) -> dict[str, Any]:
        self.text({"event": "register", "id": 1, "data": {"token": token}})
        return await self.read_text()

    async def closed_with(self) -> tuple[int, str]:
        """The server's close frame, then the end of the connection."""
        opcode, payload = await self.frame()
        assert opcode == 0x8, (opcode, payload)
        assert await asyncio.wait_for(self.reader.read(), 5) == b""  # the server closed TCP
        return int.from_bytes(payload[:2], "big"), payload[2:].decode()

    def close(self) -> None:
        """Drop the connection (no closing handshake)."""
        self.writer.transport.abort()
