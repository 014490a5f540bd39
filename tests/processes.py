"""run.py as a real process, for tests that restart or kill servers."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from .test_run import RUN, free_port, wait_http


class ServerProcess:
    """``python run.py --config CONFIG --port PORT``, started, stopped (SIGTERM)
    or killed (SIGKILL) at will, always on the same port and data."""

    def __init__(self, config: Path, port: int | None = None) -> None:
        self.config = config
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/ws"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*RUN, "--config", str(self.config), "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
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
            self.proc.wait(20)
        self.proc = None
