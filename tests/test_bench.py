"""The benchmark harness itself (``python -m bench``), at toy sizes: it is run by
hand, so these keep it from rotting. Real processes: the C load generator built
with gcc, rtserver from ``bench/server.py``, loopback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.__main__ import build_loadgen, churn, per_user, raw_limit

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None, reason="gcc builds the load generator (apt-get install gcc)"
)


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_loadgen(tmp_path_factory.mktemp("loadgen"))


@pytest.mark.parametrize("random_order", [False, True])
def test_the_raw_limit_counts_every_frame_sent(loadgen: Path, random_order: bool) -> None:
    """The C server sends every frame, round-robin or at random, and the client counts each."""
    result = raw_limit(loadgen, 20, 2_000, random_order=random_order)
    assert result["sent"] == result["received"] == 2_000
    assert result["rate"] > 0


@pytest.mark.parametrize("kind", ["rtserver", "rtserver-unwritten"])
def test_per_user_sends_arrive_stored_or_not(loadgen: Path, tmp_path: Path, kind: str) -> None:
    """Every per-user send reaches its client; the diagnostic run writes no row."""
    result = per_user(loadgen, tmp_path, users=50, count=1_000, batch=100, kind=kind)
    assert result["received"] == 1_000
    assert result["rate"] > 0
    assert result["stored"] == (1_000 if kind == "rtserver" else 0)
    assert not list(tmp_path.glob("*/rtserver.db"))  # removed with its server


def test_per_user_sends_on_a_store_with_history(loadgen: Path, tmp_path: Path) -> None:
    """The history row starts the server on the pre-filled file and adds every send to it."""
    result = per_user(loadgen, tmp_path, users=50, count=1_000, batch=100, held=2_000)
    assert result["received"] == 1_000
    assert result["stored"] == 3_000


def test_churn_reads_memory_after_each_wave(loadgen: Path, tmp_path: Path) -> None:
    """Each wave is opened, registered and dropped; RSS is read with it open and gone."""
    result = churn(loadgen, tmp_path, waves=3, per_wave=200)
    assert len(result["closed_mb"]) == 3
    assert 10 < result["first_closed_mb"] <= result["max_open_mb"] + 5
    assert result["growth"] == result["last_closed_mb"] / result["first_closed_mb"] - 1
