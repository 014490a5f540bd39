"""docs/operations.md's config examples, each checked by its own tool
(``systemd-analyze verify``, ``nginx -t``, ``promtool check config``) as a
reader would copy them; only the paths of this machine are put in. Each is
skipped, saying so, where its tool is not installed (``.ci/run`` installs them)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from tornado.httpclient import AsyncHTTPClient

from rtserver.auth import Authenticator
from rtserver.client import Client, ClientError
from rtserver.config import AuthConfig

from .processes import ServerProcess
from .security.test_attacks import self_signed
from .security.test_edge import SECRET, write_config
from .test_docs import ROOT
from .test_run import free_port

DOC = (ROOT / "docs" / "operations.md").read_text()


def block(language: str, containing: str) -> str:
    blocks: list[str] = re.findall(rf"```{language}\n(.*?)```", DOC, re.S)
    (found,) = [b for b in blocks if containing in b]
    return found


def tool(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def check(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_systemd_unit(tmp_path: Path) -> None:
    unit = block("ini", "[Service]")
    unit = unit.replace("/opt/rtserver/venv/bin/python", sys.executable)
    unit = unit.replace("WorkingDirectory=/opt/rtserver", f"WorkingDirectory={ROOT}")
    path = tmp_path / "rtserver.service"
    path.write_text(unit)
    output = check([tool("systemd-analyze"), "verify", str(path)])
    assert "ignoring" not in output and "Failed" not in output, output


def test_nginx_site(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    site = block("nginx", "proxy_pass")
    site = site.replace("/etc/ssl/rtserver/fullchain.pem", cert)
    site = site.replace("/etc/ssl/rtserver/privkey.pem", key)
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"pid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\n"
        f"events {{}}\nhttp {{\naccess_log off;\n{site}}}\n"
    )
    output = check([tool("nginx"), "-t", "-q", "-p", str(tmp_path), "-c", str(conf)])
    assert "warn" not in output, output


def test_prometheus_scrape_config(tmp_path: Path) -> None:
    token = tmp_path / "rtserver.token"
    token.write_text("a-token\n")
    config = block("yaml", "scrape_configs").replace("/etc/prometheus/rtserver.token", str(token))
    path = tmp_path / "prometheus.yml"
    path.write_text(config)
    check([tool("promtool"), "check", "config", str(path)])


def test_every_grafana_panel_returns_a_series(tmp_path: Path) -> None:
    """A real Prometheus scrapes a real server (``server.metrics_port``) that has
    served some traffic; every expression of the Grafana dashboard returns at
    least one series."""
    prometheus = tool("prometheus")
    metrics_port, prom_port = free_port(), free_port()
    config = write_config(tmp_path, f"  metrics_port: {metrics_port}\n")
    server = ServerProcess(config)
    server.start()
    scrape = tmp_path / "prometheus.yml"
    scrape.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: rtserver\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    with (tmp_path / "prometheus.log").open("wb") as out:
        prom = subprocess.Popen(
            [
                prometheus,
                f"--config.file={scrape}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        asyncio.run(traffic(server.port))
        base = f"http://127.0.0.1:{prom_port}/api/v1/query?query="
        deadline = time.monotonic() + 30
        while True:  # until a minute's window holds a few scrapes after the traffic
            try:
                found = query(base + quote("count_over_time(rtserver_notifications_total[1m])"))
            except OSError:
                found = []
            if found and float(found[0]["value"][1]) >= 4:
                break
            assert time.monotonic() < deadline, "Prometheus did not scrape the server"
            time.sleep(0.5)
        dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
        empty = [
            target["expr"]
            for panel in dashboard["panels"]
            for target in panel.get("targets", [])
            if not query(base + quote(target["expr"]))
        ]
        assert empty == []
    finally:
        prom.terminate()
        prom.wait(30)
        server.stop()


def query(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        answer = json.loads(resp.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]  # type: ignore[no-any-return]


async def traffic(port: int) -> None:
    """A session, notifications to it, a broadcast and a bad frame."""
    auth = Authenticator(AuthConfig(secret=SECRET))
    client = await Client.connect(f"ws://127.0.0.1:{port}/ws")
    await client.register(auth.mint("u1"))
    with pytest.raises(ClientError):
        await client.request("no_such_event", {})
    publisher = {"Authorization": f"Bearer {auth.mint('svc', 'publisher')}"}
    http = AsyncHTTPClient()
    for _ in range(3):
        await http.fetch(
            f"http://127.0.0.1:{port}/api/notifications/u1",
            method="POST",
            body=json.dumps({"message": "hi"}),
            headers=publisher,
        )
        await client.next("notification")
    await http.fetch(
        f"http://127.0.0.1:{port}/api/broadcast",
        method="POST",
        body=json.dumps({"message": "all"}),
        headers={"Authorization": f"Bearer {auth.mint('ops', 'admin')}"},
    )
    await client.next("notification")
    await client.close()
