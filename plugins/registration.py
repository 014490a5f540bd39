"""``register``: authenticate a connection as a user's session.

``{"token": JWT, "last_id": ID?}`` -> ack ``{"user_id", "session_id",
"unread_count"}``, then offline delivery (see ``Hub.register_user_session``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from rtserver.config import Config
from rtserver.log import get_logger
from rtserver.plugins import EventContext, EventHandler, hookimpl
from rtserver.protocol import ALREADY_REGISTERED, ProtocolError

log = get_logger("rtserver.registration")


class Register(msgspec.Struct, forbid_unknown_fields=True):
    token: str
    last_id: str | None = None


async def register(ctx: EventContext, data: Register) -> dict[str, Any]:
    conn = ctx.connection
    if conn.registered:
        raise ProtocolError(ALREADY_REGISTERED, "this connection is registered already")
    try:
        claims = ctx.hub.auth.verify(data.token)
    except ProtocolError as err:
        log.info("session.refused", reason=err.message)
        raise
    conn.role = claims.role
    conn.claims = claims.raw
    conn.expires_at = claims.exp
    unread = await ctx.hub.register_user_session(claims.sub, conn, last_id=data.last_id)
    log.info("session.registered", user_id=claims.sub, role=claims.role, resume=data.last_id)
    return {"user_id": claims.sub, "session_id": conn.session_id, "unread_count": unread}


@hookimpl
def rtserver_events(config: Config) -> list[EventHandler]:
    return [EventHandler("register", register, Register, requires_registration=False)]
