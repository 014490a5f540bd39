"""The Python API, with the names of the Flask-SocketIO module it replaces,
and the server's shared state.

Plugins, the HTTP API and embedding applications all go through ``Hub``:

    result = await hub.send_notification("user123", {"message": "Case updated"})
    await hub.send_direct_message(session_id, {"message": "Restarting in 5 min"})
    await hub.send_broadcast_notification({"message": "Maintenance", "type": "warning"})

From another thread (a Flask view, a worker), use ``hub.threadsafe``: the same
calls hop onto the IOLoop and return a ``concurrent.futures.Future``.

Guarantee: a notification is stored before ``send_notification`` returns,
or the caller gets ``StoreError`` (HTTP 503). To a user with a live session
the push goes out first, so delivery never waits for the disk, and the row is
written already marked delivered (one write) when a session without receipts
got it; if that write then fails, the error says how many sessions got it
live (``StoreError.delivered``). To a user with no live session the row is
written first and pushed after, so a session that registers meanwhile gets it
exactly once and in order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from tornado.ioloop import PeriodicCallback

from rtserver.auth import Authenticator
from rtserver.broker import MAX_SESSIONS_PAGE, BrokerUnavailable, make_broker
from rtserver.config import Config
from rtserver.delivered import Delivered
from rtserver.delivery import Delivery, frame, notification_frame
from rtserver.idempotency import Keys
from rtserver.limits import RateLimits
from rtserver.log import get_logger
from rtserver.metrics import Metrics
from rtserver.protocol import (
    NOT_FOUND,
    UNAVAILABLE,
    IdGenerator,
    Notification,
    ProtocolError,
    check_shape,
    encode_json,
)
from rtserver.sending import Sender
from rtserver.sending import SendResult as SendResult  # where plugins found it before
from rtserver.sessions import Connection, SessionRegistry
from rtserver.stores.base import Store, StoreError
from rtserver.topics import PublishResult, Topics

T = TypeVar("T")
log = get_logger("rtserver")


@contextlib.asynccontextmanager
async def _cluster_request() -> AsyncIterator[None]:
    """Another node cannot be asked: 503 with a retry hint, not a false "no
    such session"."""
    try:
        yield
    except BrokerUnavailable as err:
        raise ProtocolError(
            UNAVAILABLE,
            f"the node holding this session cannot be reached ({err}); try again",
            status=503,
            extra={"retry_after": 1.0},
        ) from None


class Hub:
    """Shared state (sessions, store, delivery, metrics) and the Python API."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.metrics = Metrics()
        self.broker = make_broker(config.broker)
        self.sessions = SessionRegistry(self.broker.session_prefix)
        server = config.server
        self.delivery = Delivery(
            self.sessions,
            self.metrics,
            self.broker,
            coalesce_turns=server.coalesce_turns,
            coalesce_max_delay=server.coalesce_max_delay,
            coalesce_busy_delay=server.coalesce_busy_delay,
            coalesce_busy_connections=server.coalesce_busy_connections,
        )
        self.auth = Authenticator(config.auth)
        self.limits = RateLimits(config.limits, self.metrics)
        #: ``Idempotency-Key`` claims and answers, kept in the store.
        self.keys = Keys(
            store, self.metrics, ttl=server.idempotency_ttl, lease=server.idempotency_lease
        )
        self.new_id = IdGenerator()
        #: Per-user notifications: made, pushed, stored (``rtserver.sending``).
        self.sending = Sender(
            config=config,
            store=store,
            sessions=self.sessions,
            delivery=self.delivery,
            broker=self.broker,
            metrics=self.metrics,
            new_id=self.new_id,
            spawn=self.spawn,
            store_op=self._store_op,
        )
        #: Delivery marks, receipts awaited, requeues (``rtserver.delivered``).
        self.delivered = Delivered(
            store=store,
            sessions=self.sessions,
            delivery=self.delivery,
            broker=self.broker,
            metrics=self.metrics,
            receipt_timeout=server.receipt_timeout,
            spawn=self.spawn,
            store_op=self._store_op,
            rows_pending=self.sending.rows_pending,
            in_flight=self.sending.in_flight,
            max_replay=config.limits.max_replay,
        )
        self.sending.delivered = self.delivered
        #: Topic subscriptions, publishing, presence and history.
        self.topics = Topics(
            config, store, self.delivery, self.broker, self.metrics, self.new_id, self.spawn
        )
        self.threadsafe = ThreadSafeAPI(self)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.shutting_down = False
        self._periodic: list[PeriodicCallback] = []
        self._jobs: set[asyncio.Task[Any]] = set()  # periodic runs going now
        self._store_timers: dict[str, Any] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._outbound_most = 0
        self.metrics.bind_gauges(
            connections=lambda: len(self.sessions),
            peak=lambda: self.sessions.peak,
            users=self.sessions.users,
            sessions=lambda: self.sessions.sessions,
            outbound=self._outbound_total,
            outbound_max=lambda: self._outbound_most,
            store_buffered=lambda: getattr(self.store, "buffered", 0),
            store_dead_letters=lambda: getattr(self.store, "dead_letters", 0),
            subscriptions=lambda: self.topics.count,
            socket_writes=lambda: self.delivery.outbox.sends,
            held_flushes=lambda: self.delivery.outbox.held,
        )

    def _outbound_total(self) -> int:
        """For the outbound gauges: one pass gives both; the fullest queue's
        gauge, read next in the same collection, takes what this one found."""
        total, self._outbound_most = self.sessions.outbound()
        return total

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        """Open the store and start the periodic jobs (cleanup, metrics log)."""
        self.loop = asyncio.get_running_loop()
        await self.store.open()
        await self.broker.start(self)
        cleanup = self.config.store.cleanup_interval
        if cleanup > 0:
            self._every(cleanup, self.cleanup)
        interval = self.config.logging.metrics_interval
        if interval > 0:
            self._every(interval, self.log_metrics)
        server = self.config.server
        self._every_sync(max(0.05, server.receipt_timeout / 2), self.resend_unconfirmed)
        if server.ping_interval > 0:
            tick = min(server.ping_interval, server.ping_timeout or server.ping_interval) / 2
            self._every_sync(tick, self.heartbeat)
        log.info("store.opened", backend=self.store.name)

    def _every_sync(self, seconds: float, job: Callable[[], None]) -> None:
        pc = PeriodicCallback(job, seconds * 1000)
        pc.start()
        self._periodic.append(pc)

    def _every(self, seconds: float, job: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``job`` every ``seconds``, one run at a time: a tick that finds
        the last run going (a purge of a big backlog can outlast the
        interval) is skipped. ``stop`` cancels a run still going."""
        running: asyncio.Task[Any] | None = None

        def tick() -> None:
            nonlocal running
            if running is None or running.done():
                running = self.spawn(job())
                self._jobs.add(running)
                running.add_done_callback(self._jobs.discard)

        pc = PeriodicCallback(tick, seconds * 1000)
        pc.start()
        self._periodic.append(pc)

    async def stop(self) -> None:
        """Stop periodic jobs, finish background writes, close the store."""
        self.shutting_down = True
        for pc in self._periodic:
            pc.stop()
        self._periodic.clear()
        # A purge stops between two of its steps (each is committed on its own).
        for job in list(self._jobs):
            job.cancel()
        self.sending.close()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.delivered.flush()
        await self.broker.stop()
        await self.store.close()
        log.info("store.closed", backend=self.store.name)

    def heartbeat(self) -> None:
        """One sweep over every connection (one timer for all, not a task per
        socket): ping those quiet for ``ping_interval``; drop at once those
        whose ping went unanswered for ``ping_timeout``, so a dead peer is gone
        from the registry and the metrics within interval + timeout."""
        server = self.config.server
        now = time.monotonic()
        timeout = server.ping_timeout or server.ping_interval
        for conn in self.sessions:
            if conn.closed:
                continue
            if conn.ping_sent_at is not None:
                if now - conn.ping_sent_at >= timeout:
                    log.info(
                        "connection.ping_timeout", user_id=conn.user_id, session_id=conn.session_id
                    )
                    conn.abort("ping timed out")
            elif now - conn.last_seen >= server.ping_interval:
                conn.ping(now)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, keeping a reference until it ends
        and logging (never losing) its exception."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("task.failed", exc_info=t.exception())

        task.add_done_callback(done)
        return task

    # -- timing helper ----------------------------------------------------

    async def _store_op(self, op: str, coro: Coroutine[Any, Any, T]) -> T:
        t0 = time.perf_counter()
        try:
            return await coro
        except StoreError:
            self.metrics.store_errors.labels(op).inc()
            raise
        finally:
            timer = self._store_timers.get(op)
            if timer is None:
                timer = self._store_timers[op] = self.metrics.store_seconds.labels(op)
            timer.observe(time.perf_counter() - t0)

    # -- sending (``rtserver.sending``) ---------------------------------------

    async def send_notification(
        self, user_id: str, payload: dict[str, Any], *, notification_id: str | None = None
    ) -> SendResult:
        """Store a notification for ``user_id`` and push it to every live session.

        Raises ``ProtocolError`` for an invalid payload and ``StoreError`` when
        it could not be stored (``StoreError.delivered``: sessions that got it
        live all the same). Calls made in the same loop turn are stored with
        one store call. ``notification_id``: an id reserved earlier; sent
        again with it, a notification is stored once (and clients drop the
        repeated push).
        """
        return await self.sending.send_notification(
            user_id, payload, notification_id=notification_id
        )

    async def send_notifications(
        self, items: Sequence[tuple[str, dict[str, Any]]], *, ids: Sequence[str] | None = None
    ) -> list[SendResult | StoreError]:
        """Many notifications at once, validated first and stored with one
        store call; each result a ``SendResult`` or the ``StoreError`` that
        kept that one out (see ``Sender.send_notifications``)."""
        return await self.sending.send_notifications(items, ids=ids)

    async def send_direct_message(self, session_id: str, payload: dict[str, Any]) -> int:
        """Push ``payload`` as a ``message`` event to one session (not stored),
        on whichever node holds it.

        Returns 1 when sent, 0 when no node has that session.
        """
        if not isinstance(payload, dict):
            raise ProtocolError("bad_request", "message: must be a JSON object")
        limits = self.config.limits
        try:
            size = len(encode_json(payload))
        except (TypeError, ValueError) as err:  # a lone surrogate, an unencodable type
            raise ProtocolError("bad_request", f"message: not JSON: {err}") from None
        if size > limits.max_notification_bytes:
            raise ProtocolError("too_large", "message: over the size limit", status=413)
        check_shape(
            payload, max_depth=limits.max_depth, max_fields=limits.max_fields, where="message"
        )
        if self.delivery.to_session(session_id, "message", payload):
            return 1
        async with _cluster_request():
            return int(await self.broker.send_to_session(session_id, frame("message", payload)))

    async def send_broadcast_notification(
        self, payload: dict[str, Any], *, notification_id: str | None = None
    ) -> int:
        """Push a notification (``"broadcast": true``) to every registered session.

        Broadcasts are live only: they are not stored per user. Returns how
        many sessions were reached.
        """
        notification = self.sending.make_notification(
            None, payload, broadcast=True, notification_id=notification_id
        )
        n = self.delivery.broadcast_framed(notification_frame(notification))
        log.info("broadcast.sent", notification_id=notification.id, delivered=n)
        return n

    # -- receipts and delivery marks (``rtserver.delivered``) ---------------

    async def confirm_received(self, connection: Connection, ids: Sequence[str]) -> int:
        """A receipts-session confirms ``ids``: they are delivered from now on.
        Returns how many confirmations were new to this process."""
        return await self.delivered.confirm(connection, ids)

    def settled_elsewhere(self, user_id: str, ids: list[str]) -> None:
        self.delivered.settled_elsewhere(user_id, ids)

    def resend_unconfirmed(self) -> None:
        self.delivered.resend_unconfirmed()

    def connection_finished(self, conn: Connection) -> None:
        self.delivered.connection_finished(conn)

    # -- sessions ---------------------------------------------------------

    async def register_user_session(
        self, user_id: str, connection: Connection, *, last_id: str | None = None
    ) -> int | None:
        """Make ``connection`` a session of ``user_id`` and schedule offline delivery.

        Returns the user's unread count (None while the store is unreachable).
        Once the reply to the register frame is written, the backlog is pushed
        oldest first: every notification no session has received yet, or with
        ``last_id`` every one after it.
        Pushes that arrive meanwhile are held and follow without duplicates.
        """
        connection.begin_replay()
        self.sessions.register(connection, user_id)
        self.broker.session_added(connection)
        try:
            unread: int | None = await self._store_op(
                "unread_count", self.store.unread_count(user_id)
            )
        except StoreError as err:
            # Live delivery goes on while the store is down; the backlog stays
            # undelivered in the store and is offered at a later register.
            log.warning("register.store_unavailable", user_id=user_id, error=str(err))
            unread = None

        async def replay() -> None:
            try:
                await self.delivered.replay(connection, user_id, last_id)
            finally:
                connection.end_replay()

        if connection.in_dispatch:
            connection.after_reply(lambda: self.spawn(replay()))
        else:
            self.spawn(replay())
        return unread

    def connection_gone(self, conn: Connection) -> None:
        """A connection closed: forget it (and the user's channel, if it was
        the user's last session on this node). What a session without
        receipts was sent but still queues is undelivered again at once
        (``_requeue``), until its socket is done (``connection_finished``)."""
        self.sessions.remove(conn)
        self.topics.connection_gone(conn)
        user_id = conn.user_id
        if user_id is None:
            return
        if not conn.receipts:
            lost = conn.unsent_notifications()
            if lost:
                conn.requeued = self.delivered.requeue(user_id, lost)
        self.broker.session_removed(conn)

    # -- from other nodes (``broker.Node``) ---------------------------------

    def from_cluster(
        self,
        user_id: str,
        framed: bytes,
        notification_id: str | None,
        exclude_session: str | None,
        origin: str,
        waiting: bool,
    ) -> None:
        """A push another node (``origin``) published for ``user_id``: to the
        sessions here. The origin writes the notification's delivery state:
        when it is ``waiting``, a session here without receipts getting it
        settles it there at once; receipts-sessions settle it when they confirm."""
        n = self.delivery.to_user(
            user_id,
            "notification" if notification_id else "read",
            None,
            notification_id=notification_id,
            framed=framed,
            fan_out=False,
            exclude_session=exclude_session,
        )
        if not n or notification_id is None:
            return
        sessions = [c for c in self.sessions.view_of_user(user_id) if not c.closed]
        if any(not c.receipts for c in sessions):
            if waiting:
                self.broker.settle(origin, user_id, [notification_id])
        else:
            self.delivered.receipts.expect(
                user_id,
                notification_id,
                framed,
                {c.session_id for c in sessions},
                origin=origin,
                waiting=waiting,
            )

    def broadcast_from_cluster(self, framed: bytes) -> None:
        self.delivery.broadcast_framed(framed, fan_out=False)

    def message_from_cluster(self, session_id: str, framed: bytes) -> bool:
        conn = self.sessions.get(session_id)
        if conn is None or not conn.registered or conn.closed:
            return False
        return self.delivery.to_connection_framed(conn, framed, "message")

    def topic_from_cluster(
        self, topic: str, publication_id: str | None, framed: bytes, *, presence: bool
    ) -> None:
        self.topics.deliver(topic, publication_id, framed, presence=presence)

    def summary(self) -> dict[str, Any]:
        """This node's figures for the cluster's view: counters, no walk over
        the connections."""
        sessions = self.sessions
        return {
            "connections": len(sessions),
            "sessions": sessions.sessions,
            "registered_users": sessions.users(),
            "connections_accepted_total": sessions.total,
            "connections_peak": sessions.peak,
        }

    # -- the cluster's view -------------------------------------------------

    async def cluster_sessions(
        self,
        user_id: str | None = None,
        *,
        cursor: str | None = None,
        limit: int = MAX_SESSIONS_PAGE,
    ) -> dict[str, Any]:
        """``{"sessions": [...], "next": cursor, "partial": bool}``: the
        user's sessions on every node, or a page of everyone's (this node's
        first); each with its ``node_id``. ``partial``: Redis could not be
        read, so only this node's are there."""
        return await self.broker.sessions(user_id, cursor=cursor, limit=limit)

    async def cluster_metrics(self) -> dict[str, Any]:
        """Every node's summary figures by node id, and their totals."""
        view = await self.broker.metrics()
        nodes = view["nodes"]
        totals = {
            key: sum(n.get(key, 0) for n in nodes.values())
            for key in ("connections", "sessions", "registered_users", "connections_accepted_total")
        }
        return {
            "node_id": self.broker.node_id,
            "cluster": totals,
            "nodes": nodes,
            "partial": view["partial"],
        }

    def get_user_sessions(self, user_id: str) -> list[str]:
        """Session ids of the user's live sessions on this node."""
        return [c.session_id for c in self.sessions.of_user(user_id)]

    def disconnect_session(self, session_id: str, reason: str = "disconnected by admin") -> bool:
        """Close a session of this node (1008); False when it has none."""
        conn = self.sessions.get(session_id)
        if conn is None:
            return False
        conn.close(1008, reason)
        return True

    async def disconnect(self, session_id: str, reason: str = "disconnected by admin") -> bool:
        """Close a session on whichever node holds it; False when none does."""
        if self.disconnect_session(session_id, reason):
            return True
        async with _cluster_request():
            return await self.broker.disconnect(session_id, reason)

    # -- topics -------------------------------------------------------------

    async def publish(
        self, topic: str, data: Any, *, publication_id: str | None = None
    ) -> PublishResult:
        """Publish ``data`` (any JSON value) to ``topic``: stored in its
        history, then pushed to its subscribers on every node. Raises
        ``ProtocolError`` (bad name, too large) or ``StoreError`` (not stored,
        and so pushed to nobody)."""
        return await self.topics.publish(topic, data, publication_id=publication_id)

    async def topic_presence(self, topic: str) -> dict[str, Any]:
        """``{"topic", "users": [{"user_id", "sessions"}], "count"}`` across the cluster."""
        return await self.topics.presence(topic)

    async def topic_history(
        self, topic: str, after: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The topic's kept publications after ``after``, oldest first."""
        return await self.topics.history(topic, after=after, limit=limit)

    # -- persistence ------------------------------------------------------

    async def save_notification(self, user_id: str, payload: dict[str, Any]) -> Notification:
        """Store a notification without pushing it; it reaches the user's
        next session through offline delivery."""
        notification = self.sending.make_notification(user_id, payload)
        await self._store_op("insert", self.store.insert(notification))
        self.metrics.notifications.inc()
        return notification

    async def get_notifications_for_user(
        self,
        user_id: str,
        unread_only: bool = False,
        *,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Notification]:
        """History, newest first (``limit`` at most 500)."""
        return await self._store_op(
            "history",
            self.store.history(user_id, unread_only=unread_only, limit=limit, before=before),
        )

    async def get_notification(self, user_id: str, notification_id: str) -> Notification:
        found = await self._store_op("get", self.store.get(user_id, notification_id))
        if found is None:
            raise ProtocolError(NOT_FOUND, "no such notification", status=404)
        return found

    async def mark_read(
        self, user_id: str, ids: Sequence[str] | None, *, origin: Connection | None = None
    ) -> tuple[int, int]:
        """Mark the user's notifications read (all when ``ids`` is None) and tell
        the user's other sessions with a ``read`` push. Returns (updated, unread)."""
        updated, unread = await self._store_op(
            "mark_read", self.store.mark_read(user_id, ids, time.time())
        )
        push: dict[str, Any] = {"all": True} if ids is None else {"ids": list(ids)}
        push["unread_count"] = unread
        self.delivery.to_user(user_id, "read", push, exclude=origin)
        return updated, unread

    async def unread_count(self, user_id: str) -> int:
        return await self._store_op("unread_count", self.store.unread_count(user_id))

    async def delete_notifications(self, user_id: str, ids: Sequence[str]) -> tuple[int, int]:
        """Remove these of the user's notifications and tell the user's
        sessions (a ``deleted`` push). Returns (deleted, unread)."""
        deleted, unread = await self._store_op(
            "delete", self.store.delete_notifications(user_id, list(ids))
        )
        if deleted:
            self.delivery.to_user(user_id, "deleted", {"ids": list(ids), "unread_count": unread})
        return deleted, unread

    async def erase_user(self, user_id: str, *, by: str) -> int:
        """Remove every stored notification of ``user_id`` (an erasure
        request); the user's sessions get ``deleted`` ``{"all": true}``, and
        the log keeps who erased whose. Returns how many were removed."""
        deleted, _ = await self._store_op("delete", self.store.delete_notifications(user_id, None))
        self.delivery.to_user(user_id, "deleted", {"all": True, "unread_count": 0})
        log.warning("privacy.erased", user_id=user_id, by=by, deleted=deleted)
        return deleted

    async def cleanup(self) -> int:
        """Remove notifications past retention (runs every ``cleanup_interval``)."""
        cfg = self.config.store
        read_retention = cfg.read_retention_days * 86400 if cfg.read_retention_days else None
        try:
            removed = await self._store_op(
                "purge", self.store.purge(time.time(), cfg.retention_days * 86400, read_retention)
            )
        except StoreError as err:
            log.warning("cleanup.failed", error=str(err))
            return 0
        if removed:
            log.info("cleanup.done", removed=removed)
        return removed

    # -- metrics ----------------------------------------------------------

    def get_connection_metrics(self) -> dict[str, Any]:
        """Connections (current, peak, total), users, frames, deliveries,
        store latency: the same figures as ``GET /metrics``, as JSON."""
        return self.metrics.snapshot()

    async def log_metrics(self) -> None:
        log.info("metrics.snapshot", **self.get_connection_metrics())
        dead = getattr(self.store, "dead_letters", 0)
        if dead:
            # Until an operator reads and removes them (GET /api/admin/dead_letters).
            log.error("store.dead_letters_unread", count=dead)


class ThreadSafeAPI:
    """The Python API for other threads: each call is scheduled on the IOLoop
    and returns a ``concurrent.futures.Future``."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        loop = self._hub.loop
        if loop is None:
            coro.close()
            raise RuntimeError("the server is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def send_notification(
        self, user_id: str, payload: dict[str, Any]
    ) -> concurrent.futures.Future[SendResult]:
        return self._submit(self._hub.send_notification(user_id, payload))

    def send_direct_message(
        self, session_id: str, payload: dict[str, Any]
    ) -> concurrent.futures.Future[int]:
        return self._submit(self._hub.send_direct_message(session_id, payload))

    def send_broadcast_notification(
        self, payload: dict[str, Any]
    ) -> concurrent.futures.Future[int]:
        return self._submit(self._hub.send_broadcast_notification(payload))

    def save_notification(
        self, user_id: str, payload: dict[str, Any]
    ) -> concurrent.futures.Future[Notification]:
        return self._submit(self._hub.save_notification(user_id, payload))

    def get_notifications_for_user(
        self, user_id: str, unread_only: bool = False, *, limit: int = 50
    ) -> concurrent.futures.Future[list[Notification]]:
        return self._submit(self._hub.get_notifications_for_user(user_id, unread_only, limit=limit))

    def get_user_sessions(self, user_id: str) -> concurrent.futures.Future[list[str]]:
        async def call() -> list[str]:
            return self._hub.get_user_sessions(user_id)

        return self._submit(call())

    def get_connection_metrics(self) -> concurrent.futures.Future[dict[str, Any]]:
        async def call() -> dict[str, Any]:
            return self._hub.get_connection_metrics()

        return self._submit(call())
