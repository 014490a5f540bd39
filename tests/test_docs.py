"""Docs that must not drift from the code: metrics and config keys."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from rtserver.config import Config
from rtserver.metrics import Metrics

from .processes import ServerProcess
from .test_run import free_port

ROOT = Path(__file__).resolve().parent.parent


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_names() -> set[str]:
    """Every series name Prometheus sees, labelled or not."""
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in SUFFIXES[family.type]
    }


def test_every_metric_is_in_operations_md() -> None:
    """docs/operations.md describes every exported metric family."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    for family in Metrics().registry.collect():
        documented = family.name in doc or f"{family.name}_total" in doc
        assert documented, f"{family.name} is not documented"


def test_grafana_dashboard_uses_only_real_metrics() -> None:
    """Every metric a dashboard panel queries is one rtserver exports."""
    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    known = exported_names()
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"rtserver_[a-z_]+", target["expr"]))
    assert used
    assert used <= known, used - known


def test_security_md_names_real_limit_keys() -> None:
    """Every limits.* key docs/security.md mentions exists in the config."""
    doc = (ROOT / "docs" / "security.md").read_text()
    keys = {f.name for f in msgspec.structs.fields(Config().limits)}
    mentioned = set(re.findall(r"limits\.([a-z_]+)", doc))
    assert mentioned and mentioned <= keys, mentioned - keys


def readme_block(language: str, containing: str) -> str:
    """The README's ``language`` code block that contains ``containing``."""
    text = (ROOT / "README.md").read_text()
    blocks: list[str] = re.findall(rf"```{language}\n(.*?)```", text, re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_readme_tour_runs_as_written(tmp_path: Path) -> None:
    """README's "Try it" shell block, then its Python client example, run by
    bash against a real ``python run.py`` on the development config (another
    port and data directory, so it cannot meet a server already running)."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    port = free_port()
    config = tmp_path / "default.yaml"
    config.write_text(
        (ROOT / "config" / "default.yaml")
        .read_text()
        .replace("data_dir: data", f"data_dir: {tmp_path / 'data'}")
    )
    server = ServerProcess(config, port)
    server.start()
    try:
        shell = readme_block("bash", "run.py token user123")
        python = readme_block("python", "Client.connect")
        script = f"{shell}\npython - <<'PY'\n{python}PY\n".replace("8888", str(port))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    # curl prints each answer without a newline, so the client's lines follow them.
    assert done.stdout.count('"delivered":0}') == 2  # nobody was connected: both stored
    assert done.stdout.endswith("unread: 2\nTest notification None\n")  # the oldest first


def test_readme_embedding_example_runs_as_written(tmp_path: Path) -> None:
    """README's Python API example, run from a directory holding the
    development config (its SQLite file goes there, not into the checkout)."""
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config" / "default.yaml", tmp_path / "config" / "default.yaml")
    done = subprocess.run(
        [sys.executable, "-c", readme_block("python", "make_app(load_config")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # Its own lines, among the log lines (structlog's console format: no
    # logging was configured).
    printed = [line for line in done.stdout.splitlines() if not line.startswith("20")]
    assert printed[:2] == ["2 unread; 0 sessions", "0 connections"]
    assert printed[2].startswith("sent from a thread: ")
    assert (tmp_path / "data" / "rtserver.db").exists()
