"""A Python client for rtserver's WebSocket protocol (services, scripts, tests).

    client = await Client.connect("ws://127.0.0.1:8888/ws")
    await client.register(token)
    note = await client.next("notification")
    await client.mark_read([note["id"]])
    await client.close()

Requests are matched to their ack by id and raise ``ClientError`` on an error
reply; pushes (frames without an id) queue up for ``next``. By default the
client registers with delivery receipts: it confirms every notification it
receives (batched) and drops duplicates (the same id pushed again), so a
notification counts as delivered only once it really arrived here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from typing import Any

from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect


class ClientError(Exception):
    """The server answered a request with an error frame."""

    def __init__(self, code: str, message: str, data: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class Client:
    def __init__(self, ws: WebSocketClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.user_id: str | None = None
        self.session_id: str | None = None
        self.receipts = False
        #: Automatic receipts can be paused (tests of at-least-once delivery).
        self.auto_confirm = True
        self._seen: dict[str, None] = {}
        #: Subscribed topics and the last publication id seen on each, to
        #: resume from (``resubscribe``).
        self.topics: dict[str, str | None] = {}
        self._to_confirm: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(
        cls, url: str, *, headers: dict[str, str] | None = None, timeout: float = 10.0
    ) -> Client:
        request = HTTPRequest(
            url, headers=headers or {}, connect_timeout=timeout, request_timeout=timeout
        )
        ws = await websocket_connect(request, max_message_size=64 * 1024 * 1024)
        return cls(ws)

    async def _read(self) -> None:
        while True:
            msg = await self.ws.read_message()
            if msg is None:
                break
            frame = json.loads(msg)
            fut = self._waiting.pop(frame.get("id"), None) if "id" in frame else None
            if fut is not None and not fut.done():
                fut.set_result(frame)
            elif frame.get("event") == "notification" and self.receipts:
                self._on_notification(frame)
            elif frame.get("event") == "publication":
                self._on_publication(frame)
            else:
                self._pushes.put_nowait(frame)
        self.close_code = self.ws.close_code
        self.close_reason = self.ws.close_reason
        self.closed.set()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed"))
        self._waiting.clear()

    def _on_notification(self, frame: dict[str, Any]) -> None:
        nid = frame.get("data", {}).get("id")
        if nid is None or frame["data"].get("broadcast"):
            self._pushes.put_nowait(frame)
            return
        if self.auto_confirm:
            if not self._to_confirm:
                asyncio.get_running_loop().call_soon(self._confirm_soon)
            self._to_confirm.append(nid)
        if nid in self._seen:
            return  # a duplicate (at-least-once): already handed over
        self._seen[nid] = None
        if len(self._seen) > 10_000:
            del self._seen[next(iter(self._seen))]
        self._pushes.put_nowait(frame)

    def _on_publication(self, frame: dict[str, Any]) -> None:
        data = frame.get("data", {})
        topic, pid = data.get("topic"), data.get("id")
        if topic in self.topics:
            last = self.topics[topic]
            if last is not None and pid is not None and pid <= last:
                return  # had it already
            self.topics[topic] = pid
        self._pushes.put_nowait(frame)

    def _confirm_soon(self) -> None:
        ids, self._to_confirm = self._to_confirm, []
        if ids and not self.closed.is_set():
            with contextlib.suppress(Exception):
                sent = self.ws.write_message(
                    json.dumps({"event": "received", "data": {"ids": ids}})
                )
                # A closed socket only means the server offers them again later.
                sent.add_done_callback(lambda f: f.exception())

    async def confirm(self, ids: list[str]) -> None:
        """Send a receipt by hand (when ``auto_confirm`` is off)."""
        await self.send("received", {"ids": ids})

    async def send_raw(self, text: str | bytes, binary: bool = False) -> None:
        await self.ws.write_message(text, binary=binary)

    async def send(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send a frame without an id (no reply expected unless it is bad)."""
        await self.send_raw(json.dumps({"event": event, "data": data or {}}))

    async def request(
        self, event: str, data: dict[str, Any] | None = None, *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Send a frame with a fresh id and return the ack's data."""
        frame_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[frame_id] = fut
        await self.send_raw(json.dumps({"event": event, "data": data or {}, "id": frame_id}))
        try:
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(frame_id, None)
        if reply["event"] == "error":
            err = reply["data"]
            raise ClientError(err["code"], err["message"], err)
        result: dict[str, Any] = reply["data"]
        return result

    async def register(
        self, token: str, last_id: str | None = None, *, receipts: bool = True
    ) -> dict[str, Any]:
        data: dict[str, Any] = {"token": token}
        if last_id is not None:
            data["last_id"] = last_id
        if receipts:
            data["receipts"] = True
        self.receipts = receipts
        ack = await self.request("register", data)
        self.user_id, self.session_id = ack["user_id"], ack["session_id"]
        return ack

    async def mark_read(self, ids: list[str] | None = None) -> dict[str, Any]:
        return await self.request("mark_read", {"all": True} if ids is None else {"ids": ids})

    async def get_notifications(self, **options: Any) -> list[dict[str, Any]]:
        ack = await self.request("get_notifications", options)
        notes: list[dict[str, Any]] = ack["notifications"]
        return notes

    async def subscribe(
        self, topic: str, *, last_id: str | None = None, presence: bool = False
    ) -> dict[str, Any]:
        """Subscribe; with ``last_id``, what came after it is pushed first (the
        ack's ``recovered`` says whether that is all of it)."""
        data: dict[str, Any] = {"topic": topic}
        if last_id is not None:
            data["last_id"] = last_id
        if presence:
            data["presence"] = True
        self.topics[topic] = last_id
        try:
            ack = await self.request("subscribe", data)
        except BaseException:
            self.topics.pop(topic, None)
            raise
        if self.topics.get(topic) is None:
            self.topics[topic] = ack["position"]  # nothing seen yet: resume from here
        return ack

    async def resubscribe(self, topics: dict[str, str | None]) -> dict[str, dict[str, Any]]:
        """On a new connection, subscribe again to another client's ``topics``
        (topic -> last id seen), missing nothing in between."""
        return {t: await self.subscribe(t, last_id=last) for t, last in topics.items()}

    async def unsubscribe(self, topic: str) -> dict[str, Any]:
        self.topics.pop(topic, None)
        return await self.request("unsubscribe", {"topic": topic})

    async def publish(self, topic: str, data: Any) -> str:
        """Publish to a topic (the token must grant it: ``publish_topics``); its id."""
        ack = await self.request("publish", {"topic": topic, "data": data})
        return str(ack["id"])

    async def presence(self, topic: str) -> dict[str, Any]:
        return await self.request("presence", {"topic": topic})

    async def next(self, event: str | None = None, *, timeout: float = 5.0) -> dict[str, Any]:
        """The next push (of ``event``, skipping others); returns the whole frame
        ``{"event", "data"}`` when ``event`` is None, else its data."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no {event or 'push'} within {timeout}s")
            frame = await asyncio.wait_for(self._pushes.get(), remaining)
            if event is None:
                return frame
            if frame.get("event") == event:
                data: dict[str, Any] = frame.get("data", {})
                return data

    def pending(self) -> list[dict[str, Any]]:
        """Pushes received and not yet taken, without waiting."""
        out = []
        while not self._pushes.empty():
            out.append(self._pushes.get_nowait())
        return out

    async def close(self) -> None:
        was_open = not self.closed.is_set()
        self.ws.close()  # also after the server closed: releases the protocol
        if was_open:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), 5)
        if not self._reader.done():
            self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
