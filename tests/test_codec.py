"""The wire format and its codec, both ways; the config loader."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtserver.config import DEV_SECRET, ConfigError, load_config, parse_config
from rtserver.delivery import frame, notification_frame
from rtserver.protocol import (
    RESERVED_FIELDS,
    IdGenerator,
    Notification,
    ProtocolError,
    build_notification,
    check_shape,
    decode_frame,
    encode,
    iso_utc,
    ws_text_frame,
)

ROOT = Path(__file__).resolve().parent.parent


class TestFrames:
    def test_encode_then_decode(self) -> None:
        """An encoded frame decodes back to the same event, data and id."""
        raw = encode("ping", {"n": 1}, "abc")
        frame = decode_frame(raw)
        assert (frame.event, json.loads(bytes(frame.data)), frame.id) == ("ping", {"n": 1}, "abc")

    def test_push_has_no_id(self) -> None:
        """Pushes encode without an id key."""
        assert json.loads(encode("notification", {})) == {"event": "notification", "data": {}}

    def test_data_defaults_to_empty_object(self) -> None:
        """A frame without data decodes with data {}."""
        assert bytes(decode_frame('{"event": "x"}').data) == b"{}"

    @pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
    def test_ws_text_frame_lengths(self, size: int) -> None:
        """Frame headers use the 7-bit, 16-bit and 64-bit length forms (RFC 6455)."""
        payload = b"x" * size
        framed = ws_text_frame(payload)
        assert framed[0] == 0x81
        length = framed[1] & 0x7F
        if size < 126:
            assert length == size and framed[2:] == payload
        elif size <= 0xFFFF:
            assert length == 126 and int.from_bytes(framed[2:4], "big") == size
        else:
            assert length == 127 and int.from_bytes(framed[2:10], "big") == size
        assert framed.endswith(payload)

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.text(),
            st.binary().map(lambda b: b.decode("latin-1")),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(),
                lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                max_leaves=20,
            ).map(json.dumps),
        )
    )
    def test_decoder_never_raises_anything_but_protocol_error(self, text: str) -> None:
        """Random input either decodes or raises ProtocolError with a known code."""
        try:
            frame = decode_frame(text)
        except ProtocolError as err:
            assert err.code in ("bad_request", "too_large")  # noqa: PT017
            assert err.message  # noqa: PT017
        else:
            assert isinstance(frame.event, str) and frame.event


class TestNotifications:
    def build(self, payload: object, **kw: int) -> object:
        return build_notification(
            payload,
            user_id="u",
            notification_id="id1",
            created_at=0.0,
            max_bytes=kw.get("max_bytes", 1000),
            max_depth=kw.get("max_depth", 4),
            max_fields=kw.get("max_fields", 8),
        )

    def test_wire_form_keeps_extras_and_server_fields_win(self) -> None:
        """Extras are delivered; id/user_id/created_at/read come from the server."""
        n = build_notification(
            {"message": "m", "category": "c"},
            user_id="u",
            notification_id="id1",
            created_at=0.0,
            max_bytes=1000,
            max_depth=4,
            max_fields=8,
        )
        assert n.to_wire() == {
            "category": "c",
            "id": "id1",
            "user_id": "u",
            "message": "m",
            "type": "info",
            "created_at": "1970-01-01T00:00:00.000Z",
            "read": False,
            "read_at": None,
            "delivered_at": None,
        }

    @pytest.mark.parametrize(
        ("payload", "code"),
        [
            ({"message": ""}, "bad_request"),
            ({"message": "m", "read": True}, "bad_request"),
            ({"message": "m", "a": {"b": {"c": {"d": {}}}}}, "too_large"),
            ({"message": "m", **{f"k{i}": i for i in range(10)}}, "too_large"),
            ({"message": "x" * 2000}, "too_large"),
        ],
    )
    def test_limits(self, payload: dict, code: str) -> None:  # type: ignore[type-arg]
        """Empty message, reserved fields, depth, width and size are refused."""
        with pytest.raises(ProtocolError) as err:
            self.build(payload)
        assert err.value.code == code

    def test_check_shape_counts_lists_toward_depth(self) -> None:
        """Lists nest too."""
        check_shape([[1]], max_depth=2, max_fields=1)
        with pytest.raises(ProtocolError):
            check_shape([[[1]]], max_depth=2, max_fields=1)

    def test_ids_sort_in_creation_order(self) -> None:
        """IdGenerator ids are unique and sort as they were made, one at a
        time or taken in batches (one millisecond each), mixed."""
        gen = IdGenerator()
        ids = [gen() for _ in range(2000)]
        for _ in range(20):
            taken = gen.take(150)
            assert len({IdGenerator.created_at(i) for i in taken}) == 1
            ids += [*taken, gen()]
        assert ids == sorted(ids) and len(set(ids)) == len(ids) == 5020
        assert all(len(i) == 24 for i in ids)

    def test_flat_and_nested_shapes_share_the_width_limit(self) -> None:
        """The flat-payload shortcut refuses what the full walk refuses."""
        wide = {f"k{i}": i for i in range(9)}
        for payload in (wide, {**wide, "nested": {"a": 1}}):
            with pytest.raises(ProtocolError, match="more than 8 fields"):
                check_shape(payload, max_depth=4, max_fields=8)
        with pytest.raises(ProtocolError, match="nested deeper than 0"):
            check_shape({"a": 1}, max_depth=0, max_fields=8)
        check_shape({f"k{i}": i for i in range(8)}, max_depth=1, max_fields=8)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    extra=st.dictionaries(
        st.text().filter(lambda k: k not in RESERVED_FIELDS | {"message", "type"}),
        _json_values,
        max_size=4,
    ),
    message=st.text(min_size=1),
    ntype=st.sampled_from(["info", "success", "warning", "error"]),
    user_id=st.none() | st.text(min_size=1),
    created_at=st.floats(min_value=0, max_value=4e9),
    read_at=st.none() | st.floats(min_value=0, max_value=4e9),
    delivered_at=st.none() | st.floats(min_value=0, max_value=4e9),
    broadcast=st.booleans(),
)
def test_notification_frame_is_the_general_encoding(
    extra: dict,  # type: ignore[type-arg]
    message: str,
    ntype: str,
    user_id: str | None,
    created_at: float,
    read_at: float | None,
    delivered_at: float | None,
    broadcast: bool,
) -> None:
    """The hot path's frame for a notification is byte for byte the one the
    general encoder makes of ``to_wire()`` (extras first, ``broadcast`` only
    when true), so clients cannot tell which path a push took."""
    n = Notification(
        id="0123456789ab000001abcdef",
        user_id=user_id,
        message=message,
        type=ntype,  # type: ignore[arg-type]
        created_at=created_at,
        read=read_at is not None,
        read_at=read_at,
        delivered_at=delivered_at,
        broadcast=broadcast,
        extra=extra,
    )
    assert notification_frame(n) == frame("notification", n.to_wire())


class TestConfig:
    def test_shipped_configs_parse(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """default.yaml loads as is; prod.yaml loads once its environment is set."""
        assert load_config(ROOT / "config" / "default.yaml").store.backend == "sqlite"
        monkeypatch.setenv("RTSERVER_SECRET", "s" * 40)
        monkeypatch.setenv("RTSERVER_MONGODB_URI", "mongodb://db.internal:27017")
        prod = load_config(ROOT / "config" / "prod.yaml")
        assert (prod.store.backend, prod.server.test_routes, prod.auth.issuer) == (
            "mongodb",
            False,
            None,
        )

    @pytest.mark.parametrize(
        ("raw", "message"),
        [
            ({"server": {"portt": 1}}, "server.portt: unknown key"),
            ({"server": {"port": "eighty"}}, "server.port: expected `int`, got `str`"),
            ({"bogus": {}}, "bogus: unknown key"),
            ({"auth": {"secret": None}}, "auth.secret: required when HS256 is allowed"),
            (
                {"server": {"environment": "production"}, "auth": {"secret": DEV_SECRET}},
                "auth.secret: the development secret",
            ),
            ({"store": {"backend": "mongodb"}, "auth": {"secret": "x"}}, "store.uri: required"),
            ({"server": {"gc_thresholds": [0, 10, 10]}}, "server.gc_thresholds: three positive"),
            ({"server": {"gc_thresholds": [700, 10]}}, "server.gc_thresholds: expected `array`"),
            ({"server": {"coalesce_turns": -1}}, "server.coalesce_turns: an integer from 0"),
            ({"server": {"coalesce_max_delay": 0}}, "server.coalesce_max_delay: seconds, over 0"),
            ({"server": {"coalesce_busy_delay": -1}}, "server.coalesce_busy_delay: seconds"),
            (
                {"server": {"coalesce_busy_connections": 0}},
                "server.coalesce_busy_connections: an integer, at least 1",
            ),
            (
                {"auth": {"secret": "${RTSERVER_TEST_UNSET_VAR}"}},
                "auth.secret: environment variable RTSERVER_TEST_UNSET_VAR is not set",
            ),
        ],
    )
    def test_bad_config_names_the_key(self, raw: dict, message: str) -> None:  # type: ignore[type-arg]
        """One clear message naming the offending key."""
        raw.setdefault("auth", {}).setdefault("secret", "x" * 40)
        with pytest.raises(ConfigError) as err:
            parse_config(raw, source="test.yaml")
        assert str(err.value).startswith("test.yaml: ")
        assert message in str(err.value)

    def test_config_is_frozen(self) -> None:
        """Config objects cannot be changed after loading."""
        cfg = parse_config({"auth": {"secret": "x"}})
        with pytest.raises(AttributeError):
            cfg.server.port = 1  # type: ignore[misc]
        assert isinstance(msgspec.to_builtins(cfg), dict)


@pytest.mark.parametrize(
    "ts",
    [0.0, 0.0005, 1.9999995, 1700000000.5, 1700000000.0009995, 1700000000.9995, 1764110000.1234],
)
def test_iso_utc_matches_datetime(ts: float) -> None:
    """The fast ISO formatter gives exactly datetime's string, at rounding edges too."""
    expected = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    assert iso_utc(ts) == expected
    assert iso_utc(ts) == expected  # the whole string, cached
    assert iso_utc(ts + 1) != expected  # the cached seconds part moves on
