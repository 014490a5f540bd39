"""Sending notifications to users: made (through the ``rtserver_notification``
hooks and the limits), pushed and stored, a whole batch with one store call.

Sending is in two steps, so that one store call serves a whole batch:

- ``_begin``, at once for each notification: when the user has a live
  session, push now (the push does not wait for the disk); if a session that
  does not confirm receipts got it, the row is written already delivered (one
  write), else a confirmation marks it delivered once the row is written.
  Otherwise the notification is "in flight": its row is written first and
  pushed after to whichever sessions exist then. A replay that finds an
  in-flight one in the store leaves it to that push, and later sends to the
  same user take this path too, so the user's notifications stay in order and
  are sent once.
- ``_finish``: one store call for the batch, then the in-flight pushes and
  the results.

``send_notification`` calls made in the same loop turn share one batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Coroutine, Iterator, Sequence
from typing import Any

import msgspec

from rtserver.broker import LocalBroker
from rtserver.config import Config
from rtserver.delivered import Delivered, StoreOp
from rtserver.delivery import Delivery, notification_frame
from rtserver.log import get_logger
from rtserver.metrics import Metrics
from rtserver.protocol import (
    INTERNAL_ERROR,
    IdGenerator,
    Notification,
    ProtocolError,
    build_notification,
)
from rtserver.sessions import Connection, SessionRegistry
from rtserver.stores.base import Store, StoreError

log = get_logger("rtserver")


def _check_user_id(user_id: Any) -> None:
    if not isinstance(user_id, str) or not user_id or len(user_id) > 256:
        raise ProtocolError("bad_request", "user_id: required string of 1 to 256 characters")


class SendResult(msgspec.Struct, frozen=True, gc=False):
    """What became of one notification sent. Unpacks as
    ``notification, delivered = result``. Not tracked by the garbage
    collector (it refers to a Notification, which is not either): a busy
    server makes tens of thousands a second."""

    notification: Notification
    #: Live sessions the notification was written to (0: stored for later).
    delivered: int

    def __iter__(self) -> Iterator[Any]:
        return iter((self.notification, self.delivered))


class _Batch:
    """Notifications sent together: pushed one by one (``Hub._begin``), stored
    with one store call (``Hub._finish``)."""

    __slots__ = ("callers", "later", "notifications", "now", "pushed", "saved", "users")

    def __init__(self) -> None:
        self.now = time.time()
        self.notifications: list[Notification] = []
        #: Per notification, the live sessions it was pushed to.
        self.pushed: list[int] = []
        #: Indexes of the notifications written first and pushed after.
        self.later: list[int] = []
        #: Done once the batch's rows are written.
        self.saved: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Users pushed a notification before its row is written: their
        #: replays and receipts wait for ``saved`` (``Hub._rows_pending``).
        self.users: set[str] = set()
        #: With ``send_notification``: each caller's future, in order.
        self.callers: list[asyncio.Future[SendResult | StoreError]] = []


class Sender:
    """Makes, pushes and stores per-user notifications (``hub.sending``)."""

    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        sessions: SessionRegistry,
        delivery: Delivery,
        broker: LocalBroker,
        metrics: Metrics,
        new_id: IdGenerator,
        spawn: Callable[[Coroutine[Any, Any, Any]], Any],
        store_op: StoreOp,
    ) -> None:
        self.config = config
        self.store = store
        self.sessions = sessions
        self.delivery = delivery
        self.broker = broker
        self.metrics = metrics
        self.new_id = new_id
        self.spawn = spawn
        self._store_op = store_op
        #: Set by the hub: what makes notifications delivered.
        self.delivered: Delivered
        #: Per user, ids written first and pushed after (see the module's doc).
        self._inflight: dict[str, set[str]] = {}
        #: Batches whose rows are being written (see ``rows_pending``).
        self._writing: set[_Batch] = set()
        #: The batch collecting this loop turn's ``send_notification`` calls.
        self._turn_batch: _Batch | None = None
        #: ``(user_id, payload) -> payload``, in order, before a notification
        #: is built (the ``rtserver_notification`` hook); user_id None: a broadcast.
        self.notification_filters: Sequence[Callable[[str | None, dict[str, Any]], Any]] = ()

    def in_flight(self, user_id: str) -> Collection[str]:
        """The user's notifications being written, to be pushed after."""
        return self._inflight.get(user_id, ())

    def close(self) -> None:
        """Store what this turn's ``send_notification`` calls sent (at shutdown)."""
        if self._turn_batch is not None:
            self._close_turn_batch(self._turn_batch)

    def make_notification(
        self,
        user_id: str | None,
        payload: Any,
        *,
        broadcast: bool = False,
        notification_id: str | None = None,
        created_at: float | None = None,
    ) -> Notification:
        """The one place a notification is made: through the
        ``rtserver_notification`` hooks, then validated against the limits;
        raises ``ProtocolError``. ``notification_id``: one reserved earlier (an
        idempotent retry); ``created_at``: its time, when the caller has it."""
        limits = self.config.limits
        if self.notification_filters:
            payload = self.filter_notification(user_id, payload)
        nid = notification_id or self.new_id()
        return build_notification(
            payload,
            user_id=user_id,
            notification_id=nid,
            created_at=IdGenerator.created_at(nid) if created_at is None else created_at,
            max_bytes=limits.max_notification_bytes,
            max_depth=limits.max_depth,
            max_fields=limits.max_fields,
            broadcast=broadcast,
        )

    def filter_notification(self, user_id: str | None, payload: Any) -> Any:
        """``payload`` through the ``rtserver_notification`` hooks, in order:
        each gets what the one before returned. A ``ProtocolError`` refuses
        the notification as it says; any other exception is logged and refuses
        it with ``internal_error`` (500): the caller is told, nothing is sent."""
        for hook in self.notification_filters:
            try:
                payload = hook(user_id, payload)
            except ProtocolError:
                raise
            except Exception:
                log.exception("hook.failed", hook="rtserver_notification", user_id=user_id)
                raise ProtocolError(
                    INTERNAL_ERROR, "a plugin failed on this notification", status=500
                ) from None
        return payload

    async def send_notification(
        self, user_id: str, payload: dict[str, Any], *, notification_id: str | None = None
    ) -> SendResult:
        """Store a notification for ``user_id`` and push it to every live session.

        Raises ``ProtocolError`` for an invalid payload and ``StoreError`` when
        it could not be stored (``StoreError.delivered``: sessions that got it
        live all the same). Calls made in the same loop turn are stored with
        one store call, as ``send_notifications`` would. ``notification_id``:
        an id reserved earlier; sent again with it, a notification is stored
        once (and clients drop the repeated push).
        """
        _check_user_id(user_id)
        notification = self.make_notification(user_id, payload, notification_id=notification_id)
        batch = self._turn_batch
        if batch is None:
            batch = self._turn_batch = _Batch()
            asyncio.get_running_loop().call_soon(self._close_turn_batch, batch)
        self._begin(batch, notification)
        fut: asyncio.Future[SendResult | StoreError] = asyncio.get_running_loop().create_future()
        batch.callers.append(fut)
        result = await fut
        if isinstance(result, StoreError):
            raise result
        return result

    def _close_turn_batch(self, batch: _Batch) -> None:
        """The turn is over: store what its ``send_notification`` calls sent."""
        if self._turn_batch is not batch:
            return  # closed already, by ``stop``
        self._turn_batch = None

        async def finish() -> None:
            try:
                results = await self._finish(batch)
            except BaseException as exc:
                for fut in batch.callers:
                    if fut.done():
                        continue
                    if isinstance(exc, asyncio.CancelledError):
                        fut.cancel()
                    else:
                        fut.set_exception(exc)
                raise
            for fut, result in zip(batch.callers, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

        self.spawn(finish())

    async def send_notifications(
        self, items: Sequence[tuple[str, dict[str, Any]]], *, ids: Sequence[str] | None = None
    ) -> list[SendResult | StoreError]:
        """Many notifications at once (the batch HTTP API). All are validated
        before any is stored, so a bad item refuses the whole batch
        (``ProtocolError``); they are stored with one store call. Each result
        is a ``SendResult``, or the ``StoreError`` that kept that one out.
        ``ids``: one reserved earlier per item (see ``send_notification``)."""
        notifications = []
        fresh = ids is None
        if ids is None:
            ids = self.new_id.take(len(items))
        created_at = IdGenerator.created_at(ids[0]) if ids else 0.0  # the same for all
        for index, (user_id, payload) in enumerate(items):
            try:
                _check_user_id(user_id)
                notifications.append(
                    self.make_notification(
                        user_id,
                        payload,
                        notification_id=ids[index],
                        created_at=created_at if fresh else None,
                    )
                )
            except ProtocolError as err:
                raise ProtocolError(
                    err.code, f"[{index}]: {err.message}", status=err.status
                ) from None
        batch = _Batch()
        for n in notifications:
            self._begin(batch, n)
        return await self._finish(batch)

    def _begin(self, batch: _Batch, n: Notification) -> None:
        user_id = n.user_id
        assert user_id is not None
        reached = 0
        if user_id not in self._inflight:
            sessions = self.sessions.view_of_user(user_id)
            for c in sessions:
                if not c.closed:
                    reached = self.push(n, user_id, batch.now, sessions)
                    break
            else:
                reached = -1
        if reached >= 0:
            if not batch.users:
                self._writing.add(batch)
            batch.users.add(user_id)
            batch.pushed.append(reached)
        else:
            self._inflight.setdefault(user_id, set()).add(n.id)
            batch.later.append(len(batch.notifications))
            batch.pushed.append(0)
        batch.notifications.append(n)

    def rows_pending(self, user_id: str) -> list[asyncio.Future[None]]:
        """Futures done once the user's pushed-first notifications are written."""
        return [b.saved for b in self._writing if user_id in b.users]

    async def _finish(self, batch: _Batch) -> list[SendResult | StoreError]:
        notifications, pushed = batch.notifications, batch.pushed
        try:
            errors = await self._store_op("insert", self.store.insert_many(notifications))
        except StoreError as err:
            errors = [err] * len(notifications)
        finally:
            batch.saved.set_result(None)
            self._writing.discard(batch)
            for i in batch.later:
                n = notifications[i]
                inflight = self._inflight[n.user_id]  # type: ignore[index]
                inflight.discard(n.id)
                if not inflight:
                    del self._inflight[n.user_id]  # type: ignore[arg-type]
        for i in batch.later:
            if errors[i] is None:
                pushed[i] = self.push(notifications[i], notifications[i].user_id or "", None)
        if not any(errors):
            # The usual case, in one pass.
            self.metrics.notifications.inc(len(notifications))
            results: list[SendResult | StoreError] = list(map(SendResult, notifications, pushed))
        else:
            results = []
            stored = 0
            for n, error, delivered in zip(notifications, errors, pushed, strict=True):
                if error is None:
                    stored += 1
                    results.append(SendResult(n, delivered))
                    continue
                if delivered:
                    log.error(
                        "notification.not_stored",
                        user_id=n.user_id,
                        notification_id=n.id,
                        delivered=delivered,
                        error=str(error),
                    )
                results.append(StoreError(str(error), delivered=delivered))
            if stored:
                self.metrics.notifications.inc(stored)
        if self.delivered.delivered_listeners:
            for n, error in zip(notifications, errors, strict=True):
                if error is None and n.delivered_at is not None:
                    self.delivered.fire(n.user_id or "", [n.id], None)
        return results

    def push(
        self,
        n: Notification,
        user_id: str,
        now: float | None,
        sessions: Collection[Connection] | None = None,
    ) -> int:
        """Push to the user's sessions (``sessions``: the caller looked them
        up already). With ``now`` (before the row is written) a session
        without receipts getting it makes the row delivered at ``now``;
        without (after), it is marked delivered later."""
        if sessions is None:
            sessions = self.sessions.view_of_user(user_id)
            if not sessions and not self.broker.enabled:
                return 0  # nobody to push to: not even a frame to build
        framed = notification_frame(n)
        delivered, plain = self.delivery.notify_user(user_id, framed, n.id, sessions)
        if not delivered:
            return 0
        if now is not None and plain:
            n.delivered_at = now
        else:
            self.delivered.pushed(user_id, n.id, framed)
        return delivered
