"""What was delivered: offline delivery at register, the store's delivery
marks, receipts awaited, and notifications made undelivered again.

A notification is delivered once a session without receipts was written it,
or a receipts-session confirmed it; marks are batched (one store call a loop
turn) and the ``rtserver_delivered`` listeners hear of them. In a cluster
only the node that stored a notification writes its mark; the others settle
it there (``broker.settle``). A session that ends with notifications still
queued makes them undelivered again, so the next register offers them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from rtserver.broker import LocalBroker
from rtserver.delivery import Delivery
from rtserver.log import get_logger
from rtserver.metrics import Metrics
from rtserver.protocol import IdGenerator
from rtserver.receipts import ReceiptTable
from rtserver.sessions import Connection, SessionRegistry
from rtserver.stores.base import MAX_PAGE, Store, StoreError

log = get_logger("rtserver")

T = TypeVar("T")


class StoreOp(Protocol):
    """A store call, timed and counted by operation (``Hub._store_op``)."""

    def __call__(self, op: str, coro: Coroutine[Any, Any, T], /) -> Coroutine[Any, Any, T]: ...


#: ``(user_id, ids, connection or None)``: notifications became delivered.
DeliveredListener = Callable[[str, list[str], Connection | None], None]


def _made_at(notification_id: str) -> float:
    """When a notification was made, from its id (-inf if the id says not)."""
    try:
        return IdGenerator.created_at(notification_id)
    except ValueError:
        return -math.inf


class Delivered:
    """Delivery marks and receipts for the hub (``hub.delivered``)."""

    def __init__(
        self,
        *,
        store: Store,
        sessions: SessionRegistry,
        delivery: Delivery,
        broker: LocalBroker,
        metrics: Metrics,
        receipt_timeout: float,
        spawn: Callable[[Coroutine[Any, Any, Any]], Any],
        store_op: StoreOp,
        rows_pending: Callable[[str], list[asyncio.Future[None]]],
        in_flight: Callable[[str], Collection[str]],
        max_replay: int,
    ) -> None:
        self.store = store
        self.sessions = sessions
        self.delivery = delivery
        self.broker = broker
        self.metrics = metrics
        self.receipt_timeout = receipt_timeout
        self.spawn = spawn
        self._store_op = store_op
        #: Futures done once the user's pushed-first rows are written (the sender's).
        self._rows_pending = rows_pending
        #: The user's notifications being written, pushed after (the sender's).
        self._in_flight = in_flight
        self.max_replay = max_replay
        #: Notifications pushed to receipts-sessions, awaiting confirmation.
        self.receipts = ReceiptTable()
        self._marks: list[tuple[str, str, Connection | None]] = []
        #: Called when notifications become delivered (the rtserver_delivered hook).
        self.delivered_listeners: list[DeliveredListener] = []

    def pushed(self, user_id: str, notification_id: str, framed: bytes) -> None:
        """After a live push: delivered now if a session without receipts got
        it, else delivered once a receipts-session confirms."""
        sessions = [c for c in self.sessions.view_of_user(user_id) if not c.closed]
        if any(not c.receipts for c in sessions):
            self.note(user_id, notification_id)
        else:
            self.receipts.expect(user_id, notification_id, framed, {c.session_id for c in sessions})

    def note(
        self, user_id: str, notification_id: str, confirmed_by: Connection | None = None
    ) -> None:
        """Batch ``delivered_at`` updates: one store call per loop iteration."""
        if not self._marks:
            asyncio.get_running_loop().call_soon(lambda: self.spawn(self.flush()))
        self._marks.append((user_id, notification_id, confirmed_by))

    async def flush(self) -> None:
        marks, self._marks = self._marks, []
        if not marks:
            return
        # If this fails the notifications are offered again at the next
        # register: at-least-once, never lost.
        ids = [nid for _, nid, _ in marks]
        await self._store_op("mark_delivered", self.store.mark_delivered(ids, time.time()))
        if not self.delivered_listeners:
            return
        groups: dict[tuple[str, int], tuple[Connection | None, list[str]]] = {}
        for user_id, nid, conn in marks:
            groups.setdefault((user_id, id(conn)), (conn, []))[1].append(nid)
        for (user_id, _), (conn, group_ids) in groups.items():
            self.fire(user_id, group_ids, conn)

    def fire(self, user_id: str, ids: list[str], connection: Connection | None) -> None:
        for listener in self.delivered_listeners:
            try:
                listener(user_id, ids, connection)
            except Exception:
                log.exception("delivered_listener.failed")

    async def confirm(self, connection: Connection, ids: Sequence[str]) -> int:
        """A receipts-session confirms ``ids``: they are delivered from now on.
        Ids of other users' notifications change nothing. Returns how many
        confirmations were new to this process."""
        assert connection.user_id is not None
        user_id = connection.user_id
        saving = self._rows_pending(user_id)
        if saving:
            # Pushed before its row was written: mark it once the row exists.
            await asyncio.gather(*saving)
        done = self.receipts.confirm(user_id, list(dict.fromkeys(ids)))
        for seconds in done.latencies:
            self.metrics.confirm_seconds.observe(seconds)
        self.metrics.confirmed.inc(len(done.latencies))
        for nid in done.known:
            self.note(user_id, nid, connection)
        for origin, sent_there in done.elsewhere.items():
            self.broker.settle(origin, user_id, sent_there)  # that node writes it
        if done.unknown:
            # Not pushed by this process (a restart, or confirmed twice): the
            # store is told, scoped to the user, and marks only first times.
            await self._store_op(
                "mark_delivered",
                self.store.mark_delivered(done.unknown, time.time(), user_id=user_id),
            )
        return len(done.known)

    def settled_elsewhere(self, user_id: str, ids: list[str]) -> None:
        """Another node's session got (or confirmed) notifications this node
        sent: they are delivered. This node stops waiting for receipts of
        them and marks them, once their rows are written (the push may have
        gone out before the write)."""
        for nid in ids:
            entry = self.receipts.get(nid)
            if entry is not None and entry.user_id == user_id:
                self.receipts.forget(nid)
        self.spawn(self._mark_settled(user_id, ids))

    async def _mark_settled(self, user_id: str, ids: list[str]) -> None:
        saving = self._rows_pending(user_id)
        if saving:
            await asyncio.gather(*saving)
        try:
            await self._store_op(
                "mark_delivered", self.store.mark_delivered(ids, time.time(), user_id=user_id)
            )
        except StoreError as err:
            # Offered again at the next register: at-least-once, never lost.
            log.warning("receipts.mark_failed", user_id=user_id, error=str(err))

    def resend_unconfirmed(self) -> None:
        """Push notifications unconfirmed for ``receipt_timeout`` to the user's
        other receipts-sessions (same id: clients drop duplicates). With no
        other session the entry is dropped: the store still has it undelivered,
        so the user's next register offers it again."""
        for nid, entry in self.receipts.due(self.receipt_timeout):
            targets = [
                c
                for c in self.sessions.of_user(entry.user_id)
                if c.receipts and not c.closed and c.session_id not in entry.tried
            ]
            if not targets:
                self.receipts.forget(nid)
                continue
            n = self.delivery.resend(targets, entry.framed, nid)
            self.metrics.resends.inc(n)
            self.receipts.expect(entry.user_id, nid, entry.framed, {c.session_id for c in targets})

    def connection_finished(self, conn: Connection) -> None:
        """The socket of a gone session is done. Of what it still queued when
        it was gone, what left after all (a peer that read on through the
        closing handshake) is delivered again; the rest stays undelivered,
        for the user's next register."""
        requeued, conn.requeued = conn.requeued, None
        if not requeued or conn.user_id is None:
            return
        still = set(conn.unsent_notifications())
        left = [nid for nid in requeued if nid not in still]
        lost = len(requeued) - len(left)
        if lost:
            self.metrics.requeued.inc(lost)
            log.info(
                "delivery.requeued",
                user_id=conn.user_id,
                session_id=conn.session_id,
                count=lost,
                reason=conn.close_reason,
            )
        if left:
            self.spawn(self._mark_delivered_again(conn.user_id, left))

    def requeue(self, user_id: str, ids: list[str]) -> list[str]:
        """Notifications counted delivered because a session now gone was
        sent them, though they were still queued here: undelivered again, so
        the user's next register offers them, unless another session of the
        user here, open since before they were made, has them. Returns the
        ids made undelivered."""
        others = [c for c in self.sessions.view_of_user(user_id) if not c.closed and not c.receipts]
        if others:
            held = {nid for c in others for nid in c.unsent_notifications()}
            since = min(c.registered_at or math.inf for c in others)
            ids = [nid for nid in ids if nid in held or _made_at(nid) < since]
            if not ids:
                return []
        lost = set(ids)
        self._marks = [m for m in self._marks if m[1] not in lost]
        self.spawn(self._mark_undelivered(user_id, ids))
        return ids

    async def _mark_delivered_again(self, user_id: str, ids: list[str]) -> None:
        try:
            await self._store_op(
                "mark_delivered", self.store.mark_delivered(ids, time.time(), user_id=user_id)
            )
        except StoreError as err:
            # Offered once more at the next register: at least once, never lost.
            log.warning("delivery.mark_failed", user_id=user_id, error=str(err))

    async def _mark_undelivered(self, user_id: str, ids: list[str]) -> None:
        saving = self._rows_pending(user_id)
        if saving:
            await asyncio.gather(*saving)  # rows written as delivered: after them
        try:
            await self._store_op("mark_undelivered", self.store.mark_undelivered(user_id, ids))
        except StoreError as err:
            log.error("delivery.requeue_failed", user_id=user_id, ids=ids, error=str(err))

    async def replay(self, conn: Connection, user_id: str, last_id: str | None) -> None:
        """Offline delivery to a session that just registered: every
        notification of the user no session has received yet (or, with
        ``last_id``, every one after it), oldest first, at most
        ``limits.max_replay``; written notifications are marked or awaited
        like live pushes. Pushes meanwhile are held by the connection."""
        cap = self.max_replay
        cursor, sent = last_id, 0
        saving = self._rows_pending(user_id)
        if saving:
            # Pushed before this session existed and still being written:
            # ``after(last_id)`` must see them.
            await asyncio.gather(*saving)
        while sent < cap and not conn.closed:
            limit = min(MAX_PAGE, cap - sent)
            try:
                if last_id is not None:
                    assert cursor is not None
                    page = await self._store_op("after", self.store.after(user_id, cursor, limit))
                else:
                    page = await self._store_op(
                        "undelivered", self.store.undelivered(user_id, after=cursor, limit=limit)
                    )
            except StoreError:
                log.warning("replay.failed", user_id=user_id, sent=sent)
                return
            if not page:
                break
            inflight = self._in_flight(user_id)
            settled = [(n.id, n.to_wire()) for n in page if n.id not in inflight]
            written = self.delivery.replay(conn, settled)
            for nid, framed in written:
                if conn.receipts:
                    self.receipts.expect(user_id, nid, framed, {conn.session_id})
                else:
                    self.note(user_id, nid)
            sent += len(page)
            cursor = page[-1].id
            if len(page) < limit:
                break
        if sent:
            log.info("replay.done", user_id=user_id, count=sent, resumed=last_id is not None)
