"""The one path every outbound frame takes.

Replies, pushes to a user, to a session and broadcasts all come through
``Delivery``: a frame is encoded and WebSocket-framed once, then the same bytes
are written to every target connection. A broker for a cluster sits behind
these methods; callers never write to a socket themselves.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from rtserver.broker import LocalBroker
from rtserver.metrics import Metrics
from rtserver.protocol import FrameId, Notification, encode, notification_json, ws_text_frame
from rtserver.sessions import Connection, Outbox, SessionRegistry


def frame(event: str, data: Any, frame_id: FrameId | None = None) -> bytes:
    """Encode and frame once; the bytes can go to any number of connections."""
    return ws_text_frame(encode(event, data, frame_id))


def notification_frame(n: Notification) -> bytes:
    """``frame("notification", n.to_wire())``, the same bytes, built faster."""
    return ws_text_frame(notification_json(n))


class Delivery:
    """Local delivery, with the cluster's broker behind it: every fan-out
    (to a user, a broadcast) is published once for the other nodes, unless it
    came from them (``fan_out=False``)."""

    def __init__(
        self,
        sessions: SessionRegistry,
        metrics: Metrics,
        broker: LocalBroker | None = None,
        *,
        coalesce_turns: int = 0,
        coalesce_max_delay: float = 0.1,
        coalesce_busy_delay: float = 0.0,
        coalesce_busy_connections: int = 1000,
    ) -> None:
        self.sessions = sessions
        #: Connections write through it (``Connection(..., outbox=)``).
        self.outbox = Outbox(
            coalesce_turns,
            coalesce_max_delay,
            busy_delay=coalesce_busy_delay,
            busy_connections=coalesce_busy_connections,
        )
        self.metrics = metrics
        self.broker = broker or LocalBroker()
        self._frames = metrics.frames_out.inc
        self._kinds = metrics.deliveries.inc

    def reply(self, conn: Connection, frame_id: FrameId | None, event: str, data: Any) -> bool:
        """An ``ack`` or ``error`` to the frame ``frame_id`` (written even while
        a replay holds pushes back)."""
        ok = conn.write(frame(event, data, frame_id))
        if ok:
            self._frames(event)
        return ok

    def to_connection(self, conn: Connection, event: str, data: Any) -> bool:
        """A push to one connection, registered or not."""
        ok = conn.push(frame(event, data))
        if ok:
            self._frames(event)
        return ok

    def to_user(
        self,
        user_id: str,
        event: str,
        data: Any,
        *,
        notification_id: str | None = None,
        exclude: Connection | None = None,
        framed: bytes | None = None,
        fan_out: bool = True,
        exclude_session: str | None = None,
    ) -> int:
        """Push to every session of ``user_id`` here (and, through the broker,
        on other nodes); returns how many sessions here were reached.
        ``framed`` is the frame already built by ``frame(event, data)``."""
        payload = framed or frame(event, data)
        if fan_out and self.broker.enabled:
            origin = exclude.session_id if exclude is not None else None
            self.broker.publish_user(user_id, payload, notification_id, origin)
        targets = self.sessions.of_user(user_id)
        if not targets:
            return 0
        n = 0
        for conn in targets:
            if conn is exclude or conn.session_id == exclude_session:
                continue
            if conn.push(payload, notification_id):
                n += 1
        if n:
            self._frames(event, n)
            self._kinds("user", n)
        return n

    def notify_user(
        self,
        user_id: str,
        framed: bytes,
        notification_id: str,
        sessions: Collection[Connection] | None = None,
    ) -> tuple[int, bool]:
        """``to_user`` for a stored notification's frame, on the hot path of
        every send: how many sessions here it reached, and whether one of
        them does not confirm receipts (so it counts as delivered now).
        ``sessions``: the user's, when the caller has them at hand."""
        if sessions is None:
            sessions = self.sessions.view_of_user(user_id)
        n, plain = 0, False
        for conn in tuple(sessions):  # a push may close a slow session
            if conn.push(framed, notification_id):
                n += 1
                if not conn.receipts:
                    plain = True
        if n:
            self._frames("notification", n)
            self._kinds("user", n)
        if self.broker.enabled:
            # Delivered here already: the other nodes need not say they got it.
            self.broker.publish_user(user_id, framed, notification_id, None, waiting=not plain)
        return n, plain

    def to_session(self, session_id: str, event: str, data: Any) -> bool:
        """Push to one registered session; False when no such session is here."""
        conn = self.sessions.get(session_id)
        if conn is None or not conn.registered or not conn.push(frame(event, data)):
            return False
        self._frames(event)
        self._kinds("session")
        return True

    def broadcast(self, event: str, data: Any) -> int:
        """Push to every registered session, on every node; returns how many
        sessions here were reached."""
        return self.broadcast_framed(frame(event, data))

    def broadcast_framed(
        self, payload: bytes, *, fan_out: bool = True, event: str = "notification"
    ) -> int:
        if fan_out and self.broker.enabled:
            self.broker.publish_broadcast(payload)
        n = 0
        for conn in self.sessions.registered():
            if conn.push(payload):
                n += 1
        if n:
            self._frames(event, n)
            self._kinds("broadcast", n)
        return n

    def to_connections(self, conns: Iterable[Connection], framed: bytes, event: str) -> int:
        """One frame to these connections (a topic's subscribers)."""
        n = 0
        for conn in conns:
            if conn.push(framed):
                n += 1
        if n:
            self._frames(event, n)
            self._kinds("topic", n)
        return n

    def to_connection_framed(self, conn: Connection, payload: bytes, event: str) -> bool:
        """A frame built elsewhere (another node) to one session here."""
        ok = conn.push(payload)
        if ok:
            self._frames(event)
            self._kinds("session")
        return ok

    def resend(self, conns: list[Connection], framed: bytes, notification_id: str) -> int:
        """Push an unconfirmed notification again (same id) to these sessions."""
        n = sum(1 for conn in conns if conn.push(framed, notification_id))
        if n:
            self._frames("notification", n)
            self._kinds("user", n)
        return n

    def replay(
        self, conn: Connection, notifications_wire: list[tuple[str, dict[str, Any]]]
    ) -> list[tuple[str, bytes]]:
        """Offline delivery: write a backlog page to a replaying connection,
        each marked ``"replayed": true`` (already counted in the register
        ack's ``unread_count``); returns (id, frame) of what was written."""
        framed = [
            (nid, frame("notification", {**body, "replayed": True}))
            for nid, body in notifications_wire
        ]
        written = [(nid, f) for nid, f in framed if conn.replay(f, nid)]
        if written:
            self._frames("notification", len(written))
            self._kinds("user", len(written))
        return written
