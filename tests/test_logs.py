"""Structured logs: event names, bound context, no tokens."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging

import structlog
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs
from structlog.typing import EventDict, Processor, WrappedLogger

from rtserver.config import LoggingConfig
from rtserver.log import configure_logging, get_logger

from .conftest import Running


async def test_connection_life_is_logged_with_session_and_user(server: Running) -> None:
    """connect, register, disconnect events carry session_id (and user_id once known)."""
    with capture_logs(processors=[merge_contextvars]) as logs:
        client = await server.connect()
        await client.register(server.token("logan"))
        await client.request("get_notifications")
        await client.close()
        for _ in range(100):
            if any(e["event"] == "connection.closed" for e in logs):
                break
            await asyncio.sleep(0.01)
    by_event = {e["event"]: e for e in logs}
    opened, registered, closed = (
        by_event["connection.opened"],
        by_event["session.registered"],
        by_event["connection.closed"],
    )
    assert (
        opened["session_id"]
        == registered["session_id"]
        == closed["session_id"]
        == client.session_id
    )
    assert registered["user_id"] == "logan" and closed["user_id"] == "logan"


async def test_tokens_never_reach_the_log(server: Running) -> None:
    """No log event contains a token, valid or refused."""
    good, bad = server.token("tina"), server.token("tina", ttl=-100)
    with capture_logs() as logs:
        client = await server.connect()
        with contextlib.suppress(Exception):
            await client.register(bad)
        await client.register(good)
        await server.http("GET", "/api/users/tina/notifications", token=good)
    text = json.dumps(logs, default=str)
    assert good not in text and bad not in text
    assert any(e["event"] == "session.refused" for e in logs)


def test_json_lines_include_stdlib_loggers_and_redact_secrets() -> None:
    """JSON rendering covers structlog and stdlib (Tornado) loggers alike, and
    credential-looking keys are redacted."""
    buf = io.StringIO()
    configure_logging(
        LoggingConfig(format="json", levels={"tornado.general": "error"}), stream=buf, cache=False
    )
    try:
        get_logger("rtserver").info("test.event", token="abc.def.ghi", n=1)
        logging.getLogger("tornado.application").warning("plain %s", "stdlib")
        logging.getLogger("tornado.general").warning("filtered by per-logger level")
        lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    finally:
        configure_logging(LoggingConfig(format="json"), cache=False)
        logging.getLogger("tornado.general").setLevel(logging.NOTSET)
    assert (
        lines[0]["event"] == "test.event"
        and lines[0]["token"] == "[redacted]"
        and lines[0]["n"] == 1
    )
    assert lines[1]["event"] == "plain stdlib" and lines[1]["logger"] == "tornado.application"
    assert len(lines) == 2


def test_levels_drop_events_before_processing_and_per_logger_levels_hold() -> None:
    """At level warning an info event never reaches the processors (none
    runs), while a logger set to debug by ``logging.levels`` keeps its debug
    and info events: the same verdict as the filter_by_level processor."""
    buf = io.StringIO()
    seen: list[str] = []
    configure_logging(
        LoggingConfig(format="json", level="warning", levels={"rtserver.chatty": "debug"}),
        stream=buf,
        cache=False,
    )
    try:
        original = structlog.get_config()["processors"]
        structlog.configure(processors=[_record(seen), *original])
        get_logger("rtserver").info("dropped.info")
        get_logger("rtserver").debug("dropped.debug")
        get_logger("rtserver").warning("kept.warning")
        get_logger("rtserver.chatty").debug("kept.debug")
        get_logger("rtserver.chatty").info("kept.info")
        lines = [json.loads(line)["event"] for line in buf.getvalue().splitlines()]
    finally:
        configure_logging(LoggingConfig(format="json"), cache=False)
        logging.getLogger("rtserver.chatty").setLevel(logging.NOTSET)
    assert seen == ["kept.warning", "kept.debug", "kept.info"]
    assert lines == ["kept.warning", "kept.debug", "kept.info"]


def _record(seen: list[str]) -> Processor:
    def record(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        seen.append(event_dict["event"])
        return event_dict

    return record


async def test_metrics_snapshot_is_logged_periodically(start_server) -> None:  # type: ignore[no-untyped-def]
    """A metrics.snapshot event with connection and delivery figures every interval."""
    with capture_logs() as logs:
        srv = await start_server(logging={"metrics_interval": 0.05})
        await srv.user("m")
        for _ in range(100):
            if any(e["event"] == "metrics.snapshot" and e.get("connections") == 1 for e in logs):
                break
            await asyncio.sleep(0.02)
    snaps = [e for e in logs if e["event"] == "metrics.snapshot" and e.get("connections") == 1]
    assert (snaps and "deliveries" in snaps[-1]) or "frames_in" in snaps[-1]
