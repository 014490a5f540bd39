"""rtserver's own WebSocket server side (RFC 6455), for plain TCP.

Tornado's ``WebSocketHandler`` runs a whole HTTP request cycle per upgrade
(``HTTP1Connection``, routing, a ``RequestHandler``, a Future per frame
read): most of what accepting a connection costs. ``Server`` is Tornado's
``HTTPServer`` with one change: it peeks at the first bytes of each plain-TCP
connection without consuming them. A complete, well-formed upgrade to ``/ws``
is answered here and the socket becomes an asyncio transport driven by
``WebSocket``; everything else (the HTTP API, TLS, an upgrade that is
malformed, cross-origin or arrives in pieces) goes to Tornado unchanged, which
serves ``/ws`` through ``web.ConnectionHandler``. Both end in the same
``web.Endpoint``, so clients see the same protocol byte for byte.

What ``WebSocket`` implements: masked client frames, fragmented messages,
ping/pong, the closing handshake (a close it starts waits ``CLOSE_TIMEOUT``
for the peer's answer), UTF-8 checks on text (1007), a size limit (1009),
protocol errors (1002), one message handled at a time per connection (the next
waits for the previous handler, as with Tornado), and a bounded write buffer
(``max_write_buffer_size``, enforced like Tornado's ``IOStream``). No
extensions (rtserver frames each message once for every client; per-socket
deflate would undo that) and no subprotocols.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextvars
import errno
import hashlib
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from http.client import responses
from typing import Any

from tornado.http1connection import HTTP1Connection
from tornado.httpserver import HTTPServer
from tornado.httputil import (
    HTTPConnection,
    HTTPHeaders,
    HTTPMessageDelegate,
    RequestStartLine,
    ResponseStartLine,
)
from tornado.iostream import IOStream, SSLIOStream, StreamBufferFullError, StreamClosedError
from tornado.netutil import is_valid_ip

from rtserver.log import get_logger
from rtserver.metrics import Metrics
from rtserver.protocol import (
    CLOSE_TIMEOUT,
    TOO_LARGE,
    ProtocolError,
    close_frame_fault,
    close_payload,
    encode_json,
)
from rtserver.sessions import Connection
from rtserver.web import Endpoint, linger, log_access, origin_allowed, retry_after

log = get_logger("rtserver")

#: The most of an upgrade request looked at; a longer one goes to Tornado.
MAX_HEAD = 8192
#: Inbound bytes held while a message's handler runs before reading pauses.
MAX_BUFFERED = 256 * 1024

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_PING = b"\x89\x00"


def accept_key(key: str) -> bytes:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("latin-1") + _GUID).digest())


def control_frame(opcode: int, payload: bytes) -> bytes:
    """A server control frame (close, pong): final, unmasked, at most 125
    bytes. Messages are framed once for all clients by ``protocol``."""
    assert len(payload) <= 125
    return bytes((0x80 | opcode, len(payload))) + payload


def unmask(data: bytes | bytearray, mask: bytes) -> bytes:
    """XOR ``data`` with the repeated 4-byte ``mask`` (one big-integer XOR)."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class Upgrade:
    """A complete WebSocket upgrade request, parsed from peeked bytes."""

    __slots__ = ("headers", "size", "target")

    def __init__(self, target: str, headers: dict[str, str], size: int) -> None:
        self.target = target
        self.headers = headers
        self.size = size

    @classmethod
    def parse(cls, data: bytes, path: str) -> Upgrade | None:
        """A ``GET path`` upgrade to WebSocket version 13 with a key and no
        body, else None (Tornado will handle the request, whatever it is)."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = data[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[0] != "GET" or parts[2] != "HTTP/1.1":
            return None
        if parts[1].partition("?")[0] != path:
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            name = name.lower()
            # Folded, repeated or odd headers: let Tornado's parser decide.
            if not colon or not name or name != name.strip() or name in headers:
                return None
            headers[name] = value.strip()
        connection = {token.strip().lower() for token in headers.get("connection", "").split(",")}
        if (
            headers.get("upgrade", "").lower() != "websocket"
            or "upgrade" not in connection
            or headers.get("sec-websocket-version") != "13"
            or not headers.get("sec-websocket-key")
            or "transfer-encoding" in headers
            or headers.get("content-length", "0") != "0"
        ):
            return None
        return cls(parts[1], headers, end + 4)

    def same_origin_or_allowed(self, endpoint: Endpoint) -> bool:
        """Tornado 6.6's cross-origin check for WebSockets, with the
        configured origins; a refusal is left to Tornado to answer (403) and log."""
        headers = self.headers
        site = headers.get("sec-fetch-site")
        origin = headers.get("origin")
        if site in ("same-origin", "none"):
            return True
        if origin is None:
            return site is None  # no Origin and no Sec-Fetch-Site: not a browser
        if (
            site is None
            and origin.partition("://")[2].partition("/")[0].lower()
            == headers.get("host", "").lower()
        ):
            return True
        return origin_allowed(origin, endpoint.allowed_origins)

    def remote_ip(self, peer: str, xheaders: bool) -> str:
        """As Tornado's ``HTTPServerRequest.remote_ip``: the peer, or with
        ``xheaders`` the proxy's X-Real-Ip / last X-Forwarded-For hop."""
        if not xheaders:
            return peer
        ip = self.headers.get("x-forwarded-for", peer).split(",")[-1].strip()
        ip = self.headers.get("x-real-ip", ip)
        return ip if is_valid_ip(ip) else peer


class Server(HTTPServer):
    """Tornado's ``HTTPServer`` that answers plain-TCP upgrades to ``/ws``
    itself (see the module docstring). ``endpoint=None`` turns that off.

    Also, whichever code speaks WebSocket: accepting pauses while descriptors
    run out (``Acceptor``); a new plain-TCP connection counts toward
    ``limits.max_connections`` until it has sent its request, and is closed if
    it sends nothing within ``server.handshake_timeout``; a request whose
    Content-Length is over the body limit is answered 413 (``BodyLimit``)."""

    def initialize(
        self,
        request_callback: Any,
        *args: Any,
        endpoint: Endpoint | None = None,
        path: str = "/ws",
        handshake_timeout: float = 10.0,
        metrics: Metrics | None = None,
        **kwargs: Any,
    ) -> None:
        super().initialize(request_callback, *args, **kwargs)
        self.endpoint = endpoint
        self.path = path
        self.handshake_timeout = handshake_timeout
        self.metrics = metrics

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            acceptor = Acceptor(sock, self._handle_connection, self.metrics)
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = acceptor.stop
            acceptor.start()

    def start_request(
        self, server_conn: object, request_conn: HTTPConnection
    ) -> HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        limit = self.conn_params.max_body_size
        if limit is None or not isinstance(request_conn, HTTP1Connection):
            return delegate
        return BodyLimit(delegate, request_conn, limit)

    def handle_stream(self, stream: IOStream, address: Any) -> None:
        endpoint = self.endpoint
        if endpoint is None or isinstance(stream, SSLIOStream):
            super().handle_stream(stream, address)
            return
        hub = endpoint.hub
        pending = endpoint.handshakes
        if pending and len(hub.sessions) + pending >= hub.config.limits.max_connections:
            # Full with handshakes under way: closed unanswered. (Full with
            # sessions alone, one at a time is let in, to be answered 429.)
            hub.metrics.rate_limited.labels("max_connections").inc()
            stream.close()
            return
        loop = asyncio.get_running_loop()
        fd = stream.socket.fileno()
        endpoint.handshakes += 1

        def first_bytes() -> None:
            endpoint.handshakes -= 1
            loop.remove_reader(fd)
            timer.cancel()
            self._first_bytes(stream, address)

        def silent() -> None:
            endpoint.handshakes -= 1
            loop.remove_reader(fd)
            stream.close()

        # Until then the stream has no handler of its own on this fd.
        loop.add_reader(fd, first_bytes)
        timer = loop.call_later(self.handshake_timeout, silent)

    def _first_bytes(self, stream: IOStream, address: Any) -> None:
        sock = stream.socket
        try:
            head = sock.recv(MAX_HEAD, socket.MSG_PEEK)
        except BlockingIOError:  # a spurious wake-up: Tornado waits for the request
            super().handle_stream(stream, address)
            return
        except OSError:
            stream.close()
            return
        if not head:
            stream.close()  # closed before saying anything
            return
        assert self.endpoint is not None
        upgrade = Upgrade.parse(head, self.path)
        if upgrade is None or not upgrade.same_origin_or_allowed(self.endpoint):
            super().handle_stream(stream, address)
            return
        sock.recv(upgrade.size)  # the head: what follows is WebSocket frames
        peer = address[0] if sock.family in (socket.AF_INET, socket.AF_INET6) else "0.0.0.0"
        remote_ip = upgrade.remote_ip(peer, self.xheaders)
        err = self.endpoint.refusal()
        if err is not None:
            self._refuse(stream, err, remote_ip)
            return
        key = accept_key(upgrade.headers["sec-websocket-key"])
        ws = WebSocket(self.endpoint, remote_ip, key, self.path, sock)
        self.endpoint.hub.spawn(self._connect(sock, ws))

    @staticmethod
    async def _connect(sock: socket.socket, ws: WebSocket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: ws, sock)
        except OSError:
            sock.close()

    def _refuse(self, stream: IOStream, err: ProtocolError, remote_ip: str) -> None:
        body = encode_json({"error": err.as_data()})
        head = [
            f"HTTP/1.1 {err.status} {responses.get(err.status, 'Error')}",
            "Content-Type: application/json; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if "retry_after" in err.extra:
            head.append(f"Retry-After: {retry_after(err)}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        stream.write(data).add_done_callback(lambda _: stream.close())
        log_access("GET", self.path, err.status, 0.0, remote_ip)


class Acceptor:
    """Accepts connections on a listening socket, as Tornado's
    ``add_accept_handler`` does, except when the process or the system runs
    out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM; any other
    error alike): instead of failing on every readiness event of a socket it
    cannot accept from (a spinning loop, a traceback each time), it stops
    accepting for a while, 5 ms doubling up to 1 s as Go's ``net/http``
    does, and new connections wait in the listen backlog. One warning per
    ``LOG_EVERY`` seconds says so; the first accept that works says it ended."""

    BATCH = 128  # accepted per readiness event at most, as Tornado
    MIN_PAUSE = 0.005
    MAX_PAUSE = 1.0
    LOG_EVERY = 10.0

    def __init__(
        self,
        sock: socket.socket,
        callback: Callable[[socket.socket, Any], None],
        metrics: Metrics | None = None,
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._callback = callback
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._pause = 0.0  # the last pause, 0 while accepting works
        self._timer: asyncio.TimerHandle | None = None
        self._logged_at = -self.LOG_EVERY
        self._pauses = 0  # since the last warning
        self._stopped = False

    def start(self) -> None:
        self._loop.add_reader(self._fd, self._accept)

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        else:
            self._loop.remove_reader(self._fd)

    def _accept(self) -> None:
        for _ in range(self.BATCH):
            if self._stopped:
                return
            try:
                conn, address = self._sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue  # closed by the peer while in the backlog
            except OSError as err:
                self._wait(err)
                return
            if self._pause:
                self._pause = 0.0
                log.info("server.accept_resumed")
            self._callback(conn, address)

    def _wait(self, err: OSError) -> None:
        self._loop.remove_reader(self._fd)
        self._pause = min(self.MAX_PAUSE, max(self.MIN_PAUSE, 2 * self._pause))
        self._timer = self._loop.call_later(self._pause, self._resume)
        self._pauses += 1
        if self._metrics is not None:
            self._metrics.accept_pauses.inc()
        now = time.monotonic()
        if now - self._logged_at >= self.LOG_EVERY:
            log.warning(
                "server.accept_paused",
                error=errno.errorcode.get(err.errno or 0, str(err.errno)),
                message=err.strerror,
                pause=self._pause,
                pauses=self._pauses,
            )
            self._logged_at, self._pauses = now, 0

    def _resume(self) -> None:
        self._timer = None
        if not self._stopped:
            self._loop.add_reader(self._fd, self._accept)
            self._accept()


class BodyLimit(HTTPMessageDelegate):
    """Answers 413, naming the limit, a request that says its body is over
    ``max_body_bytes``, before any of the body is read (Tornado would answer
    400 and close). The peer's body is read and dropped for a moment after
    the answer, so closing does not reset the connection before the client
    has read why."""

    def __init__(self, delegate: HTTPMessageDelegate, conn: HTTP1Connection, limit: int) -> None:
        self.delegate = delegate
        self.conn = conn
        self.limit = limit

    def headers_received(
        self, start_line: RequestStartLine | ResponseStartLine, headers: HTTPHeaders
    ) -> Awaitable[None] | None:
        length = headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.limit:
            assert isinstance(start_line, RequestStartLine)
            self._refuse(start_line)
            return None
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.delegate.on_connection_close()

    def _refuse(self, start_line: RequestStartLine) -> None:
        err = ProtocolError(TOO_LARGE, f"the request body is over {self.limit} bytes", status=413)
        body = encode_json({"error": err.as_data()})
        data = (
            "HTTP/1.1 413 Content Too Large\r\n"
            "Content-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        stream = self.conn.detach()  # Tornado stops reading this connection
        try:
            peer = stream.socket.getpeername()[0] if stream.socket is not None else None
        except OSError:  # the peer is gone already
            peer = None
        log_access(start_line.method, start_line.path.partition("?")[0], 413, 0.0, peer)
        linger(stream, stream.write(data))


class WebSocket(asyncio.Protocol):
    """One upgraded connection: frames in, the endpoint's Connection out.

    It is the Connection's ``Transport`` (close, ping, abort) and its
    ``Stream`` (write, with the slow-client bound)."""

    _transport: asyncio.Transport  # from connection_made, before anything else

    def __init__(
        self,
        endpoint: Endpoint,
        remote_ip: str,
        key: bytes,
        path: str,
        sock: socket.socket,
    ) -> None:
        self.endpoint = endpoint
        self.remote_ip = remote_ip
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.max_write_buffer_size: int | None = None
        self.conn: Connection | None = None
        self._key = key
        self._path = path
        self._started = time.perf_counter()
        self._max = endpoint.hub.config.server.max_frame_bytes
        self._bucket = endpoint.hub.limits.frame_bucket()
        self._ctx = contextvars.copy_context()  # this connection's log context
        self._buf = bytearray()
        self._parts: list[bytes] | None = None  # a fragmented message so far
        self._parts_opcode = 0
        self._parts_size = 0
        # A text message checked as it arrives (fragments, and frames still
        # arriving), so invalid UTF-8 closes at the first bad byte, not at the
        # end: the decoder, the text decoded so far, and how much of the
        # frame now arriving has been decoded.
        self._utf8: codecs.IncrementalDecoder | None = None
        self._text: list[str] = []
        self._fed = 0
        self._busy = False  # a message's handler is running
        self._paused = False
        self._closing = False  # a close frame was sent or received
        self._draining = False  # the handshake is over: input is read and dropped
        self._lost = False
        self._timer: asyncio.TimerHandle | None = None
        # The transport's own socket: the Connection sends on it directly while
        # the transport has nothing queued (``Connection._send``), skipping
        # ``transport.write``'s bookkeeping; once asyncio closes it, a send
        # fails and the Connection sees the connection is gone.
        self._sock = sock

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # ``resume_writing`` as soon as the queue is empty: what the
        # Connection remembers as queued is with the kernel then.
        transport.set_write_buffer_limits(high=0)
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + self._key + b"\r\n\r\n"
        )
        self._ctx.run(self._open)

    def _open(self) -> None:
        log_access("GET", self._path, 101, time.perf_counter() - self._started, self.remote_ip)
        self.conn = self.endpoint.open(self, self.remote_ip, self, self._sock)

    def data_received(self, data: bytes) -> None:
        if self._draining:
            return
        self._buf += data
        if self._busy:
            if len(self._buf) > MAX_BUFFERED and not self._paused:
                self._paused = True
                self._transport.pause_reading()
            return
        self._read()

    def pause_writing(self) -> None:
        pass  # the Connection bounds its own queue (``max_write_buffer_size``)

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.drained()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self.conn is not None:
            self._ctx.run(self.conn.finished)

    # -- inbound ------------------------------------------------------------

    def _read(self) -> None:
        """Handle every complete frame in the buffer, stopping while a
        message's handler runs."""
        buf = self._buf
        pos = 0
        size = len(buf)
        while not self._busy and not self._draining and size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            opcode = b0 & 0x0F
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if not b1 & 0x80:
                self._fail(1002, "client frames must be masked")
                break
            if b0 & 0x70:
                self._fail(1002, "no extension was negotiated")
                break
            if opcode >= 8:
                if not b0 & 0x80 or length > 125:
                    self._fail(1002, "control frames are final and at most 125 bytes")
                    break
            elif length + self._parts_size > self._max:
                self._fail(1009, "message too big")
                break
            start = pos + head + 4
            if size < start + length:
                if size > start and self._text_frame(opcode):
                    self._check_partial(buf, start, size - start)
                break
            payload = unmask(buf[start : start + length], bytes(buf[start - 4 : start]))
            pos = start + length
            self._frame(bool(b0 & 0x80), opcode, payload)
        del buf[:pos]

    def _frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        if opcode == 0x1 or opcode == 0x2:
            if self._parts is not None:
                self._fail(1002, "a new message inside a fragmented one")
                return
            if fin and not self._fed:  # a whole message in one frame
                self._message(opcode, payload)
                return
            self._parts, self._parts_opcode, self._parts_size = [], opcode, 0
            self._fragment(fin, payload)
        elif opcode == 0x0:
            if self._parts is None:
                self._fail(1002, "a continuation frame without a message")
                return
            self._fragment(fin, payload)
        elif opcode == 0x8:
            self._peer_closed(payload)
        elif opcode == 0x9 or opcode == 0xA:
            self._control(opcode, payload)
        else:
            self._fail(1002, f"unknown opcode {opcode}")

    def _fragment(self, fin: bool, payload: bytes) -> None:
        """One frame of a message that is fragmented or arrived in pieces."""
        assert self._parts is not None
        self._parts_size += len(payload)
        if self._parts_opcode == 0x1:
            fed, self._fed = self._fed, 0
            if not self._decode(payload[fed:] if fed else payload, fin):
                return
            if fin:
                text, self._text, self._utf8 = "".join(self._text), [], None
                self._parts, self._parts_size = None, 0
                self._deliver(text)
            return
        self._parts.append(payload)
        if fin:
            data = b"".join(self._parts)
            self._parts, self._parts_size = None, 0
            self._message(self._parts_opcode, data)

    def _text_frame(self, opcode: int) -> bool:
        """Is a frame with this opcode part of a text message?"""
        if opcode == 0x0:
            return self._parts is not None and self._parts_opcode == 0x1
        return opcode == 0x1 and self._parts is None

    def _check_partial(self, buf: bytearray, start: int, available: int) -> None:
        """Decode what has arrived of a text frame not yet complete."""
        fed = self._fed
        if available <= fed:
            return
        k = fed % 4
        mask = bytes(buf[start - 4 + k : start]) + bytes(buf[start - 4 : start - 4 + k])
        if self._decode(unmask(buf[start + fed : start + available], mask), final=False):
            self._fed = available

    def _decode(self, data: bytes, final: bool) -> bool:
        """Feed the text message's decoder; False (and closed 1007) on bad UTF-8."""
        if self._utf8 is None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")()
        try:
            self._text.append(self._utf8.decode(data, final))
        except UnicodeDecodeError:
            self._fail(1007, "text frames must be UTF-8")
            return False
        return True

    def _control(self, opcode: int, payload: bytes) -> None:
        """A ping (answered with a pong) or a pong. Both count toward the
        connection's frame rate, and a pong answer toward its outbound bound:
        a peer that floods pings is closed (1008), one that sends them without
        reading the answers is a slow client (1013)."""
        conn = self.conn
        if conn is None or self._closing:
            return
        try:
            self.endpoint.hub.limits.check_frame(self._bucket)
        except ProtocolError as err:
            self._fail(1008, err.message)
            return
        if opcode == 0xA:
            conn.alive(time.monotonic())
            return
        pong = control_frame(0xA, payload)
        limit = self.max_write_buffer_size
        if limit is not None and self._transport.get_write_buffer_size() + len(pong) > limit:
            conn.slow()
            return
        self._transport.write(pong)

    def _message(self, opcode: int, data: bytes) -> None:
        if opcode == 0x1:
            try:
                self._deliver(data.decode("utf-8"))
            except UnicodeDecodeError:
                self._fail(1007, "text frames must be UTF-8")
        else:
            self._deliver(data)

    def _deliver(self, message: str | bytes) -> None:
        if self._closing or self.conn is None:
            return  # after a close, data frames are dropped
        pending = self.endpoint.message(self.conn, self._bucket, message)
        if pending is not None:
            self._busy = True
            task = asyncio.get_running_loop().create_task(pending, context=self._ctx)
            task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            task.exception()  # the dispatcher logs its own failures
        self._busy = False
        if self._lost:
            return
        if self._paused:
            self._paused = False
            self._transport.resume_reading()
        self._read()

    def _peer_closed(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
        self.close_code = code
        fault = close_frame_fault(payload)
        if fault is not None:
            self._fail(*fault)
            return
        if code is not None:
            self.close_reason = payload[2:].decode("utf-8")
        if not self._closing:  # answer with the same code
            if self.conn is not None:
                self.conn.flush()  # what was written before goes first
            self._closing = True
            self._transport.write(control_frame(0x8, close_payload(code, None)))
        self._shut()

    def _fail(self, code: int, reason: str) -> None:
        """A protocol error: say why in a close frame and end the connection."""
        if self.conn is not None:
            self.conn.close_reason = self.conn.close_reason or reason
            if not self._closing:
                self.conn.flush()  # what was written before goes first
        if not self._closing:
            self._closing = True
            self._transport.write(control_frame(0x8, close_payload(code, reason)))
        self._shut()

    def _shut(self) -> None:
        """The closing handshake is over on our side: the session is gone, our
        side of TCP ends after the last frame (FIN), and what the peer still
        sends is read and dropped until it closes too (or ``CLOSE_TIMEOUT``).
        Closing the socket with unread input would send a reset, which can
        reach the peer before the close frame and lose its code."""
        transport = self._transport
        self._draining = True
        self._buf.clear()
        transport.write_eof()
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)
        if self.conn is not None:
            self._ctx.run(self.conn.gone)

    # -- Transport (for Connection) ----------------------------------------

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Start the closing handshake; the peer has ``CLOSE_TIMEOUT`` to answer."""
        if self._closing:
            return
        self._closing = True
        self._transport.write(control_frame(0x8, close_payload(code, reason)))
        self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)

    def abort(self) -> None:
        self._closing = True
        if self.conn is not None:
            self._ctx.run(self.conn.finished)  # while the queue can still be read
        self._transport.abort()

    def send_ping(self) -> None:
        if not self._closing:
            self._transport.write(_PING)

    def outbound_bytes(self) -> int:
        return self._transport.get_write_buffer_size()

    # -- Stream (for Connection) --------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closing:
            raise StreamClosedError()
        transport = self._transport
        limit = self.max_write_buffer_size
        if limit is not None:
            queued = transport.get_write_buffer_size()
            if queued and queued + len(data) > limit:
                raise StreamBufferFullError("outbound queue full")
        transport.write(data)

    def closed(self) -> bool:
        return self._closing

    def writing(self) -> bool:
        return bool(self._transport.get_write_buffer_size())
