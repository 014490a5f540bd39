"""run.py as an operator uses it: a real process, real signals, JSON logs on stdout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(ROOT / "run.py")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "test.yaml"
    path.write_text(
        "auth:\n  secret: run-test-secret-0123456789-0123456789\n"
        f"store:\n  data_dir: {tmp_path}\n"
        "logging:\n  format: json\n  metrics_interval: 0.2\n"
        "server:\n  test_routes: true\n" + extra
    )
    return path


def wait_http(url: str, timeout: float = 15) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                body: bytes = resp.read()
                return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_token_command_prints_a_signed_token(tmp_path: Path) -> None:
    """`run.py token USER --role --ttl` prints a token signed with the configured secret."""
    cfg = write_config(tmp_path)
    out = subprocess.run(
        [*RUN, "token", "alice", "--role", "publisher", "--ttl", "120", "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    claims = jwt.decode(out, "run-test-secret-0123456789-0123456789", algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["role"] == "publisher"
    assert 100 < claims["exp"] - time.time() <= 120


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    """A bad key stops start-up with one message naming it, and status 2."""
    cfg = write_config(tmp_path, "  prot: 1\n")
    proc = subprocess.run([*RUN, "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "server.prot: unknown key" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_prod_without_secret_exits_2(tmp_path: Path) -> None:
    """prod.yaml without RTSERVER_SECRET refuses to start."""
    env = {k: v for k, v in os.environ.items() if k != "RTSERVER_SECRET"}
    proc = subprocess.run(
        [*RUN, "--config", str(ROOT / "config" / "prod.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 2 and "RTSERVER_SECRET" in proc.stderr


def test_serves_logs_json_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """--port overrides the config; every stdout line is JSON (Tornado's access log
    and the periodic metrics event included); SIGTERM exits 0."""
    port = free_port()
    cfg = write_config(tmp_path)
    proc = subprocess.Popen(
        [*RUN, "--config", str(cfg), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert json.loads(wait_http(f"http://127.0.0.1:{port}/healthz")) == {"status": "ok"}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/test/notification/u1",
            data=b'{"message": "hello"}',
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 201
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    events = [(e.get("logger"), e["event"]) for e in lines]
    assert ("rtserver", "server.listening") in events
    assert ("tornado.access", "http.request") in events
    assert ("rtserver", "metrics.snapshot") in events
    assert events[-1] == ("rtserver", "server.stopped")
    assert all("timestamp" in e and "level" in e for e in lines)
    assert (tmp_path / "rtserver.db").exists()
