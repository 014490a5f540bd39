"""docs/operations.md's config examples, each checked by its own tool
(``systemd-analyze verify``, ``nginx -t``, ``promtool check config``) as a
reader would copy them; only the paths of this machine are put in. Each is
skipped, saying so, where its tool is not installed (``.ci/run`` installs them)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .security.test_attacks import self_signed
from .test_docs import ROOT

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
