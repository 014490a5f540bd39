"""The baseline: stock Tornado code, as a team would write it without rtserver.
Each broadcast calls ``write_message(json.dumps(...))`` per client.

    python -m bench.stock PORT
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer

CLIENTS: set[StockSocket] = set()


class StockSocket(tornado.websocket.WebSocketHandler):
    def open(self) -> None:
        CLIENTS.add(self)

    def on_message(self, message: str | bytes) -> None:
        frame = json.loads(message)
        if frame.get("event") == "register":
            self.write_message(json.dumps({"event": "ack", "id": frame.get("id"), "data": {}}))

    def on_close(self) -> None:
        CLIENTS.discard(self)


class BroadcastLoad(tornado.web.RequestHandler):
    async def post(self) -> None:
        req = json.loads(self.request.body)
        note = {
            "event": "notification",
            "data": {"message": "x" * max(1, req.get("size", 150) - 60)},
        }
        t0 = time.perf_counter()
        for _ in range(req["count"]):
            for client in list(CLIENTS):
                client.write_message(json.dumps(note))
            await asyncio.sleep(0)
        self.write({"seconds": time.perf_counter() - t0})


async def main(port: int) -> None:
    app = tornado.web.Application([(r"/ws", StockSocket), (r"/bench/broadcast", BroadcastLoad)])
    HTTPServer(app).listen(port, "127.0.0.1", backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
