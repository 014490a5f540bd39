"""The edge under pressure: ping floods, running out of descriptors,
oversized bodies and start-up failures, each against a real server (a real
``run.py`` process where memory, descriptors or the exit status are what is
measured)."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tornado.websocket import websocket_connect

from rtserver.auth import Authenticator
from rtserver.config import AuthConfig

from ..conftest import StartServer
from ..processes import ServerProcess
from ..rawws import RawWebSocket, encode_frame
from ..test_run import ROOT, RUN, free_port, wait_http

SECRET = "edge-test-secret-0123456789-0123456789"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in ticks


def write_config(tmp_path: Path, server: str = "", limits: str = "", store: str = "") -> Path:
    path = tmp_path / "edge.yaml"
    path.write_text(
        f"auth:\n  secret: {SECRET}\n"
        f"store:\n  data_dir: {tmp_path / 'data'}\n{store}"
        "logging:\n  format: json\n  metrics_interval: 0\n"
        f"server:\n  ping_interval: 0\n{server}"
        f"limits:\n  connections_per_second: 100000\n{limits}"
    )
    return path


class TestPingFlood:
    @pytest.mark.parametrize("websocket", ["rtserver", "tornado"])
    async def test_flood_is_closed_1008_and_nobody_else_notices(
        self, start_server: StartServer, websocket: str
    ) -> None:
        """Pings count toward the frame rate (default 50/s, burst 100): 300
        at once close the connection with 1008, before login too; a
        registered client on the same server gets its notification."""
        server = await start_server(server={"websocket": websocket})
        bystander = await server.user("bystander")
        raw = await RawWebSocket.open(server.port)
        raw.writer.write(b"".join(encode_frame(0x9, b"p" * 125) for _ in range(300)))
        pongs = 0
        while True:
            opcode, payload = await raw.frame()
            if opcode != 0xA:
                break
            pongs += 1
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1008
        assert payload[2:] == b"too many frames; slow down"
        assert 90 <= pongs <= 150  # the burst of 100, and what refills meanwhile (50/s)
        raw.close()
        sent = await server.hub.send_notification("bystander", {"message": "still here"})
        pushed = await bystander.next("notification")
        assert pushed["id"] == sent.notification.id

    def test_unread_pongs_are_bounded(self, tmp_path: Path) -> None:
        """With no frame rate limit, a peer that sends 40 MB of pings and reads
        nothing is closed as a slow client once its pongs pass
        ``server.max_outbound_bytes`` (1 MiB here); the server's memory
        stays within a few MB (it grew by the whole 40 MB before)."""
        config = write_config(
            tmp_path,
            server="  max_outbound_bytes: 1048576\n",
            limits="  frames_per_second: 1000000000\n  frame_burst: 1000000000\n",
        )
        proc = ServerProcess(config, log=tmp_path / "server.log")
        proc.start()
        try:
            assert proc.proc is not None
            pid = proc.proc.pid
            before = rss_kib(pid)
            sent = asyncio.run(flood_pings(proc.port, 40 * 1024 * 1024))
            growth_mib = (rss_kib(pid) - before) / 1024
            assert sent >= 2 * 1024 * 1024  # the flood got well past the bound
            assert growth_mib < 8, f"RSS grew {growth_mib:.1f} MiB"
            assert len(proc.events("connection.slow_client")) == 1
            (closed,) = proc.events("connection.closed")
            assert closed["reason"] == "slow client: outbound queue full"
        finally:
            proc.stop()


async def flood_pings(port: int, total: int) -> int:
    """Send up to ``total`` bytes of 125-byte pings (20 s at most) without
    reading; the bytes the server took."""
    raw = await RawWebSocket.open(port, rcvbuf=4096)
    chunk = b"".join(encode_frame(0x9, b"p" * 125) for _ in range(1000))
    sent = 0
    deadline = time.monotonic() + 20
    try:
        while sent < total and time.monotonic() < deadline:
            raw.writer.write(chunk)
            await asyncio.wait_for(raw.writer.drain(), 10)
            sent += len(chunk)
    except (ConnectionError, TimeoutError):
        pass  # closed by the server (after its close frame and timeout)
    await asyncio.sleep(0.5)
    raw.close()
    return sent


def test_out_of_descriptors(tmp_path: Path) -> None:
    """Open-files limit 64 and 150 idle connections: the server does not
    spin (under 0.6 s of CPU in 3 s) or write a traceback per attempt (one
    ``server.accept_paused`` warning per 10 s); idle connections are closed
    after ``server.handshake_timeout``, so a real user gets in while they
    are all still open on the attacker's side."""
    config = write_config(tmp_path, server="  handshake_timeout: 1\n")
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [*RUN, "--config", str(config), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)),
        )
    idle: list[socket.socket] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        for _ in range(150):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        cpu = cpu_seconds(proc.pid)
        time.sleep(3)
        assert cpu_seconds(proc.pid) - cpu < 0.6
        token = Authenticator(AuthConfig(secret=SECRET)).mint("real-user")
        started = time.monotonic()
        ack = asyncio.run(register(port, token))
        assert ack["event"] == "ack" and ack["data"]["user_id"] == "real-user"
        assert time.monotonic() - started < 15
    finally:
        for sock in idle:
            sock.close()
        proc.terminate()
        proc.wait(30)
    lines = log_path.read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    paused = [e for e in events if e["event"] == "server.accept_paused"]
    assert 1 <= len(paused) <= 2 and paused[0]["error"] == "EMFILE"
    assert not [e for e in events if e.get("level") in ("error", "critical")]
    assert "Traceback" not in log_path.read_text()


async def register(port: int, token: str) -> dict[str, Any]:
    ws = await asyncio.wait_for(websocket_connect(f"ws://127.0.0.1:{port}/ws"), 15)
    try:
        await ws.write_message(json.dumps({"event": "register", "id": 1, "data": {"token": token}}))
        reply = await asyncio.wait_for(ws.read_message(), 10)
        assert isinstance(reply, str)
        return json.loads(reply)  # type: ignore[no-any-return]
    finally:
        ws.close()


async def test_oversized_body_is_413_naming_the_limit(start_server: StartServer) -> None:
    """A body over ``server.max_body_bytes`` is answered 413 before it is read
    (the limit in the message), and the client reads the whole answer."""
    server = await start_server(server={"max_body_bytes": 1000})
    token = server.token("svc", "publisher")
    body = json.dumps({"message": "x" * 5000}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /api/notifications/u1 HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert json.loads(payload) == {
        "error": {"code": "too_large", "message": "the request body is over 1000 bytes"}
    }
    status, _ = await server.http("POST", "/api/notifications/u1", {"message": "ok"}, token=token)
    assert status == 201  # and within the limit all is as before


class TestStartupFailures:
    """Each is one line on stderr naming what failed and what to do, exit 2."""

    def run(self, config: Path, port: int | None = None, before: str = "") -> str:
        """run.py's stderr line; ``before``: Python run first in its process."""
        args = ["run.py", "--config", str(config), "--port", str(port or free_port())]
        script = (
            f"import runpy, sys; {before or 'pass'}; sys.argv = {args!r};"
            " runpy.run_path('run.py', run_name='__main__')"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rtserver: "), done.stderr
        return lines[0]

    def test_port_in_use(self, tmp_path: Path) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            line = self.run(write_config(tmp_path), port)
        assert f"server.port: cannot listen on 127.0.0.1:{port}: Address already in use" in line
        assert "choose another port" in line

    def test_data_dir_cannot_be_created(self, tmp_path: Path) -> None:
        (tmp_path / "data").write_text("a file where the directory should be")
        line = self.run(write_config(tmp_path))
        assert f"store.data_dir: cannot write in {tmp_path / 'data'}: File exists" in line

    def test_pymongo_missing(self, tmp_path: Path) -> None:
        config = write_config(tmp_path, store="  backend: mongodb\n  uri: mongodb://127.0.0.1:1\n")
        line = self.run(config, before="sys.modules['pymongo'] = None")
        assert "store.backend: mongodb needs the pymongo package" in line
        assert "pip install -e '.[mongodb]'" in line

    def test_certificate_cannot_be_loaded(self, tmp_path: Path) -> None:
        line = self.run(write_config(tmp_path, f"  tls_cert: {tmp_path / 'missing.pem'}\n"))
        assert f"server.tls_cert: cannot load {tmp_path / 'missing.pem'}" in line

    def test_production_refuses_test_routes(self, tmp_path: Path) -> None:
        config = write_config(tmp_path, "  environment: production\n  test_routes: true\n")
        assert "server.test_routes: refused in production" in self.run(config)
