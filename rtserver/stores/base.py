"""The store interface every backend implements.

One suite (``tests/stores/suite.py``) runs over every backend. All methods are
coroutines and must never block the IOLoop. Timestamps are float seconds since
the epoch (UTC); ids are the time-ordered strings of ``protocol.IdGenerator``,
so ordering by id is ordering by creation.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence

from rtserver.protocol import Notification, Publication
from rtserver.stores.keys import Claim, KeyRecord

#: Most rows any single query returns; every read is bounded by it.
MAX_PAGE = 500


class StoreError(Exception):
    """The store could not do what was asked (unreachable, failed write).

    ``delivered`` is set by the hub when a notification that could not be
    stored had already been pushed live to that many sessions: the caller is
    told it is missing from history and offline delivery, not that it was lost.
    """

    def __init__(self, message: str, *, delivered: int = 0) -> None:
        super().__init__(message)
        self.delivered = delivered


class Store(abc.ABC):
    """Persistence for notifications: offline delivery, history, read state."""

    #: Short name for logs and metrics ("sqlite", "mongodb").
    name: str = "store"

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create what is missing (schema, indexes). Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release resources."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """True when the backend answers (readiness)."""

    @abc.abstractmethod
    async def insert(self, notification: Notification) -> None:
        """Store one notification. Raises ``StoreError`` when it was not stored.
        An id stored already counts as stored, and the stored row is kept as it
        is: it is the same notification, sent again (an earlier try landed, or
        an idempotent retry)."""

    async def insert_many(self, notifications: Sequence[Notification]) -> list[StoreError | None]:
        """Store several notifications; one entry per notification in order:
        None when it was stored, else the ``StoreError`` that kept it out.
        Backends override this to write them in one round trip."""
        results = await asyncio.gather(
            *(self.insert(n) for n in notifications), return_exceptions=True
        )
        out: list[StoreError | None] = []
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, StoreError):
                raise result
            out.append(result)
        return out

    @abc.abstractmethod
    async def mark_delivered(
        self, ids: Sequence[str], at: float, *, user_id: str | None = None
    ) -> None:
        """Set ``delivered_at`` where it is not set yet; only on ``user_id``'s
        notifications when given (ids that came from a client)."""

    @abc.abstractmethod
    async def mark_undelivered(self, user_id: str, ids: Sequence[str]) -> None:
        """Clear ``delivered_at`` on these of ``user_id``'s notifications:
        counted delivered, they never reached the session after all, and the
        next register offers them again."""

    @abc.abstractmethod
    async def undelivered(
        self, user_id: str, *, after: str | None = None, limit: int = MAX_PAGE
    ) -> list[Notification]:
        """The user's notifications never delivered to any session, oldest first
        (only ids greater than ``after`` when given, for paging)."""

    @abc.abstractmethod
    async def after(self, user_id: str, last_id: str, limit: int = MAX_PAGE) -> list[Notification]:
        """The user's notifications with id greater than ``last_id``, oldest first."""

    @abc.abstractmethod
    async def history(
        self,
        user_id: str,
        *,
        unread_only: bool = False,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Notification]:
        """The user's notifications, newest first, ids below ``before`` if given."""

    @abc.abstractmethod
    async def get(self, user_id: str, notification_id: str) -> Notification | None:
        """One notification of the user, or None."""

    @abc.abstractmethod
    async def mark_read(
        self, user_id: str, ids: Sequence[str] | None, at: float
    ) -> tuple[int, int]:
        """Mark the given ids (or all when None) of this user read, atomically.

        Returns ``(updated, unread_count)``: how many changed from unread to
        read, and how many unread remain afterwards.
        """

    @abc.abstractmethod
    async def unread_count(self, user_id: str) -> int:
        """How many of the user's notifications are unread."""

    @abc.abstractmethod
    async def delete_notifications(
        self, user_id: str, ids: Sequence[str] | None
    ) -> tuple[int, int]:
        """Remove these of the user's notifications, or all of them (None: an
        erasure); returns ``(deleted, unread_count)`` after."""

    @abc.abstractmethod
    async def purge(self, now: float, retention: float, read_retention: float | None) -> int:
        """Remove notifications created before ``now - retention``, and read ones
        read before ``now - read_retention``. Returns how many were removed
        (backends that expire by themselves, such as MongoDB TTL, may return 0)."""

    # -- idempotency keys (``rtserver.idempotency``) ----------------------

    @abc.abstractmethod
    async def claim_keys(
        self, records: Sequence[KeyRecord], now: float, lease: float
    ) -> list[Claim]:
        """Claim each record's key atomically, across every process sharing
        the store: ``new`` when absent or expired, ``taken`` when an
        unfinished claim of the same request is older than ``lease`` seconds,
        else ``held`` with the record in force."""

    @abc.abstractmethod
    async def finish_keys(self, answers: Sequence[tuple[str, int, bytes]]) -> None:
        """Keep the answer (key, status, body) given to each key's request."""

    @abc.abstractmethod
    async def release_keys(self, keys: Sequence[str]) -> None:
        """These unfinished claims may be taken at once (their runs failed)."""

    # -- topic history (``rtserver.topics``) --------------------------------

    @abc.abstractmethod
    async def insert_publication(self, publication: Publication, keep: int) -> None:
        """Store a publication in its topic's history (an id stored already
        counts as stored), then keep only the topic's newest ``keep``: the
        older ones are removed and the newest removed id remembered
        (``trimmed``). Raises ``StoreError`` when it was not stored."""

    @abc.abstractmethod
    async def publications(
        self, topic: str, *, after: str | None, limit: int, now: float
    ) -> list[Publication]:
        """The topic's publications not expired at ``now``, oldest first,
        with ids greater than ``after`` when given."""

    @abc.abstractmethod
    async def trimmed(self, topic: str) -> str | None:
        """The newest id ever removed from the topic's history to keep it to
        size (None: none was); expired ones are told by their time."""
