"""Sending from the app's backend (a Flask or Django view, a Celery worker):
rtserver's HTTP API behind the names of the module rtserver replaces.

    from rtserver.publisher import Publisher

    rt = Publisher("http://127.0.0.1:8888", token)  # a publisher (or admin) token
    result = rt.send_notification("user123", {"message": "Case updated"})
    rt.send_direct_message(session_id, {"message": "Restarting in 5 min"})
    rt.mark_read("user123", "all")

Every write carries an ``Idempotency-Key`` made for that call and kept across
its retries, so a call retried after a timeout or a restart is stored once.
Connection errors, timeouts, 502/503/504 and 429 (after its ``Retry-After``)
are retried with exponential backoff and full jitter, ``retries`` times; then,
or at once for any other 4xx, ``PublishError`` says what the server said.

``Publisher`` is blocking and safe to share between threads (each thread keeps
its own connection alive); ``AsyncPublisher`` has the same methods, awaitable,
for asyncio code. Only the standard library is needed.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from rtserver.backoff import full_jitter

#: Statuses worth trying again: the server (or one in front of it) could not
#: answer now.
RETRY_STATUSES = frozenset({429, 502, 503, 504})


class PublishError(Exception):
    """The server refused the call, or could not be reached after every retry.

    ``status`` is the HTTP status (0: never reached), ``code`` and ``message``
    the server's error (see docs/protocol.md), ``body`` the whole answer,
    ``retry_after`` the seconds the server asked to wait (429, 503)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.retry_after = retry_after
        #: ``send_notifications``: per item, its result, or None if not stored.
        self.results: list[dict[str, Any] | None] | None = None


class Publisher:
    """rtserver's HTTP API for one server (or a load balancer in front of a
    cluster), blocking. ``timeout``: seconds per attempt; ``retries``: attempts
    after the first; ``backoff``: the first retry's ceiling (doubling, at most
    ``backoff_max``); ``max_batch``: items per batch request (the server's
    ``limits.max_batch``); ``parallel``: batch requests at a time."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 5.0,
        retries: int = 5,
        backoff: float = 0.2,
        backoff_max: float = 5.0,
        max_batch: int = 1000,
        parallel: int = 8,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url}: an http:// or https:// URL of the server")
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.max_batch = max_batch
        self.parallel = parallel
        self._executor: ThreadPoolExecutor | None = None
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        self._local = threading.local()
        #: Every thread's connection, to close them all at the end.
        self._conns: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()

    # -- the API ----------------------------------------------------------

    def send_notification(self, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Store and push: ``{"notification": {...}, "delivered": N}``."""
        return self._call("POST", f"/api/notifications/{_seg(user_id)}", payload)  # type: ignore[no-any-return]

    def send_notifications(
        self, items: Iterable[tuple[str, dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """Many at once: one ``{"id", "delivered"}`` per item, in order. They
        go ``max_batch`` a request, up to ``parallel`` requests at a time. A
        batch the store refused part of is retried (stored once); when one
        still fails, ``PublishError`` is raised once the others are done, with
        ``results``: per item, its result or None where it was not stored."""
        pending = [{"user_id": u, "notification": n} for u, n in items]
        chunks = [
            pending[start : start + self.max_batch]
            for start in range(0, len(pending), self.max_batch)
        ]
        if len(chunks) <= 1:
            return [r for chunk in chunks for r in self._batch(chunk)]
        outcomes = list(self._pool().map(self._try_batch, chunks))
        results: list[dict[str, Any] | None] = []
        failed: PublishError | None = None
        for chunk, outcome in zip(chunks, outcomes, strict=True):
            if isinstance(outcome, PublishError):
                failed = failed or outcome
                results += [None] * len(chunk)
            else:
                results += outcome
        if failed is not None:
            failed.results = results
            raise failed
        return results  # type: ignore[return-value]

    def _batch(self, chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self._call("POST", "/api/notifications", chunk)["results"]  # type: ignore[no-any-return]

    def _try_batch(self, chunk: list[dict[str, Any]]) -> list[dict[str, Any]] | PublishError:
        try:
            return self._batch(chunk)
        except PublishError as err:
            return err

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self.parallel, thread_name_prefix="rtserver-batch"
                )
            return self._executor

    def send_direct_message(self, session_id: str, payload: dict[str, Any]) -> int:
        """To one session, on whichever node holds it: 1; ``PublishError`` 404
        when no node has it."""
        return int(
            self._call("POST", f"/api/sessions/{_seg(session_id)}/messages", payload)["delivered"]
        )

    def send_broadcast_notification(self, payload: dict[str, Any]) -> int:
        """To every session (an admin token); how many this node reached."""
        return int(self._call("POST", "/api/broadcast", payload)["delivered"])

    def get_notifications_for_user(
        self, user_id: str, unread_only: bool = False, limit: int = 50
    ) -> list[dict[str, Any]]:
        """History, newest first."""
        query = f"?unread_only={'true' if unread_only else 'false'}&limit={int(limit)}"
        body = self._call("GET", f"/api/users/{_seg(user_id)}/notifications{query}")
        return body["notifications"]  # type: ignore[no-any-return]

    def unread_count(self, user_id: str) -> int:
        return int(self._call("GET", f"/api/users/{_seg(user_id)}/unread_count")["unread_count"])

    def mark_read(self, user_id: str, ids: Sequence[str] | Literal["all"]) -> dict[str, Any]:
        """``{"updated", "unread_count"}``; the user's live sessions are told."""
        body = {"all": True} if ids == "all" else {"ids": list(ids)}
        return self._call("POST", f"/api/users/{_seg(user_id)}/notifications/read", body)  # type: ignore[no-any-return]

    def publish(self, topic: str, data: Any) -> dict[str, Any]:
        """To a topic's subscribers: ``{"id", "delivered"}``."""
        return self._call("POST", f"/api/topics/{_seg(topic)}/publications", data)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close every thread's connection (when done with the publisher; a
        call made after opens a new one)."""
        with self._lock:
            conns, self._conns = self._conns, set()
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown()
        for conn in conns:
            conn.close()

    def _drop(self) -> None:
        """Close this thread's connection (after an error: the next try opens one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._lock:
                self._conns.discard(conn)

    # -- the transport ----------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None or conn not in self._conns:  # none yet, or closed by close()
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
            with self._lock:
                self._conns.add(conn)
        return conn

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = dict(self._headers)
        if method != "GET":
            # One key for the call, the same on every retry: stored once.
            headers["Idempotency-Key"] = secrets.token_urlsafe(18)
        data = None if body is None else json.dumps(body).encode()
        last: PublishError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt - 1, last))
            try:
                status, answer, retry_after = self._send(method, self._prefix + path, data, headers)
            except (OSError, http.client.HTTPException) as err:
                self._drop()  # a new connection for the next try
                last = PublishError(0, "unreachable", f"{type(err).__name__}: {err}")
                continue
            if status < 300:
                return answer
            error = (answer or {}).get("error", {}) if isinstance(answer, dict) else {}
            last = PublishError(
                status,
                error.get("code", "http_error"),
                error.get("message", f"HTTP {status}"),
                answer,
                retry_after,
            )
            if status not in RETRY_STATUSES:
                raise last
        assert last is not None
        raise last

    def _delay(self, attempt: int, last: PublishError | None) -> float:
        delay = full_jitter(attempt, self.backoff, self.backoff_max)
        hint = None if last is None else last.retry_after
        return delay if hint is None else max(delay, hint)

    def _send(
        self, method: str, path: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, Any, float | None]:
        conn = self._connection()
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self._drop()
        retry_after = resp.getheader("Retry-After")
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = {
                "error": {"code": "http_error", "message": raw[:200].decode(errors="replace")}
            }
        return resp.status, answer, _seconds(retry_after)


class AsyncPublisher:
    """``Publisher``'s methods, awaitable: each runs on a small thread pool
    (connections kept alive per thread), so an asyncio app never blocks."""

    def __init__(self, url: str, token: str, *, threads: int = 4, **options: Any) -> None:
        self._sync = Publisher(url, token, **options)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rtserver-pub")

    async def _run(self, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: getattr(self._sync, method)(*args))

    async def send_notification(self, user_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._run("send_notification", user_id, payload)  # type: ignore[no-any-return]

    async def send_notifications(
        self, items: Iterable[tuple[str, dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        return await self._run("send_notifications", list(items))  # type: ignore[no-any-return]

    async def send_direct_message(self, session_id: str, payload: dict[str, Any]) -> int:
        return await self._run("send_direct_message", session_id, payload)  # type: ignore[no-any-return]

    async def send_broadcast_notification(self, payload: dict[str, Any]) -> int:
        return await self._run("send_broadcast_notification", payload)  # type: ignore[no-any-return]

    async def get_notifications_for_user(
        self, user_id: str, unread_only: bool = False, limit: int = 50
    ) -> list[dict[str, Any]]:
        return await self._run("get_notifications_for_user", user_id, unread_only, limit)  # type: ignore[no-any-return]

    async def unread_count(self, user_id: str) -> int:
        return await self._run("unread_count", user_id)  # type: ignore[no-any-return]

    async def mark_read(self, user_id: str, ids: Sequence[str] | Literal["all"]) -> dict[str, Any]:
        return await self._run("mark_read", user_id, ids)  # type: ignore[no-any-return]

    async def publish(self, topic: str, data: Any) -> dict[str, Any]:
        return await self._run("publish", topic, data)  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Finish the calls under way, then close the connections."""
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)
        self._sync.close()


def _seg(value: str) -> str:
    """One path segment, escaped."""
    return quote(str(value), safe="")


def _seconds(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        return None
