"""``register`` and ``refresh``: authenticate a connection as a user's session
and keep its token valid.

``register`` ``{"token": JWT, "last_id": ID?}`` -> ack ``{"user_id",
"session_id", "unread_count", "expires_at"}``, then offline delivery (see
``Hub.register_user_session``). A user may hold at most
``limits.max_connections_per_user`` sessions and register at most
``limits.registers_per_minute`` times a minute.

Token expiry is enforced on open connections: ``auth.expiry_warning`` seconds
before the token expires the session gets a ``token_expiring`` push
``{"expires_at", "seconds"}``; ``refresh`` ``{"token": JWT}`` (same subject)
extends it; otherwise the session is closed with 1008 at expiry.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from rtserver.auth import Claims
from rtserver.config import Config
from rtserver.hub import Hub
from rtserver.log import get_logger
from rtserver.plugins import EventContext, EventHandler, hookimpl
from rtserver.protocol import ALREADY_REGISTERED, FORBIDDEN, ProtocolError, iso_utc
from rtserver.sessions import Connection

log = get_logger("rtserver.registration")

TIMERS = "registration.timers"


class Register(msgspec.Struct, forbid_unknown_fields=True):
    token: str
    last_id: str | None = None
    #: Confirm what is received with "received" frames (delivery receipts).
    receipts: bool = False


class Refresh(msgspec.Struct, forbid_unknown_fields=True):
    token: str


def _cancel_timers(conn: Connection) -> None:
    for handle in conn.state.pop(TIMERS, ()):
        handle.cancel()


def _arm_expiry(hub: Hub, conn: Connection, claims: Claims) -> None:
    """Warn ahead of expiry, close at expiry; replaces earlier timers."""
    _cancel_timers(conn)
    loop = asyncio.get_running_loop()
    remaining = claims.exp - time.time()
    warn_in = remaining - hub.config.auth.expiry_warning

    def warn() -> None:
        seconds = max(0.0, claims.exp - time.time())
        hub.delivery.to_connection(
            conn,
            "token_expiring",
            {"expires_at": iso_utc(claims.exp), "seconds": round(seconds, 3)},
        )

    def expire() -> None:
        log.info("session.token_expired", user_id=conn.user_id)
        conn.close(1008, "token expired")

    handles = [loop.call_later(max(0.0, remaining), expire)]
    if warn_in > 0:
        handles.append(loop.call_later(warn_in, warn))
    else:
        warn()
    conn.state[TIMERS] = handles


async def register(ctx: EventContext, data: Register) -> dict[str, Any]:
    conn, hub = ctx.connection, ctx.hub
    if conn.registered:
        raise ProtocolError(ALREADY_REGISTERED, "this connection is registered already")
    try:
        claims = hub.auth.verify(data.token)
    except ProtocolError as err:
        log.info("session.refused", reason=err.message)
        raise
    hub.limits.check_register(claims.sub, len(hub.get_user_sessions(claims.sub)))
    conn.role = claims.role
    conn.claims = claims.raw
    conn.expires_at = claims.exp
    conn.receipts = data.receipts
    unread = await hub.register_user_session(claims.sub, conn, last_id=data.last_id)
    _arm_expiry(hub, conn, claims)
    log.info(
        "session.registered",
        user_id=claims.sub,
        role=claims.role,
        resume=data.last_id,
        receipts=data.receipts,
    )
    return {
        "user_id": claims.sub,
        "session_id": conn.session_id,
        "unread_count": unread,
        "expires_at": iso_utc(claims.exp),
    }


def refresh(ctx: EventContext, data: Refresh) -> dict[str, Any]:
    conn = ctx.connection
    claims = ctx.hub.auth.verify(data.token)
    if claims.sub != conn.user_id:
        raise ProtocolError(FORBIDDEN, "a refreshed token must have the same subject", status=403)
    conn.role = claims.role
    conn.claims = claims.raw
    conn.expires_at = claims.exp
    _arm_expiry(ctx.hub, conn, claims)
    log.info("session.refreshed", user_id=claims.sub)
    return {"expires_at": iso_utc(claims.exp)}


@hookimpl
def rtserver_events(config: Config) -> list[EventHandler]:
    return [
        EventHandler("register", register, Register, requires_registration=False),
        EventHandler("refresh", refresh, Refresh),
    ]


@hookimpl
def rtserver_disconnect(connection: Connection) -> None:
    _cancel_timers(connection)
