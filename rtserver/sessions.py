"""Who is connected: users -> sessions -> connections.

A ``Connection`` is one WebSocket; it becomes a *session* of a user when it
registers. A user may hold many sessions (tabs, devices); closing one leaves
the others. Everything here runs on the IOLoop thread only.
"""

from __future__ import annotations

import asyncio
import operator
import secrets
import socket
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, Protocol

from tornado.iostream import StreamBufferFullError, StreamClosedError

from rtserver.config import Role
from rtserver.protocol import pushed_notification_ids


class Stream(Protocol):
    """Where a Connection's bytes go: a Tornado ``IOStream``, or
    ``rtserver.websocket.WebSocket`` itself. ``write`` raises
    ``StreamBufferFullError`` past ``max_write_buffer_size`` queued bytes."""

    max_write_buffer_size: int | None

    def write(self, data: bytes) -> Any: ...
    def closed(self) -> bool: ...
    def writing(self) -> bool: ...


class Transport(Protocol):
    """What a Connection needs from its WebSocket (``web.ConnectionHandler``
    or ``websocket.WebSocket``)."""

    #: The code and reason of the peer's close frame, once one arrived.
    close_code: int | None
    close_reason: str | None

    def outbound_bytes(self) -> int: ...
    def close(self, code: int | None = None, reason: str | None = None) -> None: ...
    def send_ping(self) -> None: ...
    def abort(self) -> None: ...


_by_fd = operator.attrgetter("_fd")  # a flush's order (``Outbox``)
#: The share of one core the process must have used since the last flush for
#: the outbox to count as at capacity (``Outbox.flush``).
_BUSY_SHARE = 0.5


class Outbox:
    """Write coalescing: frames written to a connection wait in its pending
    list and go out together, one ``send()`` for all, once a loop turn has
    written nothing new (the burst is over), or once a burst that goes on has
    lasted ``turns`` turns or ``max_delay`` seconds, whichever comes first.

    On loopback most of a small write's cost is the kernel's (the TCP transmit
    and waking the reader), so a server broadcasting in every turn sends each
    client one write for several frames, while a lone push goes out two turns
    later (microseconds, on an idle loop). Only a loop that is busy in every turn
    holds frames longer, and that is when sharing a write matters: the
    server's capacity, not the wait, then sets how late frames are. Frames of
    one connection keep their order, and nothing is held across a close
    (``Connection.close`` flushes first).

    At capacity the outbox holds longer (``busy_delay``): when the last flush
    wrote to at least ``busy_connections`` connections, the process had used
    half a core or more since the flush before it, and a frame comes less than
    ``busy_delay`` seconds after it, the frames written from then on wait until
    ``busy_delay`` after that one, quiet turns or not, and go out in one flush.
    A server that busy, writing to thousands of clients a flush, is at
    capacity: its frames wait behind each other anyway, and holding them gives
    each client several per write. A big broadcast now and then is not held.
    Per-user sends at capacity went from 0.63 to 0.39 ``send()`` calls a
    notification and ran 13 to 24% faster (``busy_delay`` 0.25 s; two sets of
    three alternating runs: 50,800 → 57,300/s and 46,900 → 58,000/s). While
    the load lasts every frame waits (replies too), at most ``busy_delay``; a
    frame after a pause goes out at the first quiet turn.

    A flush writes its connections in the order of their sockets' file
    descriptors. Per-user sends make a flush's connections a random pick, and
    writing sockets in the order the kernel made them costs less: batched
    per-user sends on loopback ran 9% faster so (eight alternating pairs), for
    a sort of the few thousand connections a flush holds (about 1 ms for
    10,000; a broadcast's are in that order nearly, as they registered).
    """

    def __init__(
        self,
        turns: int,
        max_delay: float = 0.1,
        *,
        busy_delay: float = 0.0,
        busy_connections: int = 1000,
    ) -> None:
        self.turns = turns
        self.max_delay = max_delay
        self.busy_delay = busy_delay
        self.busy_connections = busy_connections
        #: Frames written so far, and the socket writes that carried them.
        self.writes = 0
        self.sends = 0
        self._seen = 0
        self._left = 0
        self._deadline = 0.0
        self._dirty: list[Connection] = []
        #: When the last flush was (monotonic and process CPU seconds), and
        #: whether the server was at capacity then (see ``flush``).
        self._last_at = 0.0
        self._last_cpu = 0.0
        self._busy = False
        #: Flushes held ``busy_delay`` at capacity (``rtserver_held_flushes``).
        self.held = 0

    def add(self, conn: Connection) -> None:
        """``conn`` has pending frames (called at its first since a flush)."""
        if not self._dirty:
            loop = asyncio.get_running_loop()
            now = time.monotonic()
            if self._busy and now - self._last_at < self.busy_delay:
                # At capacity: one flush ``busy_delay`` from now, quiet turns or not.
                self.held += 1
                loop.call_later(self.busy_delay, self.flush)
            else:
                self._left = self.turns
                # The count before this turn's first write: the first tick then
                # sees this turn's writes and waits a turn more, so a burst of
                # frames to one connection, one a turn, is coalesced too.
                self._seen = self.writes - 1
                self._deadline = now + self.max_delay
                loop.call_soon(self._tick)
        self._dirty.append(conn)

    def _tick(self) -> None:
        self._left -= 1
        if self._left > 0 and self.writes != self._seen and time.monotonic() < self._deadline:
            self._seen = self.writes
            asyncio.get_running_loop().call_soon(self._tick)
        else:
            self.flush()

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        if self.busy_delay:
            # At capacity: this flush writes to many connections, and the
            # process has been busy for at least half the time since the last
            # one (a big broadcast now and then is not capacity).
            now, cpu = time.monotonic(), time.process_time()
            busy = cpu - self._last_cpu >= _BUSY_SHARE * (now - self._last_at)
            self._busy = busy and len(dirty) >= self.busy_connections
            self._last_at, self._last_cpu = now, cpu
        dirty.sort(key=_by_fd)
        for conn in dirty:
            conn.flush()


class Connection:
    """One open WebSocket and, once registered, the session it carries.

    ``write`` queues an already framed message in the connection's pending
    list (see ``Outbox``), flushed straight onto the socket; the stream's
    bounded buffer takes what the kernel does not, and a client that lets it
    fill is disconnected as a slow client.
    """

    __slots__ = (
        "_after_reply",
        "_fd",
        "_gone",
        "_outbox",
        "_pending",
        "_replay_queue",
        "_replayed",
        "_sock",
        "_stream",
        "_transport",
        "_unsent",
        "_unsent_from",
        "_unsent_size",
        "claims",
        "close_reason",
        "closed",
        "connected_at",
        "expires_at",
        "in_dispatch",
        "last_seen",
        "on_finished",
        "on_gone",
        "on_slow",
        "ping_sent_at",
        "receipts",
        "registered_at",
        "remote_ip",
        "requeued",
        "role",
        "session_id",
        "state",
        "topics",
        "user_id",
    )

    def __init__(
        self,
        transport: Transport,
        remote_ip: str | None,
        outbox: Outbox,
        *,
        session_id: str | None = None,
    ) -> None:
        self.session_id = session_id or secrets.token_urlsafe(12)
        self.user_id: str | None = None
        self.role: Role | None = None
        self.claims: dict[str, Any] = {}
        self.remote_ip = remote_ip
        self.connected_at = time.time()
        self.registered_at: float | None = None
        #: The session confirms what it receives ("received" frames); what is
        #: pushed to it counts as delivered only once confirmed.
        self.receipts = False
        self.expires_at: float | None = None
        self.closed = False
        self.close_reason: str | None = None
        self._transport = transport
        self._stream: Stream | None = None
        self._sock: socket.socket | None = None
        self._fd = -1  # the socket's file descriptor: a flush's order (``Outbox``)
        self._outbox = outbox
        #: Frames waiting for the outbox's flush: one as it is, more in a list.
        self._pending: bytes | list[bytes] | None = None
        # While offline delivery is replaying, pushes wait here (frame, id).
        self._replay_queue: list[tuple[bytes, str | None]] | None = None
        self._replayed: set[str] | None = None
        # Frames queued on the stream, not yet with the kernel (``_keep``):
        # bytes in all, and how much of the first the kernel took already.
        self._unsent: list[bytes] | None = None
        self._unsent_size = 0
        self._unsent_from = 0
        self._after_reply: list[Callable[[], Any]] = []
        self.in_dispatch = False
        self.on_slow: Callable[[Connection], None] | None = None
        #: Called once when the connection stops being usable (close started,
        #: peer gone, or aborted): the handler unregisters the session there.
        self.on_gone: Callable[[Connection], None] | None = None
        #: Called once when the socket is done (closed, or about to be
        #: dropped): what it still queues will never leave.
        self.on_finished: Callable[[Connection], None] | None = None
        #: Notifications this session was sent but still queued when it was
        #: gone, made undelivered again then (``Hub.connection_gone``).
        self.requeued: list[str] | None = None
        self._gone = False
        #: Heartbeat bookkeeping (time.monotonic()): last sign of life, and when the
        #: unanswered ping was sent (None when none is outstanding).
        self.last_seen = 0.0
        self.ping_sent_at: float | None = None
        #: Free space for plugins, keyed by plugin name.
        self.state: dict[str, Any] = {}
        #: Its topic subscriptions (``rtserver.topics.Subscription``) by topic.
        self.topics: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<Connection {self.session_id} user={self.user_id!r}>"

    @property
    def registered(self) -> bool:
        return self.user_id is not None

    # -- output -----------------------------------------------------------

    def write(self, frame: bytes) -> bool:
        """Write one framed message: queued for the outbox's next flush, or
        (``coalesce_turns`` 0) sent now. False when the connection is gone."""
        if self.closed:
            return False
        stream = self._stream
        if stream is None or stream.closed():
            return False
        outbox = self._outbox
        outbox.writes += 1
        if not outbox.turns:
            outbox.sends += 1
            return self._send(frame)
        pending = self._pending
        if pending is None:
            # One frame is kept as it is: no list for the garbage collector
            # to track (per-user sends seldom put two in one flush).
            self._pending = frame
            outbox.add(self)
        elif isinstance(pending, list):
            pending.append(frame)
        else:
            self._pending = [pending, frame]
        return True

    def flush(self) -> None:
        """Send the pending frames now, as one write."""
        pending, self._pending = self._pending, None
        if pending and not self.closed:
            self._outbox.sends += 1
            self._send(b"".join(pending) if isinstance(pending, list) else pending)

    def _send(self, data: bytes) -> bool:
        """Fast path: when nothing is queued on a plain (non-TLS) stream, the
        bytes go straight to the socket with one ``send()``; only what the
        kernel does not take is queued on the stream (no Future, no Task).

        What is queued is also remembered (``_keep``) until the stream has
        handed it to the kernel: if the connection ends first, those
        notifications were not delivered (``unsent_notifications``)."""
        stream = self._stream
        if stream is None or stream.closed():
            return False
        sent = 0
        if not stream.writing():
            self._unsent = None  # all queued before is with the kernel now
            sock = self._sock
            if sock is not None:
                try:
                    sent = sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    return False  # the stream notices the dead socket on its own
                if sent == len(data):
                    return True
        self._keep(data, sent)
        try:
            written = stream.write(data[sent:] if sent else data)
        except StreamClosedError:
            return False
        except StreamBufferFullError:
            # This frame and the close frame queue past the bound, so that
            # all this session was sent is in the stream, in order, and
            # counted there (``unsent_notifications``).
            stream.max_write_buffer_size = None
            stream.write(data[sent:] if sent else data)
            self.slow()
            return False
        if isinstance(written, asyncio.Future):
            written.add_done_callback(self._written)  # Tornado's IOStream
        self._prune()
        return True

    # What was written but not yet handed to the kernel. A stream queues
    # bytes in order, so it holds the last ``outbound_bytes()`` of what went
    # to it: the frames (whole, as written) that end in those bytes are the
    # ones a peer gone now would lack. Control frames written past this list
    # only make that count larger, so the reckoning errs towards "not
    # delivered" (offered again: at least once), never the other way.

    def _keep(self, data: bytes, sent: int) -> None:
        """``data`` goes to the stream after the kernel took ``sent`` bytes."""
        if self._unsent is None:
            self._unsent = [data]
            self._unsent_size = len(data)
            self._unsent_from = sent
        else:
            self._unsent.append(data)
            self._unsent_size += len(data)

    def _prune(self) -> None:
        """Forget the frames the kernel has taken since (the stream's queue
        no longer reaches back to them)."""
        unsent = self._unsent
        if unsent is None:
            return
        queued = self._transport.outbound_bytes()
        if not queued:
            self._unsent = None
            return
        size, drop = self._unsent_size, 0
        while drop < len(unsent) - 1 and size - len(unsent[drop]) >= queued:
            size -= len(unsent[drop])
            drop += 1
        if drop:
            del unsent[:drop]
        self._unsent_size = size
        self._unsent_from = max(0, size - queued)

    def _written(self, future: asyncio.Future[None]) -> None:
        stream = self._stream
        if future.cancelled() or future.exception() is not None or stream is None:
            return  # the stream closed: what it queued did not leave
        if not stream.writing():
            self.drained()

    def drained(self) -> None:
        """The stream has handed everything queued to the kernel."""
        self._unsent = None

    def unsent_notifications(self) -> list[str]:
        """Ids of the user notifications written to this connection that the
        kernel has not taken, or may not have: frames still pending, still
        queued on the stream (or dropped with it), and pushes held back by a
        replay. For a connection that is gone, whose session counted them as
        delivered."""
        ids: list[str] = []
        unsent = self._unsent
        if unsent is not None:
            if self._transport.outbound_bytes():
                self._prune()  # a stream dropped at abort says 0: keep all
            first = self._unsent_from
            for blob in unsent:
                ids += pushed_notification_ids(blob, first)
                first = 0
        pending = self._pending
        if pending is not None:
            for blob in pending if isinstance(pending, list) else [pending]:
                ids += pushed_notification_ids(blob)
        if self._replay_queue:
            ids += [nid for _, nid in self._replay_queue if nid is not None]
        return ids

    def attach(self, stream: Stream | None, sock: socket.socket | None) -> None:
        """The stream to write to and, on plain TCP only, its socket for direct
        writes. Until attached, nothing is written."""
        self._stream = stream
        self._sock = sock
        self._fd = -1 if sock is None else sock.fileno()

    def push(self, frame: bytes, notification_id: str | None = None) -> bool:
        """A server push: written now, or held while offline delivery replays
        so that the backlog goes out first, oldest first, without duplicates."""
        if self._replay_queue is not None:
            if self.closed:
                return False
            self._replay_queue.append((frame, notification_id))
            return True
        return self.write(frame)

    def begin_replay(self) -> None:
        """Hold pushes until ``end_replay``; see ``Hub.register_user_session``."""
        self._replay_queue = []
        self._replayed = set()

    def replay(self, frame: bytes, notification_id: str) -> bool:
        """Write one backlog notification unless a live push already holds it."""
        queue = self._replay_queue
        if queue is not None and any(nid == notification_id for _, nid in queue):
            return False
        if self._replayed is not None:
            self._replayed.add(notification_id)
        return self.write(frame)

    def end_replay(self) -> None:
        """Write the pushes held during replay, skipping ones replayed already."""
        queued, replayed = self._replay_queue or [], self._replayed or set()
        self._replay_queue = self._replayed = None
        for frame, nid in queued:
            if nid is None or nid not in replayed:
                self.write(frame)

    @property
    def replaying(self) -> bool:
        return self._replay_queue is not None

    # -- lifecycle --------------------------------------------------------

    def after_reply(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` once the reply to the current frame is written."""
        self._after_reply.append(callback)

    def take_after_reply(self) -> list[Callable[[], Any]]:
        callbacks, self._after_reply = self._after_reply, []
        return callbacks

    def slow(self) -> None:
        """The peer reads slower than it is written to, past the outbound
        bound: counted, logged and closed (1013)."""
        if self.on_slow is not None:
            self.on_slow(self)
        self.close(1013, "slow client: outbound queue full")

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Start the closing handshake; the session is gone from now on (no
        more pushes, not in the registry), whether or not the peer answers."""
        if self.closed:
            return
        self.flush()  # what was written before the close goes before it
        if self.closed:
            return  # the flush found a slow client and closed it
        self.close_reason = reason
        self.closed = True
        self._transport.close(code, reason)
        self.gone()

    def abort(self, reason: str) -> None:
        """Drop the connection at once (a dead peer: no handshake to wait for)."""
        if self.close_reason is None:
            self.close_reason = reason
        self.closed = True
        self._transport.abort()
        self.gone()

    def gone(self) -> None:
        """Mark the connection finished; runs ``on_gone`` exactly once."""
        self.closed = True
        if not self._gone:
            self._gone = True
            if self.on_gone is not None:
                self.on_gone(self)

    def finished(self) -> None:
        """The socket is done; runs ``on_finished`` once (after ``gone``)."""
        self.gone()
        callback, self.on_finished = self.on_finished, None
        if callback is not None:
            callback(self)

    def ping(self, now: float) -> None:
        self.ping_sent_at = now
        self._transport.send_ping()

    def alive(self, now: float) -> None:
        """A pong (or any frame) arrived."""
        self.last_seen = now
        self.ping_sent_at = None

    def outbound_buffer(self) -> int:
        """Bytes written but not yet taken by the peer."""
        pending = self._pending
        if pending is None:
            queued = 0
        elif isinstance(pending, list):
            queued = sum(map(len, pending))
        else:
            queued = len(pending)
        return queued + self._transport.outbound_bytes()

    def peer_close(self) -> tuple[int | None, str | None]:
        """The code and reason the peer closed with (None, None: it did not)."""
        return self._transport.close_code, self._transport.close_reason

    def info(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "user_id": self.user_id,
            "role": self.role,
            "remote_ip": self.remote_ip,
            "connected_at": self.connected_at,
            "registered_at": self.registered_at,
            "topics": list(self.topics),
            "outbound_bytes": self.outbound_buffer(),
        }


class SessionRegistry:
    """Connections by session id, and registered sessions by user."""

    def __init__(self, session_prefix: str = "") -> None:
        #: What this node's session ids start with (in a cluster, its node id
        #: and a dot: any node can tell where a session is from its id).
        self.session_prefix = session_prefix
        self._connections: dict[str, Connection] = {}
        self._by_user: dict[str, dict[str, Connection]] = {}
        self.total = 0
        self.peak = 0
        #: Registered sessions, kept in step (a gauge reads it per scrape).
        self.sessions = 0

    def __len__(self) -> int:
        return len(self._connections)

    def new_session_id(self) -> str:
        return self.session_prefix + secrets.token_urlsafe(12)

    def add(self, conn: Connection) -> None:
        self._connections[conn.session_id] = conn
        self.total += 1
        self.peak = max(self.peak, len(self._connections))

    def register(self, conn: Connection, user_id: str) -> None:
        conn.user_id = user_id
        conn.registered_at = time.time()
        sessions = self._by_user.setdefault(user_id, {})
        if conn.session_id not in sessions:
            self.sessions += 1
        sessions[conn.session_id] = conn

    def unregister(self, conn: Connection) -> None:
        """Undo ``register``: the connection stays open but is no session."""
        if conn.user_id is not None:
            sessions = self._by_user.get(conn.user_id)
            if sessions is not None:
                if sessions.pop(conn.session_id, None) is not None:
                    self.sessions -= 1
                if not sessions:
                    del self._by_user[conn.user_id]
        conn.user_id = None
        conn.registered_at = None

    def remove(self, conn: Connection) -> None:
        self._connections.pop(conn.session_id, None)
        user_id = conn.user_id
        self.unregister(conn)
        conn.user_id = user_id  # kept for disconnect hooks and logs

    def get(self, session_id: str) -> Connection | None:
        return self._connections.get(session_id)

    def of_user(self, user_id: str) -> list[Connection]:
        """A snapshot: safe to push to (a push may close a slow session)."""
        sessions = self._by_user.get(user_id)
        return list(sessions.values()) if sessions else []

    def view_of_user(self, user_id: str) -> Collection[Connection]:
        """The user's sessions without a copy: only to look at, never while
        pushing (use ``of_user`` for that)."""
        sessions = self._by_user.get(user_id)
        return sessions.values() if sessions else ()

    def users(self) -> int:
        return len(self._by_user)

    def ids(self) -> Iterator[str]:
        """Registered session ids."""
        for sessions in self._by_user.values():
            yield from sessions

    def outbound(self) -> tuple[int, int]:
        """Bytes waiting to be written: in all connections, and in the fullest.
        One pass, without a copy of the registry."""
        total = most = 0
        for conn in self._connections.values():
            queued = conn.outbound_buffer()
            total += queued
            if queued > most:
                most = queued
        return total, most

    def registered(self) -> list[Connection]:
        """A snapshot: safe while pushes close slow sessions mid-loop."""
        return [c for sessions in self._by_user.values() for c in sessions.values()]

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._connections.values()))
