"""The demo inbox at ``/demo`` and the development token route.

Only routed where ``server.test_routes`` is true (never in production):
``GET /demo`` (a page built on ``/static/rtclient.js``) and
``POST /api/test/token`` ``{"user_id", "role"?, "ttl"?, "topics"?, "publish_topics"?}``
-> ``{"token"}``, which mints
a token with the configured secret so the page can pick any user.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

import rtserver
from rtserver.config import Config, Role
from rtserver.plugins import Route, hookimpl
from rtserver.web import APIHandler, StaticHandler

DEMO_DIR = Path(rtserver.__file__).resolve().parent / "static" / "demo"


class TokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    user_id: str
    role: Role = "user"
    #: Seconds; default ``auth.token_ttl``. Short ones let a page try refresh.
    ttl: float | None = None
    #: Topic grants (see docs/protocol.md, Topics).
    topics: list[str] = []
    publish_topics: list[str] = []


class TokenHandler(APIHandler):
    """``POST /api/test/token``: a token for any user (development only)."""

    def post(self) -> None:
        self.rate_limit_by_address()
        req = self.body(TokenRequest)
        token = self.hub.auth.mint(
            req.user_id,
            req.role,
            req.ttl,
            topics=req.topics,
            publish_topics=req.publish_topics,
        )
        self.send({"token": token})


class DemoPage(StaticHandler):
    """The demo's files (``/demo/demo.js``, ``/demo/demo.css``)."""


class DemoIndex(DemoPage):
    """``/demo`` itself: index.html, served in place (a redirect to ``/demo/``
    would drop the query string the page reads)."""

    async def get(self, path: str = "", include_body: bool = True) -> None:
        await super().get("index.html", include_body)


@hookimpl
def rtserver_routes(config: Config) -> list[Route]:
    if not config.server.test_routes:
        return []
    files = {"path": str(DEMO_DIR)}
    return [
        Route(r"/api/test/token", TokenHandler),
        Route(r"/demo/?", DemoIndex, files),
        Route(r"/demo/(.+)", DemoPage, files),
    ]
