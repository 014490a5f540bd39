"""A real MongoDB wire-protocol server for tests: nx-27017 (PyPI), which keeps
its data in SQLite. No MongoDB server exists on these machines; where
nx-27017 differs from MongoDB, the tests that depend on it say so."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NxServer:
    """Start, stop (kill) and restart an nx-27017 process on a loopback port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def command(self) -> list[str]:
        exe = shutil.which("nx-27017")
        base = [exe] if exe else [sys.executable, "-m", "nx_27017.nx_27017"]
        return [
            *base,
            "--db",
            str(self.workdir / "nx.db"),
            "--host",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--log-file",
            str(self.workdir / "nx.log"),
            "--pid-file",
            str(self.workdir / "nx.pid"),
        ]

    def start(self, timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while True:
            client: MongoClient[dict[str, object]] = MongoClient(
                self.uri, serverSelectionTimeoutMS=300
            )
            try:
                client.admin.command("ping")
                return
            except PyMongoError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"nx-27017 did not start; see {self.workdir / 'nx.log'}"
                    ) from None
                time.sleep(0.1)
            finally:
                client.close()

    def stop(self) -> None:
        """Kill the server abruptly, as a crash or a network cut would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
