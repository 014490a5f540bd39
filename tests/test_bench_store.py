"""The store benchmark (``python -m bench.store``) at toy sizes, on a real SQLite
file and on nx-27017 over the real driver: every row it fills and times is
stored, and the figures it prints come from the run."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from pymongo import MongoClient

from bench.store import measure

from .mongo_support import NxServer, pymongo_orphan_sockets  # noqa: F401 (autouse)


@pytest.mark.parametrize("delivered", [True, False])
async def test_sqlite_holds_the_filled_and_the_timed_rows(tmp_path: Path, delivered: bool) -> None:
    """The file holds the rows filled plus the rows timed, delivered or not as asked."""
    result = await measure(tmp_path, held=3_000, rows=1_500, delivered=delivered)
    with closing(sqlite3.connect(tmp_path / "rtserver.db")) as db:
        (total,) = db.execute("SELECT count(*) FROM notifications").fetchone()
        (waiting,) = db.execute(
            "SELECT count(*) FROM notifications WHERE delivered_at IS NULL"
        ).fetchone()
    assert total == 4_500
    assert waiting == (0 if delivered else 1_500)
    assert result["held"] == 3_000 and result["rows"] == 1_500
    assert result["rate"] > 0 and result["bytes"] > 0 and result["file_mb"] > 0


async def test_mongodb_holds_the_filled_and_the_timed_rows(tmp_path: Path, nx: NxServer) -> None:
    """Against a MongoDB wire server, the bench's database holds every row."""
    result = await measure(tmp_path, held=600, rows=400, delivered=False, mongodb_uri=nx.uri)
    client: MongoClient[dict[str, object]] = MongoClient(nx.uri)
    try:
        coll = client["rtbench"]["notifications"]
        assert coll.count_documents({}) == 1_000
        assert coll.count_documents({"delivered": False}) == 400
    finally:
        client.close()
    assert result["rate"] > 0


def test_the_command_prints_a_row_per_size_and_kind(tmp_path: Path) -> None:
    """``python -m bench.store`` prints the header and one row per size and kind."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.store", "--held", "0,1000", "--rows", "500", "--cpu", "-1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    lines = out.splitlines()
    assert lines[0].startswith("sqlite: 500 rows")
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("0", "delivered"),
        ("0", "undelivered"),
        ("1,000", "delivered"),
        ("1,000", "undelivered"),
    ]
