"""run.py as a real process, for tests that restart or kill servers."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from .test_run import RUN, free_port, wait_http


class ServerProcess:
    """``python run.py --config CONFIG --port PORT``, started, stopped (SIGTERM)
    or killed (SIGKILL) at will, always on the same port and data. With
    ``log``, its JSON log lines are appended there (``events`` reads them)."""

    def __init__(self, config: Path, port: int | None = None, log: Path | None = None) -> None:
        self.config = config
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/ws"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        #: The exit status of the last process stopped or killed.
        self.returncode: int | None = None

    def start(self) -> None:
        out = subprocess.DEVNULL if self.log is None else self.log.open("ab")
        try:
            self.proc = subprocess.Popen(
                [*RUN, "--config", str(self.config), "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT if self.log is not None else subprocess.DEVNULL,
            )
        finally:
            if self.log is not None:
                out.close()  # type: ignore[union-attr]
        wait_http(f"{self.base}/healthz")

    def stop(self) -> None:
        """Graceful: SIGTERM, then wait for exit."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """A crash: SIGKILL."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.returncode = self.proc.wait(30)
        self.proc = None

    def events(self, name: str) -> list[dict[str, Any]]:
        """The logged events called ``name``, oldest first."""
        if self.log is None or not self.log.exists():
            return []
        found = []
        for line in self.log.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
        return found
