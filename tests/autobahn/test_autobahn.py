"""WebSocket conformance: the Autobahn|Testsuite fuzzing client (the suite
Tornado and websockets are tested with) against rtserver's own RFC 6455 code
and against Tornado's, each with message handling replaced by echo
(``echo_server``). Cases 1-7 (framing, pings, reserved bits, opcodes,
fragmentation, UTF-8, closing) and 9-10 (big messages, many frames); 12-13
test compression, which rtserver does not offer.

The suite needs Python 2.7 (``pip install autobahntestsuite`` there;
``.ci/run`` installs it where a Python 2.7 exists); without its ``wstest``
this is skipped, saying so. ``RTSERVER_WSTEST`` names a ``wstest`` to use.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..test_run import ROOT, free_port

pytestmark = pytest.mark.slow

CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]
PASSING = {"OK", "INFORMATIONAL"}
#: Tornado reads whole frames and checks a text message's UTF-8 once it is
#: complete, so invalid UTF-8 in a message's first fragments is refused
#: (1007) at its end: "NON-STRICT", not "OK". rtserver's own code fails
#: at the first bad byte.
TORNADO_LATE_UTF8 = {"6.4.1", "6.4.2", "6.4.3", "6.4.4"}


def wstest() -> str | None:
    found = os.environ.get("RTSERVER_WSTEST")
    if found:
        return found
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for candidate in sorted(glob.glob(f"{pyenv}/versions/2.7*/bin/wstest")):
        return candidate
    return shutil.which("wstest")


@pytest.fixture
def echo_servers(tmp_path: Path) -> Iterator[dict[str, int]]:
    ports = {"rtserver": free_port(), "tornado": free_port()}
    procs = []
    try:
        for mode, port in ports.items():
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.autobahn.echo_server",
                    str(port),
                    mode,
                    str(tmp_path / mode),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        yield ports
    finally:
        logged = ""
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                logged += proc.stdout.read()
                proc.stdout.close()
        # Nothing a fuzzing client sends is an error on the server's side.
        assert '"level":"error"' not in logged, logged[:2000]


def test_autobahn_fuzzing_client(echo_servers: dict[str, int], tmp_path: Path) -> None:
    client = wstest()
    if client is None:
        pytest.skip(
            "Autobahn|Testsuite not installed: it needs Python 2.7 "
            "(python2.7 -m pip install autobahntestsuite), or set RTSERVER_WSTEST"
        )
    spec = {
        "outdir": str(tmp_path / "reports"),
        "servers": [
            {"agent": mode, "url": f"ws://127.0.0.1:{port}/ws"}
            for mode, port in echo_servers.items()
        ],
        "cases": CASES,
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    subprocess.run(
        [client, "-m", "fuzzingclient", "-s", str(tmp_path / "spec.json")],
        cwd=tmp_path,
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=600,
    )
    results = json.loads((tmp_path / "reports" / "index.json").read_text())
    for mode in echo_servers:
        cases = results[mode]
        assert len(cases) == 301, mode
        allowed = TORNADO_LATE_UTF8 if mode == "tornado" else set()
        failed = {
            case: (r["behavior"], r["behaviorClose"])
            for case, r in cases.items()
            if not (
                {r["behavior"], r["behaviorClose"]} <= PASSING
                or (
                    case in allowed and r["behavior"] == "NON-STRICT" and r["behaviorClose"] == "OK"
                )
            )
        }
        assert failed == {}, mode
