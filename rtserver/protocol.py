"""The wire format beside its codec.

Every frame, either way, is one JSON text object::

    {"event": NAME, "data": {...}, "id": ID}

``data`` defaults to ``{}``; ``id`` (string or integer) is optional. A client
frame with an ``id`` gets exactly one reply carrying the same id, either
``{"event": "ack", "id": ID, "data": {...}}`` or
``{"event": "error", "id": ID, "data": {"code": CODE, "message": TEXT}}``.
Pushes from the server (``notification``, ``message``, ``read``) carry no id.

Outbound frames are encoded here once and framed once (``ws_text_frame``), so a
broadcast writes the same bytes to every connection. See docs/protocol.md.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import struct
import threading
import time
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeVar

import msgspec

FrameId = str | int
T = TypeVar("T")

# Error codes: the complete vocabulary a client may see.
BAD_REQUEST: Final = "bad_request"
NOT_REGISTERED: Final = "not_registered"
ALREADY_REGISTERED: Final = "already_registered"
UNAUTHORIZED: Final = "unauthorized"
FORBIDDEN: Final = "forbidden"
UNKNOWN_EVENT: Final = "unknown_event"
NOT_FOUND: Final = "not_found"
TOO_LARGE: Final = "too_large"
RATE_LIMITED: Final = "rate_limited"
UNSUPPORTED: Final = "unsupported"
UNAVAILABLE: Final = "unavailable"
INTERNAL_ERROR: Final = "internal_error"
ERROR_CODES: Final = frozenset(
    {
        BAD_REQUEST,
        NOT_REGISTERED,
        ALREADY_REGISTERED,
        UNAUTHORIZED,
        FORBIDDEN,
        UNKNOWN_EVENT,
        NOT_FOUND,
        TOO_LARGE,
        RATE_LIMITED,
        UNSUPPORTED,
        UNAVAILABLE,
        INTERNAL_ERROR,
    }
)

NOTIFICATION_TYPES: Final = ("info", "success", "warning", "error")
NotificationType = Literal["info", "success", "warning", "error"]

# Keys the server owns in a notification; a sender may not set them.
RESERVED_FIELDS: Final = frozenset(
    {"id", "user_id", "created_at", "read", "read_at", "delivered_at", "broadcast"}
)


class ProtocolError(Exception):
    """A failure the client is told about as ``{"code", "message"}``.

    Raise it from an event handler or HTTP route; the core turns it into an
    ``error`` reply (or an HTTP error with ``status``) and nothing else happens.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int = 400,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.extra = extra or {}

    def as_data(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.extra}


class InboundFrame(msgspec.Struct, forbid_unknown_fields=True):
    """A client frame; ``data`` stays raw until its event's schema decodes it."""

    event: str
    data: msgspec.Raw = msgspec.Raw(b"{}")
    id: FrameId | None = None


_frame_decoder = msgspec.json.Decoder(InboundFrame)
_any_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def describe_validation_error(err: msgspec.ValidationError, root: str = "") -> str:
    """msgspec's "Expected `int`, got `str` - at `$.data.limit`" as
    "data.limit: expected `int`, got `str`", with the path under ``root``."""
    text = str(err)
    msg, sep, where = text.rpartition(" - at `$")
    if not sep:
        msg, where = text, ""
    where = where.rstrip("`").lstrip(".")
    path = f"{root}.{where}" if root and where else where or root
    missing = re.match(r"Object missing required field `(.+)`", msg)
    if missing:
        return f"{_join(path, missing.group(1))}: required"
    unknown = re.match(r"Object contains unknown field `(.+)`", msg)
    if unknown:
        return f"{_join(path, unknown.group(1))}: unknown key"
    return f"{path or 'value'}: {msg[0].lower()}{msg[1:]}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def decode_frame(text: str | bytes) -> InboundFrame:
    """Decode one client frame, or raise ``ProtocolError(bad_request)``.

    The error names the offending field. When the frame is at least an object
    with a usable ``id``, the error carries it (``ProtocolError.extra['id']`` is
    not used; call ``salvage_id``).
    """
    try:
        frame = _frame_decoder.decode(text)
    except msgspec.ValidationError as err:
        raise ProtocolError(BAD_REQUEST, describe_validation_error(err, "frame")) from None
    except msgspec.DecodeError as err:
        raise ProtocolError(BAD_REQUEST, f"invalid JSON: {err}") from None
    except RecursionError:
        raise ProtocolError(TOO_LARGE, "frame: nested too deeply") from None
    if not frame.event:
        raise ProtocolError(BAD_REQUEST, "event: must be a non-empty string")
    return frame


def salvage_id(text: str | bytes) -> FrameId | None:
    """The ``id`` of a frame that failed validation, if it has a usable one."""
    try:
        obj = _any_decoder.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None
    if isinstance(obj, dict):
        fid = obj.get("id")
        if isinstance(fid, str | int) and not isinstance(fid, bool):
            return fid
    return None


def decode_data(raw: msgspec.Raw, schema: type[T]) -> T:
    """Decode a frame's ``data`` into an event's schema, or raise bad_request."""
    try:
        return msgspec.json.decode(raw, type=schema)
    except msgspec.ValidationError as err:
        raise ProtocolError(BAD_REQUEST, describe_validation_error(err, "data")) from None
    except msgspec.DecodeError as err:
        raise ProtocolError(BAD_REQUEST, f"invalid JSON: {err}") from None
    except RecursionError:
        raise ProtocolError(TOO_LARGE, "data: nested too deeply") from None


def encode(event: str, data: Any, frame_id: FrameId | None = None) -> bytes:
    """Encode an outbound frame's JSON payload (not yet WebSocket-framed)."""
    if frame_id is None:
        return _encoder.encode({"event": event, "data": data})
    return _encoder.encode({"event": event, "id": frame_id, "data": data})


def encode_json(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode_json(data: bytes | str) -> Any:
    """Decode arbitrary JSON or raise ``ProtocolError(bad_request)``."""
    try:
        return _any_decoder.decode(data)
    except msgspec.DecodeError as err:
        raise ProtocolError(BAD_REQUEST, f"invalid JSON: {err}") from None
    except RecursionError:
        raise ProtocolError(TOO_LARGE, "body: nested too deeply") from None


def ws_text_frame(payload: bytes) -> bytes:
    """A complete unmasked WebSocket text frame (RFC 6455 5.2) around ``payload``.

    Server-to-client frames are never masked, so one framed message can be
    written unchanged to every connection of a broadcast.
    """
    n = len(payload)
    if n < 126:
        return _SHORT_HEADERS[n] + payload
    if n <= 0xFFFF:
        return _header16(0x81, 126, n) + payload
    return _header64(0x81, 127, n) + payload


_SHORT_HEADERS: Final = [bytes((0x81, n)) for n in range(126)]
_header16 = struct.Struct("!BBH").pack
_header64 = struct.Struct("!BBQ").pack

#: Seconds a close the server started waits for the peer's close frame.
CLOSE_TIMEOUT: Final = 5.0


def close_payload(code: int | None, reason: str | None) -> bytes:
    if code is None:
        return b""
    data = (reason or "").encode()
    if len(data) > 123:  # a control frame carries at most 125 bytes
        data = data[:123].decode("utf-8", "ignore").encode()
    return code.to_bytes(2, "big") + data


def _valid_close_code(code: int) -> bool:
    """Codes a peer may send (RFC 6455 7.4)."""
    return (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) or 3000 <= code <= 4999


def close_frame_fault(payload: bytes) -> tuple[int, str] | None:
    """What is wrong with a peer's close frame payload, as the close code and
    reason to fail the connection with, or None when it is well formed: a
    one-byte payload or a code a peer may not send (1002), a reason that is
    not UTF-8 (1007)."""
    if len(payload) == 1 or (
        len(payload) >= 2 and not _valid_close_code(int.from_bytes(payload[:2], "big"))
    ):
        return 1002, "invalid close frame"
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return 1007, "a close reason must be UTF-8"
    return None


class _Pushed(msgspec.Struct):
    event: str = ""
    data: Any = None


_decode_pushed = msgspec.json.Decoder(_Pushed).decode


def pushed_notification_ids(frames: bytes, sent: int = 0) -> list[str]:
    """The ids of the user notifications (not broadcasts) in ``frames``,
    whole text frames as ``ws_text_frame`` makes them, that end past byte
    ``sent``: those a peer that got only the first ``sent`` bytes lacks."""
    ids: list[str] = []
    pos, end = 0, len(frames)
    while pos + 2 <= end:
        size, head = frames[pos + 1] & 0x7F, 2
        if size == 126:
            size, head = int.from_bytes(frames[pos + 2 : pos + 4]), 4
        elif size == 127:
            size, head = int.from_bytes(frames[pos + 2 : pos + 10]), 10
        stop = pos + head + size
        if stop > sent and frames[pos] == 0x81:
            try:
                pushed = _decode_pushed(frames[pos + head : stop])
            except msgspec.DecodeError:
                pushed = None
            data = pushed.data if pushed is not None and pushed.event == "notification" else None
            if isinstance(data, dict) and not data.get("broadcast"):
                nid = data.get("id")
                if isinstance(nid, str):
                    ids.append(nid)
        pos = stop
    return ids


def _nested(obj: dict[str, Any]) -> bool:
    """Whether a value of ``obj`` is an object or a list (else it is flat)."""
    for value in obj.values():  # noqa: SIM110 (any() over a generator: twice as slow, every send)
        if isinstance(value, (dict, list)):
            return True
    return False


def check_shape(obj: Any, *, max_depth: int, max_fields: int, where: str = "data") -> None:
    """Refuse payloads nested deeper than ``max_depth`` or with objects wider
    than ``max_fields`` keys (lists count toward depth, not width). Only
    objects and lists are visited (a flat payload is one pass over its values)."""
    if type(obj) is dict and len(obj) <= max_fields and max_depth >= 1 and not _nested(obj):
        return  # flat: nothing deeper to visit
    stack: list[tuple[Any, int, str]] = [(obj, 1, where)]
    while stack:
        node, depth, path = stack.pop()
        if depth > max_depth:
            raise ProtocolError(TOO_LARGE, f"{path}: nested deeper than {max_depth}")
        if isinstance(node, dict):
            if len(node) > max_fields:
                raise ProtocolError(TOO_LARGE, f"{path}: more than {max_fields} fields")
            for k, v in node.items():
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1, f"{path}.{k}"))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1, f"{path}[{i}]"))


#: The integers every store holds as they are: BSON's int64 (MongoDB), and
#: SQLite's JSON body decodes them back unchanged.
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


def _plain_key(key: Any) -> bool:
    """A key every store keeps and queries as given: a string without NUL
    (BSON keys are C strings), not starting with ``$`` and without ``.``
    (MongoDB reads those as operators and paths)."""
    return type(key) is str and "\x00" not in key and "." not in key and key[:1] != "$"


def _plain_scalar(value: Any) -> bool:
    """A leaf every store round-trips unchanged: str, bool, None, a finite
    float, or an int within int64."""
    if value is None or isinstance(value, str | bool):
        return True
    if isinstance(value, int):
        return INT64_MIN <= value <= INT64_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    return False


def _storable_flat(obj: dict[Any, Any]) -> bool:
    """Whether ``obj`` is flat and holds only plain keys and scalars: the usual
    payload, checked in one pass (``check_storable`` explains the rest)."""
    for key, value in obj.items():  # noqa: SIM110 (a plain loop: every send passes here)
        if not (_plain_key(key) and _plain_scalar(value)):
            return False
    return True


def check_storable(obj: Any, *, where: str = "notification") -> None:
    """Refuse what some store could not hold exactly as given, naming the
    field: keys that are not strings, hold NUL or ``.``, or start with ``$``;
    integers outside signed 64 bits; NaN and infinities; anything that is not
    a JSON value (tuples, bytes, dates...). Both stores accept exactly what
    passes, and give it back unchanged."""
    stack: list[tuple[Any, str]] = [(obj, where)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if not _plain_key(key):
                    raise ProtocolError(BAD_REQUEST, f"{path}: key {key!r} {_key_fault(key)}")
                stack.append((value, f"{path}.{key}"))
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
        elif not _plain_scalar(node):
            raise ProtocolError(BAD_REQUEST, f"{path}: {_value_fault(node)}")


def _key_fault(key: Any) -> str:
    if type(key) is not str:
        return "is not a string"
    if "\x00" in key:
        return "holds a NUL character"
    return "holds '.' or starts with '$' (MongoDB reads those as paths and operators)"


def _value_fault(value: Any) -> str:
    if isinstance(value, int):
        return f"integer {value} is outside signed 64 bits ({INT64_MIN} to {INT64_MAX})"
    if isinstance(value, float):
        return f"{value} is not a finite number"
    return f"a {type(value).__name__} is not a JSON value (use an object, list, string, number, true, false or null)"


class Notification(msgspec.Struct, kw_only=True, gc=False):
    """A stored notification. ``extra`` holds every field the sender added.

    Not tracked by the garbage collector (``gc=False``): a notification
    refers only to strings, numbers and the sender's JSON, never back to
    itself, and tens of thousands are made per second.
    """

    id: str
    user_id: str | None
    message: str
    type: NotificationType = "info"
    created_at: float
    read: bool = False
    read_at: float | None = None
    delivered_at: float | None = None
    broadcast: bool = False
    extra: dict[str, Any] = {}

    def to_wire(self) -> dict[str, Any]:
        """The JSON object clients see (extras first, so they cannot shadow)."""
        body: dict[str, Any] = dict(self.extra)
        body.update(
            id=self.id,
            user_id=self.user_id,
            message=self.message,
            type=self.type,
            created_at=iso_utc(self.created_at),
            read=self.read,
            read_at=None if self.read_at is None else iso_utc(self.read_at),
            delivered_at=None if self.delivered_at is None else iso_utc(self.delivered_at),
        )
        if self.broadcast:
            body["broadcast"] = True
        return body

    def wire_json(self) -> bytes:
        """``encode_json(self.to_wire())``, byte for byte, about three times
        faster: the server's fields are one Struct, the extras (if any) a dict
        encoded on its own, and the two are joined. (Extras never hold a
        field of the server's: ``build_notification`` refuses them.)"""
        fields = _wire_encoder.encode(
            _WireFields(
                self.id,
                self.user_id,
                self.message,
                self.type,
                iso_utc(self.created_at),
                self.read,
                None if self.read_at is None else iso_utc(self.read_at),
                None if self.delivered_at is None else iso_utc(self.delivered_at),
                self.broadcast,
            )
        )
        if not self.extra:
            return fields
        return _wire_encoder.encode(self.extra)[:-1] + b"," + fields[1:]


class Publication(msgspec.Struct, kw_only=True, gc=False):
    """One message published to a topic. ``data`` is the publisher's JSON
    value, kept encoded (stored and sent as it came, whatever a store's own
    types could hold); ``publisher`` is the user id of a client that published
    it (None: the server's API). Kept in the topic's history until
    ``expires_at``."""

    topic: str
    id: str
    data: bytes
    created_at: float
    expires_at: float
    publisher: str | None = None

    def wire_json(self) -> bytes:
        """The ``publication`` event's frame text, the data spliced in as it is."""
        head = {"topic": self.topic, "id": self.id, "created_at": iso_utc(self.created_at)}
        if self.publisher is not None:
            head["publisher"] = self.publisher
        return (
            b'{"event":"publication","data":'
            + encode_json(head)[:-1]
            + b',"data":'
            + self.data
            + b"}}"
        )

    def to_wire(self) -> dict[str, Any]:
        return decode_json(self.wire_json())["data"]  # type: ignore[no-any-return]


class _WireFields(msgspec.Struct, omit_defaults=True, gc=False):
    """The fields the server owns, in ``to_wire``'s order (``broadcast``
    only when true)."""

    id: str
    user_id: str | None
    message: str
    type: str
    created_at: str
    read: bool
    read_at: str | None
    delivered_at: str | None
    broadcast: bool = False


_wire_encoder = msgspec.json.Encoder()
_NOTIFICATION_HEAD: Final = b'{"event":"notification","data":'


def notification_json(n: Notification) -> bytes:
    """``encode("notification", n.to_wire())``, byte for byte (see ``wire_json``)."""
    return _NOTIFICATION_HEAD + n.wire_json() + b"}"


def iso_utc(ts: float) -> str:
    """``1700000000.5`` -> ``"2023-11-14T22:13:20.500Z"``.

    The same string as ``datetime.fromtimestamp(ts, UTC).isoformat(timespec=
    "milliseconds")`` (rounded to the microsecond, then cut to the millisecond),
    about four times faster: the seconds part is kept from the previous call,
    and the whole string when ``ts`` is the previous one's (a batch shares it).
    """
    global _iso_second, _iso_last
    last = _iso_last
    if last[0] == ts:
        return last[1]
    frac, whole = math.modf(ts)
    if ts < 0:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    us = round(frac * 1e6)
    if us >= 1_000_000:
        whole += 1
        us -= 1_000_000
    second = int(whole)
    cached = _iso_second
    if cached[0] != second:
        cached = _iso_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    text = f"{cached[1]}.{us // 1000:03d}Z"
    _iso_last = (ts, text)
    return text


# Replaced whole, never changed in place: a thread reading one sees a
# consistent pair.
_iso_second: tuple[int | None, str] = (None, "")
_iso_last: tuple[float | None, str] = (None, "")


def build_notification(
    payload: Any,
    *,
    user_id: str | None,
    notification_id: str,
    created_at: float,
    max_bytes: int,
    max_depth: int,
    max_fields: int,
    broadcast: bool = False,
) -> Notification:
    """Validate a sender's payload and make a Notification of it.

    ``payload`` needs ``message`` (a non-empty string) and may give ``type``
    (info|success|warning|error, default info) and any other JSON fields,
    which are kept and delivered as they are. Raises ``ProtocolError``.
    """
    if not isinstance(payload, dict):
        raise ProtocolError(BAD_REQUEST, "notification: must be a JSON object")
    try:
        size = len(_encoder.encode(payload))
    except (TypeError, ValueError) as err:  # a lone surrogate, an unencodable type
        raise ProtocolError(BAD_REQUEST, f"notification: not JSON: {err}") from None
    if size > max_bytes:
        raise ProtocolError(
            TOO_LARGE, f"notification: {size} bytes is over the limit of {max_bytes}", status=413
        )
    # Most payloads are flat, narrow and plain: those need no walk.
    if len(payload) > max_fields or max_depth < 1 or not _storable_flat(payload):
        check_shape(payload, max_depth=max_depth, max_fields=max_fields, where="notification")
        check_storable(payload)
    message = payload.get("message")
    if not isinstance(message, str) or not message or message.isspace():
        raise ProtocolError(BAD_REQUEST, "notification.message: required non-empty string")
    ntype = payload.get("type", "info")
    if ntype not in NOTIFICATION_TYPES:
        raise ProtocolError(
            BAD_REQUEST, f"notification.type: must be one of {', '.join(NOTIFICATION_TYPES)}"
        )
    extra: dict[str, Any] = {}
    if len(payload) > (2 if "type" in payload else 1):  # more than message and type
        for key, value in payload.items():
            if key in _SENDER_FIELDS:
                continue
            if key in RESERVED_FIELDS:
                raise ProtocolError(BAD_REQUEST, f"notification.{key}: is set by the server")
            extra[key] = value
    return Notification(
        id=notification_id,
        user_id=user_id,
        message=message,
        type=ntype,
        created_at=created_at,
        broadcast=broadcast,
        extra=extra,
    )


_SENDER_FIELDS: Final = frozenset({"message", "type"})


class IdGenerator:
    """Time-ordered, unique string ids: 12 hex digits of milliseconds, 6 of a
    per-process sequence, 6 of a random node tag (24 in all, like an ObjectId).

    Ids of one process sort in creation order, which ``last_id`` resume and
    ``before`` paging rely on. Thread-safe.
    """

    def __init__(self, node: bytes | None = None) -> None:
        self._node = (node or os.urandom(3)).hex()[:6]
        self._lock = threading.Lock()
        self._last_ms = 0
        self._seq = itertools.count()

    def __call__(self) -> str:
        with self._lock:
            ms = max(int(time.time() * 1000), self._last_ms)
            if ms != self._last_ms:
                self._last_ms = ms
            seq = next(self._seq) & 0xFFFFFF
            return f"{ms:012x}{seq:06x}{self._node}"

    def take(self, count: int) -> list[str]:
        """``count`` ids at once (one clock read, one lock): the same
        millisecond, consecutive sequence numbers."""
        with self._lock:
            ms = max(int(time.time() * 1000), self._last_ms)
            self._last_ms = ms
            prefix, node = f"{ms:012x}", self._node
            first = next(self._seq)
            self._seq = itertools.count(first + count)
            return [f"{prefix}{seq & 0xFFFFFF:06x}{node}" for seq in range(first, first + count)]

    @staticmethod
    def created_at(notification_id: str) -> float:
        """The creation time (epoch seconds, ms precision) an id carries."""
        return int(notification_id[:12], 16) / 1000
