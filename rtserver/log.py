"""structlog set-up: one JSON object per line on stdout, Tornado's logs included.

rtserver's own events and the stdlib loggers (``tornado.access``,
``tornado.application``, ``tornado.general``, plugins using ``logging``) all
pass through one ``ProcessorFormatter``, so every line has the same shape::

    {"event": "session.registered", "level": "info", "logger": "rtserver",
     "timestamp": "2026-11-25T20:21:36.123Z", "session_id": "...", "user_id": "..."}

Context bound with ``structlog.contextvars.bind_contextvars`` (the WebSocket
handler binds ``session_id`` and, after register, ``user_id``) appears on every
event of that connection. Keys that look like credentials are redacted.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from rtserver.config import LoggingConfig

_SECRET_KEYS = frozenset({"token", "authorization", "password", "secret", "uri"})


def _redact(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key in _SECRET_KEYS.intersection(event_dict):
        event_dict[key] = "[redacted]"
    return event_dict


def _orjson_dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=repr).decode()


class _BoundLogger(structlog.stdlib.BoundLogger):
    """``structlog.stdlib.BoundLogger`` that asks the stdlib logger first
    whether it would keep a debug or info event: the ``filter_by_level``
    processor drops the same events, but only after the event dict was built
    and the processor chain entered, a cost paid on every connection when the
    level is warning."""

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not self._logger.isEnabledFor(logging.DEBUG):
            return None
        return super().debug(event, *args, **kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if not self._logger.isEnabledFor(logging.INFO):
            return None
        return super().info(event, *args, **kw)


def configure_logging(
    config: LoggingConfig, stream: IO[str] | None = None, *, cache: bool = True
) -> None:
    """Route structlog and stdlib logging to ``stream`` (stdout by default).

    ``cache=False`` keeps loggers re-reading the configuration, which
    ``structlog.testing.capture_logs`` needs.
    """
    stream = stream or sys.stdout
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    fmt = config.format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=_BoundLogger,
        cache_logger_on_first_use=cache,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_rtserver", False):
            root.removeHandler(old)
    handler._rtserver = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    for name, level in config.levels.items():
        logging.getLogger(name).setLevel(level.upper())


def get_logger(name: str = "rtserver") -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
