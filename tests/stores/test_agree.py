"""SQLite and MongoDB accept exactly the same notifications, and give back
unchanged what they accept.

Hypothesis generates payloads, poison included (integers past 64 bits, NaN,
keys with NUL, ``.`` or a leading ``$``, keys that are not strings, lone
surrogates). The door (``build_notification``) must refuse exactly the ones an
independent oracle says some store cannot hold as given; every payload it
accepts is written to a real SQLite file and, over the real driver, to
nx-27017, and must come back from both equal value for value and type for type
(``True`` is not ``1``, ``1.0`` is not ``1``).
"""

from __future__ import annotations

import asyncio
import math
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtserver.config import StoreConfig
from rtserver.protocol import (
    RESERVED_FIELDS,
    IdGenerator,
    Notification,
    ProtocolError,
    build_notification,
)
from rtserver.stores.base import Store
from rtserver.stores.mongodb import MongoStore
from rtserver.stores.sqlite import SQLiteStore

from ..mongo_support import NxServer, pymongo_orphan_sockets  # noqa: F401 (autouse)

INT64 = 2**63
POISON_KEYS = ["$set", "a.b", "nul\x00key", "", "é", "$", "x$"]

keys = st.text(max_size=6) | st.sampled_from(POISON_KEYS) | st.integers(-3, 3)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([INT64 - 1, -INT64, INT64, -INT64 - 1, 0])
    | st.floats()  # NaN and the infinities too
    | st.text(max_size=12)
    | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)  # lone surrogates
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=10,
)
payloads = st.builds(
    lambda message, extra: {"message": message, **extra},
    st.text(min_size=1, max_size=10).filter(lambda s: not s.isspace()),
    st.dictionaries(keys.filter(lambda k: k not in ("message", "type")), values, max_size=5),
)


def storable(value: Any) -> bool:
    """The oracle, written apart from the door: what both stores hold as given."""
    if value is None or type(value) is bool:
        return True
    if type(value) is int:
        return -INT64 <= value < INT64
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is str:
        return not any("\ud800" <= c <= "\udfff" for c in value)
    if type(value) is list:
        return all(map(storable, value))
    if type(value) is dict:
        return all(
            type(k) is str
            and storable(k)
            and "\x00" not in k
            and "." not in k
            and not k.startswith("$")
            and storable(v)
            for k, v in value.items()
        )
    return False


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same type all the way down."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def door(payload: dict[Any, Any], nid: str) -> Notification | ProtocolError:
    """``build_notification`` with room to spare: only storability decides."""
    try:
        return build_notification(
            payload,
            user_id="u",
            notification_id=nid,
            created_at=IdGenerator.created_at(nid),
            max_bytes=1 << 20,
            max_depth=32,
            max_fields=1000,
        )
    except ProtocolError as err:
        return err


def test_both_stores_accept_the_same_and_give_it_back(tmp_path: Path, nx: NxServer) -> None:
    ids = IdGenerator()
    with asyncio.Runner() as runner:
        sqlite = SQLiteStore(tmp_path / "agree.db")
        mongo = MongoStore(
            StoreConfig(
                backend="mongodb",
                uri=nx.uri,
                database=f"rt_{uuid.uuid4().hex[:8]}",
                data_dir=str(tmp_path / "spool"),
            )
        )
        stores: list[Store] = [sqlite, mongo]
        for store in stores:
            runner.run(store.open())
        seen = {"accepted": 0, "refused": 0}

        async def round_trip(payload: dict[Any, Any]) -> None:
            nid = ids()
            n = door(payload, nid)
            if isinstance(n, ProtocolError):
                seen["refused"] += 1
                assert n.code == "bad_request", n
                assert str(n).startswith("notification"), n
                reserved = RESERVED_FIELDS.intersection(payload)
                assert reserved or not storable(payload), f"refused a storable payload: {n}"
                return
            seen["accepted"] += 1
            assert storable(payload), f"accepted what a store cannot hold: {payload!r}"
            for store in stores:
                assert await store.insert_many([n]) == [None], type(store).__name__
                got = await store.get("u", n.id)
                assert got is not None, type(store).__name__
                assert same(got.extra, n.extra), (type(store).__name__, got.extra, n.extra)
                assert got.message == n.message

        @settings(
            max_examples=300,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(payloads)
        def check(payload: dict[Any, Any]) -> None:
            runner.run(round_trip(payload))

        try:
            check()
        finally:
            for store in stores:
                runner.run(store.close())
        # The run tried both sides of the door.
        assert seen["accepted"] >= 30 and seen["refused"] >= 30, seen


@pytest.mark.parametrize("value", [INT64 - 1, -INT64, 2**53 + 1, -0.0, 1e308, "a\x00b", True])
def test_the_edges_are_storable(value: Any) -> None:
    """The largest and smallest int64, floats at their edges and NUL inside a
    string value are accepted (only keys may not hold NUL)."""
    n = door({"message": "m", "v": value}, IdGenerator()())
    assert isinstance(n, Notification)
    assert same(n.extra["v"], value)
