"""Delivery receipts: notifications pushed to receipts-sessions, awaiting confirmation.

A session that registered with ``"receipts": true`` confirms what it received
with ``received`` frames. Until then a notification pushed only to such
sessions is not delivered: it stays undelivered in the store (so the user's
next register offers it again) and waits here, so that after
``server.receipt_timeout`` it can be pushed to the user's other
receipts-sessions. The table is bounded; an entry that falls out only loses
the early re-push, never the notification (the store still has it undelivered).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Unconfirmed:
    user_id: str
    framed: bytes
    pushed_at: float
    first_pushed_at: float
    tried: set[str] = field(default_factory=set)


class ReceiptTable:
    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._waiting: dict[str, Unconfirmed] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(self, user_id: str, notification_id: str, framed: bytes, sessions: set[str]) -> None:
        """A notification was written to these receipts-sessions of the user."""
        now = time.monotonic()
        entry = self._waiting.get(notification_id)
        if entry is not None and entry.user_id == user_id:
            entry.tried |= sessions
            entry.pushed_at = now
            return
        if len(self._waiting) >= self.capacity:
            del self._waiting[next(iter(self._waiting))]  # oldest first
        self._waiting[notification_id] = Unconfirmed(user_id, framed, now, now, set(sessions))

    def confirm(self, user_id: str, ids: list[str]) -> tuple[list[str], list[str], list[float]]:
        """Split confirmed ids into those we were waiting for (this user's) and
        the rest; returns (known, unknown, seconds from first push to receipt)."""
        now = time.monotonic()
        known: list[str] = []
        unknown: list[str] = []
        latencies: list[float] = []
        for nid in ids:
            entry = self._waiting.get(nid)
            if entry is None:
                unknown.append(nid)
            elif entry.user_id == user_id:
                del self._waiting[nid]
                known.append(nid)
                latencies.append(now - entry.first_pushed_at)
            # another user's id: ignored, it proves nothing
        return known, unknown, latencies

    def due(self, timeout: float) -> list[tuple[str, Unconfirmed]]:
        """Entries pushed longer than ``timeout`` ago without a receipt."""
        limit = time.monotonic() - timeout
        return [(nid, e) for nid, e in self._waiting.items() if e.pushed_at <= limit]

    def get(self, notification_id: str) -> Unconfirmed | None:
        return self._waiting.get(notification_id)

    def forget(self, notification_id: str) -> None:
        self._waiting.pop(notification_id, None)
