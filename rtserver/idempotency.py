"""``Idempotency-Key``: a request repeated with the same key gets the first
answer, without sending again.

A key (1-200 printable ASCII characters, scoped to the token's subject) is
claimed in the store before the request runs, with the notification ids the
request will use, and finished with its answer. So, across restarts and the
nodes sharing a store:

- a repeat of a finished request gets its answer (status and body) again;
- a repeat with another body gets 422 ``idempotency_mismatch``;
- a repeat while the first still runs gets 409 ``idempotency_in_progress``
  (``Retry-After: 1``); on this node it simply waits for the first's answer;
- a run that failed (5xx) leaves the key to the next retry at once, and a run
  that never finished (its server died) to the first retry after
  ``server.idempotency_lease``. Either way the retry runs with the same ids:
  a store keeps an id once, and clients drop a push they saw already.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import msgspec

from rtserver.log import get_logger
from rtserver.metrics import Metrics
from rtserver.protocol import BAD_REQUEST, ProtocolError, decode_json
from rtserver.stores.base import Store, StoreError
from rtserver.stores.keys import Claim, KeyRecord

IDEMPOTENCY_MISMATCH: Final = "idempotency_mismatch"
IDEMPOTENCY_IN_PROGRESS: Final = "idempotency_in_progress"

log = get_logger("rtserver")
_KEY = re.compile(r"[\x20-\x7e]{1,200}")
_canonical = msgspec.json.Encoder(order="sorted").encode


class Answer(msgspec.Struct, frozen=True):
    """An HTTP answer as kept for a key: status and JSON body."""

    status: int
    body: bytes
    #: True when it is an earlier request's answer, given again.
    replayed: bool = False


def check_key(key: str) -> str:
    """The header's value, or ``bad_request``."""
    if not _KEY.fullmatch(key):
        raise ProtocolError(
            BAD_REQUEST, "Idempotency-Key: 1 to 200 printable ASCII characters", status=400
        )
    return key


def fingerprint(*parts: object) -> str:
    """A digest of the request a key belongs to (route and JSON content, key
    order and spacing aside)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(_canonical(part))
        h.update(b"\x00")
    return h.hexdigest()


def body_fingerprint(method: str, path: str, body: bytes) -> str:
    try:
        content: object = decode_json(body) if body else None
    except ProtocolError:
        content = body.decode("latin-1")
    return fingerprint(method, path, content)


class Keys:
    """Claims, answers and replays for idempotency keys, kept in the store."""

    def __init__(self, store: Store, metrics: Metrics, *, ttl: float, lease: float) -> None:
        self.store = store
        self.metrics = metrics
        self.ttl = ttl
        self.lease = lease
        #: Keys whose run is going on in this process: a repeat waits for it.
        self._running: dict[str, asyncio.Future[None]] = {}

    @staticmethod
    def scoped(subject: str, key: str) -> str:
        return f"{len(subject)}:{subject}:{key}"

    async def claim(
        self, keys: Sequence[str], fingerprints: Sequence[str], ids: Sequence[Sequence[str]]
    ) -> list[Claim]:
        """Claim ``keys`` (scoped already), each with the ids its run will use
        if it is new; waits first for runs of the same keys in this process."""
        while True:
            waiting = [self._running[k] for k in keys if k in self._running]
            if not waiting:
                break
            await asyncio.gather(*(asyncio.shield(w) for w in waiting), return_exceptions=True)
        # Marked running before the store is asked, so a repeat arriving
        # meanwhile waits here instead of finding an unfinished claim.
        loop = asyncio.get_running_loop()
        for k in keys:
            self._running[k] = loop.create_future()
        now = time.time()
        records = [
            KeyRecord(key=k, fingerprint=f, ids=list(i), claimed_at=now, expires_at=now + self.ttl)
            for k, f, i in zip(keys, fingerprints, ids, strict=True)
        ]
        try:
            claims = await self.store.claim_keys(records, now, self.lease)
        except BaseException:
            self._done(keys)
            raise
        self._done([c.record.key for c in claims if c.state == "held"])
        return claims

    def _done(self, keys: Sequence[str]) -> None:
        for key in keys:
            waiter = self._running.pop(key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    @staticmethod
    def refusal(claim: Claim, fingerprint: str) -> ProtocolError | None:
        """Why a held key's request cannot be answered from it (another
        request's key, or still running), or None: replay its answer."""
        record = claim.record
        if record.fingerprint != fingerprint:
            return ProtocolError(
                IDEMPOTENCY_MISMATCH,
                "Idempotency-Key: already used for a different request",
                status=422,
            )
        if record.status == 0:
            return ProtocolError(
                IDEMPOTENCY_IN_PROGRESS,
                "Idempotency-Key: a request with this key is still running; retry shortly",
                status=409,
                extra={"retry_after": 1},
            )
        return None

    def replay(self, claim: Claim) -> Answer:
        self.metrics.idempotent_replays.inc()
        return Answer(claim.record.status, claim.record.body, replayed=True)

    async def settle(self, answers: Sequence[tuple[str, Answer | None]]) -> None:
        """Keep each key's answer, or (None, or a 5xx) release it for a retry."""
        keep = [(k, a.status, a.body) for k, a in answers if a is not None and a.status < 500]
        release = [k for k, a in answers if a is None or a.status >= 500]
        try:
            if keep:
                await self.store.finish_keys(keep)
            if release:
                await self.store.release_keys(release)
        except StoreError as err:
            # The keys stay claimed and unfinished: a retry after the lease
            # runs again with the same ids, so nothing is sent twice.
            log.warning("idempotency.settle_failed", keys=len(answers), error=str(err))
        finally:
            self._done([key for key, _ in answers])

    async def run(
        self,
        key: str,
        fp: str,
        new_ids: Sequence[str],
        call: Callable[[Sequence[str]], Awaitable[Answer]],
    ) -> Answer:
        """Run ``call(ids)`` once for ``key``, or give the answer it gave."""
        (claim,) = await self.claim([key], [fp], [new_ids])
        if claim.state == "held":
            refusal = self.refusal(claim, fp)
            if refusal is not None:
                raise refusal
            return self.replay(claim)
        answer: Answer | None = None
        try:
            answer = await call(claim.record.ids)
        except ProtocolError as err:
            if err.status < 500:
                answer = Answer(err.status, msgspec.json.encode({"error": err.as_data()}))
            raise
        finally:
            await self.settle([(key, answer)])
        return answer
