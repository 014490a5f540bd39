"""Topics: named channels that sessions subscribe to, with grants, presence,
history and recovery.

A topic is a target sessions are attached to, as a user is; a publication is
stored in the topic's history first, then framed once and written to every
subscriber through ``Delivery`` (and, in a cluster, published once to the
topic's Redis channel, which only nodes with a subscriber listen to).

Recovery: ``subscribe`` with ``last_id`` attaches the subscription first,
then reads the history after ``last_id``. A publication is stored before it is
pushed, so one pushed before the subscription was attached is in what the
read finds, and one pushed after is held on the subscription until the read
is written out; held ones the read found already are dropped. No gap, no
duplicate.

Names: 1-200 characters of ``A-Z a-z 0-9 _ - . : @``. Grants: a token's
``topics`` (may subscribe) and ``publish_topics`` (may publish from the
client), each a list of exact names or prefixes ending in ``*``; the
``rtserver_authorize_topic`` hooks may allow or deny before them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Literal

import msgspec

from rtserver.broker import LocalBroker
from rtserver.config import Config
from rtserver.delivery import Delivery
from rtserver.log import get_logger
from rtserver.metrics import Metrics
from rtserver.protocol import (
    BAD_REQUEST,
    FORBIDDEN,
    TOO_LARGE,
    IdGenerator,
    ProtocolError,
    Publication,
    check_shape,
    encode,
    encode_json,
    ws_text_frame,
)
from rtserver.sessions import Connection
from rtserver.stores.base import MAX_PAGE, Store

log = get_logger("rtserver.topics")

Action = Literal["subscribe", "publish"]
#: ``(connection, topic, action) -> True | False | None`` (the plugin hook).
Authorizer = Callable[[Connection, str, Action], bool | None]

_NAME = re.compile(r"[A-Za-z0-9_\-.:@]{1,200}")
_ID = re.compile(r"[0-9a-f]{24}")


def check_topic(topic: Any) -> str:
    if not isinstance(topic, str) or not _NAME.fullmatch(topic):
        raise ProtocolError(
            BAD_REQUEST, "topic: 1-200 characters of A-Z a-z 0-9 _ - . : @", status=400
        )
    return topic


def granted(patterns: Any, topic: str) -> bool:
    """Whether a grant list (exact names, or prefixes ending in ``*``) covers ``topic``."""
    if not isinstance(patterns, list):
        return False
    for pattern in patterns:
        if isinstance(pattern, str) and (
            pattern == topic or (pattern.endswith("*") and topic.startswith(pattern[:-1]))
        ):
            return True
    return False


class PublishResult(msgspec.Struct, frozen=True):
    id: str
    #: Subscribers on this node that got it.
    delivered: int


class Subscription:
    """One session's subscription to one topic."""

    __slots__ = ("conn", "held", "presence", "topic")

    def __init__(self, conn: Connection, topic: str, presence: bool) -> None:
        self.conn = conn
        self.topic = topic
        #: Sent ``join``/``leave`` of the topic.
        self.presence = presence
        #: While its history is being recovered: live (id, frame) held back.
        self.held: list[tuple[str | None, bytes]] | None = None


class Topics:
    """This node's subscriptions, and publishing, presence and history."""

    def __init__(
        self,
        config: Config,
        store: Store,
        delivery: Delivery,
        broker: LocalBroker,
        metrics: Metrics,
        new_id: IdGenerator,
        spawn: Callable[[Coroutine[Any, Any, Any]], Any],
    ) -> None:
        self.config = config
        self.store = store
        self.delivery = delivery
        self.broker = broker
        self.metrics = metrics
        self.new_id = new_id
        self.spawn = spawn
        #: topic -> session id -> subscription
        self._subscribers: dict[str, dict[str, Subscription]] = {}
        #: The ``rtserver_authorize_topic`` hooks, in order.
        self.authorizers: Sequence[Authorizer] = ()
        #: Subscriptions in all (a gauge).
        self.count = 0
        #: topic -> how many of its subscriptions here asked for join/leave.
        self._watching: dict[str, int] = {}

    # -- grants -----------------------------------------------------------

    def authorize(self, conn: Connection, topic: str, action: Action) -> None:
        """Any hook's False denies, else any hook's True allows; else the
        token's grants (admins may subscribe and publish anywhere)."""
        verdicts = [hook(conn, topic, action) for hook in self.authorizers]
        if False in verdicts:
            raise ProtocolError(FORBIDDEN, f"not allowed to {action} to {topic}", status=403)
        if True in verdicts or conn.role == "admin":
            return
        claim = "topics" if action == "subscribe" else "publish_topics"
        if not granted(conn.claims.get(claim), topic):
            raise ProtocolError(
                FORBIDDEN, f"the token does not grant {action} on {topic} ({claim})", status=403
            )

    # -- subscribing ------------------------------------------------------

    async def subscribe(
        self, conn: Connection, topic: str, *, last_id: str | None = None, presence: bool = False
    ) -> dict[str, Any]:
        """Attach ``conn`` to ``topic``; with ``last_id``, push what came
        after it (once the ack is written) and say whether that is all."""
        check_topic(topic)
        self.authorize(conn, topic, "subscribe")
        subs = conn.topics
        if topic in subs:
            raise ProtocolError(BAD_REQUEST, f"already subscribed to {topic}")
        if len(subs) >= self.config.limits.max_subscriptions_per_connection:
            raise ProtocolError(
                BAD_REQUEST,
                "too many subscriptions on this connection"
                f" (limits.max_subscriptions_per_connection={self.config.limits.max_subscriptions_per_connection})",
            )
        recovered: bool | None = None
        if last_id is not None:
            recovered = await self._covers(topic, last_id)
            if conn.closed or topic in conn.topics:
                raise ProtocolError(BAD_REQUEST, f"already subscribed to {topic}")
        sub = Subscription(conn, topic, presence)
        if last_id is not None:
            sub.held = []
        first = topic not in self._subscribers
        self._subscribers.setdefault(topic, {})[conn.session_id] = sub
        subs[topic] = sub
        self.count += 1
        if presence:
            self._watching[topic] = self._watching.get(topic, 0) + 1
        self.broker.topic_joined(conn, topic, first=first)
        self._presence_event("join", conn, topic)
        if last_id is not None:

            def recover() -> None:
                self.spawn(self._recover(sub, last_id))

            if conn.in_dispatch:
                conn.after_reply(recover)
            else:
                recover()
        # An id from the moment of attaching: as last_id later (say after a
        # reconnect), it brings back everything published since.
        ack: dict[str, Any] = {"topic": topic, "position": self.new_id()}
        if recovered is not None:
            ack["recovered"] = recovered
        return ack

    async def _covers(self, topic: str, last_id: str) -> bool:
        """Whether the history still holds everything after ``last_id``."""
        if not isinstance(last_id, str) or not _ID.fullmatch(last_id):
            raise ProtocolError(BAD_REQUEST, "last_id: not a publication id")
        made = IdGenerator.created_at(last_id)
        if made <= time.time() - self.config.topics.history_ttl:
            return False  # what came just after it may have expired
        trimmed = await self.store.trimmed(topic)
        return trimmed is None or last_id >= trimmed

    async def _recover(self, sub: Subscription, after: str) -> None:
        conn, sent = sub.conn, set()
        try:
            cursor: str | None = after
            for _ in range(max(1, self.config.topics.history_size // MAX_PAGE + 1)):
                page = await self.store.publications(
                    sub.topic, after=cursor, limit=MAX_PAGE, now=time.time()
                )
                for p in page:
                    if conn.topics.get(sub.topic) is not sub:
                        return  # unsubscribed meanwhile
                    self.delivery.to_connection_framed(
                        conn, ws_text_frame(p.wire_json()), "publication"
                    )
                    sent.add(p.id)
                if len(page) < MAX_PAGE:
                    break
                cursor = page[-1].id
        except Exception as err:  # the store failed: what is held still goes out
            log.warning("topic.recovery_failed", topic=sub.topic, error=str(err))
        finally:
            held, sub.held = sub.held or [], None
            for pid, framed in held:
                if pid is None or pid not in sent:
                    conn.push(framed)

    def unsubscribe(self, conn: Connection, topic: str) -> bool:
        sub = conn.topics.pop(topic, None)
        if sub is None:
            return False
        self.count -= 1
        if sub.presence:
            left = self._watching[topic] - 1
            if left:
                self._watching[topic] = left
            else:
                del self._watching[topic]
        subs = self._subscribers.get(topic)
        if subs is not None:
            subs.pop(conn.session_id, None)
            if not subs:
                del self._subscribers[topic]
        self.broker.topic_left(conn, topic, last=topic not in self._subscribers)
        self._presence_event("leave", conn, topic)
        return True

    def connection_gone(self, conn: Connection) -> None:
        for topic in list(conn.topics):
            self.unsubscribe(conn, topic)

    # -- publishing -------------------------------------------------------

    def encode_data(self, data: Any) -> bytes:
        """The publication's data, encoded and checked against the limits."""
        limits = self.config.limits
        try:
            raw = encode_json(data)
        except (TypeError, ValueError) as err:
            raise ProtocolError(BAD_REQUEST, f"data: not JSON: {err}") from None
        if len(raw) > limits.max_notification_bytes:
            raise ProtocolError(
                TOO_LARGE,
                f"data: over limits.max_notification_bytes ({limits.max_notification_bytes})",
                status=413,
            )
        check_shape(data, max_depth=limits.max_depth, max_fields=limits.max_fields, where="data")
        return raw

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        publisher: str | None = None,
        publication_id: str | None = None,
    ) -> PublishResult:
        """Store, then push to every subscriber (on every node). Raises
        ``ProtocolError`` for a bad name or data, ``StoreError`` when it could
        not be stored (then nobody got it)."""
        check_topic(topic)
        raw = self.encode_data(data)
        pid = publication_id or self.new_id()
        created = IdGenerator.created_at(pid)
        publication = Publication(
            topic=topic,
            id=pid,
            data=raw,
            created_at=created,
            expires_at=created + self.config.topics.history_ttl,
            publisher=publisher,
        )
        await self.store.insert_publication(publication, self.config.topics.history_size)
        framed = ws_text_frame(publication.wire_json())
        delivered = self.deliver(topic, pid, framed)
        self.broker.publish_topic(topic, framed, pid)
        self.metrics.publications.inc()
        return PublishResult(pid, delivered)

    def deliver(
        self,
        topic: str,
        pid: str | None,
        framed: bytes,
        *,
        presence: bool = False,
        exclude: Connection | None = None,
    ) -> int:
        """A frame to this node's subscribers of ``topic`` (``presence``: only
        to those that asked for join/leave, but ``exclude``, whom it is
        about); held while one recovers."""
        subs = self._subscribers.get(topic)
        if not subs:
            return 0
        live = []
        for sub in subs.values():
            if presence and (not sub.presence or sub.conn is exclude):
                continue
            if sub.held is not None:
                sub.held.append((pid, framed))
            else:
                live.append(sub.conn)
        held = len(subs) - len(live) if not presence else 0
        return held + self.delivery.to_connections(
            live, framed, "presence" if presence else "publication"
        )

    def _presence_event(self, kind: str, conn: Connection, topic: str) -> None:
        if topic not in self._watching and not self.broker.enabled:
            return  # nobody here asked for join/leave, and there are no other nodes
        framed = ws_text_frame(
            encode(kind, {"topic": topic, "user_id": conn.user_id, "session_id": conn.session_id})
        )
        self.deliver(topic, None, framed, presence=True, exclude=conn)
        self.broker.publish_topic(topic, framed, None, presence=True)

    # -- presence and history ---------------------------------------------

    async def presence(self, topic: str) -> dict[str, Any]:
        """Who is subscribed to ``topic`` on every node: users with their
        session ids (``partial``: other nodes could not be read)."""
        check_topic(topic)
        members = [
            (s.conn.user_id or "", s.conn.session_id)
            for s in self._subscribers.get(topic, {}).values()
        ]
        others, partial = await self.broker.topic_members(topic)
        members += others
        users: dict[str, list[str]] = {}
        for user_id, session_id in members:
            users.setdefault(user_id, []).append(session_id)
        out: dict[str, Any] = {
            "topic": topic,
            "users": [{"user_id": u, "sessions": sorted(s)} for u, s in sorted(users.items())],
            "count": len(users),
        }
        if partial:
            out["partial"] = True
        return out

    async def history(
        self, topic: str, *, after: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The topic's kept publications after ``after``, oldest first."""
        check_topic(topic)
        page = await self.store.publications(
            topic, after=after, limit=min(limit, MAX_PAGE), now=time.time()
        )
        return [p.to_wire() for p in page]
