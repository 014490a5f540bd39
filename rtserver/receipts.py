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
from typing import NamedTuple


@dataclass
class Unconfirmed:
    user_id: str
    framed: bytes
    pushed_at: float
    first_pushed_at: float
    tried: set[str] = field(default_factory=set)
    #: The node that sent it, when another one did (a cluster); it writes
    #: the delivery state, so a receipt here is passed on to it.
    origin: str | None = None
    #: The origin waits for a receipt (no session of its own settled it).
    waiting: bool = True


class Confirmed(NamedTuple):
    #: Ids this node sent and was waiting for: delivered now.
    known: list[str]
    #: Ids nobody here waited for (a restart, or confirmed twice).
    unknown: list[str]
    #: Seconds from first push to receipt, of each known or passed on.
    latencies: list[float]
    #: Ids other nodes sent and wait for, by that node.
    elsewhere: dict[str, list[str]]


class ReceiptTable:
    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._waiting: dict[str, Unconfirmed] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(
        self,
        user_id: str,
        notification_id: str,
        framed: bytes,
        sessions: set[str],
        *,
        origin: str | None = None,
        waiting: bool = True,
    ) -> None:
        """A notification was written to these receipts-sessions of the user
        (``origin``: by the node that sent it, see ``Unconfirmed``)."""
        now = time.monotonic()
        entry = self._waiting.get(notification_id)
        if entry is not None and entry.user_id == user_id:
            entry.tried |= sessions
            entry.pushed_at = now
            return
        if len(self._waiting) >= self.capacity:
            del self._waiting[next(iter(self._waiting))]  # oldest first
        self._waiting[notification_id] = Unconfirmed(
            user_id, framed, now, now, set(sessions), origin, waiting
        )

    def confirm(self, user_id: str, ids: list[str]) -> Confirmed:
        """Sort the ids a session of ``user_id`` confirmed (see ``Confirmed``);
        another user's ids are ignored: they prove nothing."""
        now = time.monotonic()
        done = Confirmed([], [], [], {})
        for nid in ids:
            entry = self._waiting.get(nid)
            if entry is None:
                done.unknown.append(nid)
            elif entry.user_id == user_id:
                del self._waiting[nid]
                done.latencies.append(now - entry.first_pushed_at)
                if entry.origin is None:
                    done.known.append(nid)
                elif entry.waiting:
                    done.elsewhere.setdefault(entry.origin, []).append(nid)
        return done

    def due(self, timeout: float) -> list[tuple[str, Unconfirmed]]:
        """Entries pushed longer than ``timeout`` ago without a receipt."""
        limit = time.monotonic() - timeout
        return [(nid, e) for nid, e in self._waiting.items() if e.pushed_at <= limit]

    def get(self, notification_id: str) -> Unconfirmed | None:
        return self._waiting.get(notification_id)

    def forget(self, notification_id: str) -> None:
        self._waiting.pop(notification_id, None)
