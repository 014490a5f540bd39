"""Run the benchmark and print a table:  python -m bench [--quick]

Every figure is measured in this run, side by side: rtserver, stock Tornado
(``write_message(json.dumps(...))`` per client) and the raw ``send()`` limit of
the same core. The server is pinned to CPU 0, the C load generator
(``bench/loadgen.c``, compiled here with gcc) and this harness's own HTTP
clients to CPU 1; both report their CPU share so they can be seen not to be
the bottleneck. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import jwt

from bench.store import prefill

HERE = Path(__file__).resolve().parent
SECRET = "bench-secret-0123456789-0123456789-abcdef"
SERVER_CPU, CLIENT_CPU = 0, 1 if (os.cpu_count() or 1) > 1 else 0


def raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pinned(cpu: int):  # type: ignore[no-untyped-def]
    def setup() -> None:
        raise_nofile()
        os.sched_setaffinity(0, {cpu})

    return setup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def build_loadgen(workdir: Path) -> Path:
    exe = workdir / "loadgen"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "loadgen.c")], check=True)
    return exe


def token_file(workdir: Path, n: int) -> Path:
    path = workdir / f"tokens-{n}.txt"
    if not path.exists():
        exp = int(time.time()) + 86400
        path.write_text(
            "\n".join(
                jwt.encode({"sub": f"u{i}", "exp": exp, "topics": ["bench"]}, SECRET, "HS256")
                for i in range(n)
            )
            + "\n"
        )
    return path


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextmanager
def server(
    kind: str, workdir: Path, redis_url: str | None = None, data: str | None = None
) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    port = free_port()
    env = None
    if kind == "rtserver-tornado":  # /ws through Tornado's WebSocketHandler
        env = {**os.environ, "RTBENCH_WEBSOCKET": "tornado"}
    if kind == "rtserver-unwritten":  # a diagnostic: rows made, never written
        env = {**os.environ, "RTBENCH_STORE": "unwritten"}
    if kind == "rtserver-stalls":  # records the event loop's longest stall
        env = {**os.environ, "RTBENCH_STALLS": "1"}
    made = None  # a data directory made here, removed with the server
    if kind.startswith("rtserver"):
        if data is None:
            data = made = tempfile.mkdtemp(dir=workdir)
        cmd = [
            sys.executable,
            "-m",
            "bench.server",
            str(port),
            data,
            SECRET,
            *([redis_url] if redis_url else []),
        ]
    else:
        cmd = [sys.executable, "-m", "bench.stock", str(port)]
    proc = subprocess.Popen(
        cmd,
        cwd=HERE.parent,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=pinned(SERVER_CPU),
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    try:
        yield port, proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        if made is not None:
            # At once: the kernel would otherwise write this run's files back
            # to disk during the next measurement.
            shutil.rmtree(made, ignore_errors=True)


def start_client(loadgen: Path, args: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [str(loadgen), *args],
        stdin=subprocess.PIPE,  # closed by ``finish``: the clients then disconnect
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=pinned(CLIENT_CPU),
    )
    assert proc.stderr is not None
    line = proc.stderr.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"load generator failed: {line} {proc.stderr.read()}")
    return proc


def ws_clients(
    loadgen: Path, port: int, n: int, tokens: Path, expect: Any, timeout: Any
) -> subprocess.Popen[str]:
    """n registered WebSocket clients that count notifications until ``expect``."""
    return start_client(
        loadgen, ["client", "127.0.0.1", str(port), str(n), str(tokens), str(expect), str(timeout)]
    )


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=300)
    return json.loads(out)  # type: ignore[no-any-return]


def post(port: int, path: str, body: Any, token: str | None = None) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST", path, json.dumps(body), headers)
    resp = conn.getresponse()
    data = json.loads(resp.read() or b"{}")
    conn.close()
    return data  # type: ignore[no-any-return]


def fanout(kind: str, loadgen: Path, workdir: Path, n: int, total: int) -> dict[str, Any]:
    """Broadcasts to n registered clients until about ``total`` deliveries."""
    count = max(1, total // n)
    with server(kind, workdir) as (port, _):
        client = ws_clients(loadgen, port, n, token_file(workdir, n), count * n, "120")
        post(port, "/bench/broadcast", {"count": count, "size": 150})
        return finish(client)


@contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server on the client core; yields its URL."""
    redis_bin = shutil.which("redis-server")
    assert redis_bin is not None
    rport = free_port()
    redis = subprocess.Popen(
        [
            redis_bin,
            "--port",
            str(rport),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        preexec_fn=pinned(CLIENT_CPU),
    )
    time.sleep(0.5)
    try:
        yield f"redis://127.0.0.1:{rport}/0"
    finally:
        redis.kill()
        redis.wait()


def topic_fanout(loadgen: Path, workdir: Path, n: int, total: int) -> dict[str, Any]:
    """One topic with n subscribers: publications (each stored in the topic's
    history first) until about ``total`` deliveries."""
    count = max(1, total // n)
    with server("rtserver", workdir) as (port, _):
        client = ws_clients(loadgen, port, n, token_file(workdir, n), count * n, "120")
        assert post(port, "/bench/subscribe_all", {"topic": "bench"})["subscribed"] == n
        post(port, "/bench/topic", {"topic": "bench", "count": count, "size": 150})
        return finish(client)


def cluster_fanout(loadgen: Path, workdir: Path, n: int, total: int) -> dict[str, Any]:
    """Two rtserver nodes on the server core, n/2 clients on each, broadcasts
    sent to node A reach node B's clients through Redis (on the client core)."""
    if shutil.which("redis-server") is None:
        return {"rate": 0.0, "skipped": "redis-server not installed"}
    data = tempfile.mkdtemp(dir=workdir)
    count = max(1, total // n)
    half = n // 2
    tokens = token_file(workdir, n)
    second_half = workdir / f"tokens-{n}-b.txt"
    second_half.write_text("".join(tokens.read_text().splitlines(keepends=True)[half:]))
    try:
        with (
            redis_server() as url,
            server("rtserver", workdir, url, data) as (pa, _),
            server("rtserver", workdir, url, data) as (pb, _),
        ):
            ca = ws_clients(loadgen, pa, half, tokens, count * half, "120")
            cb = ws_clients(loadgen, pb, n - half, second_half, count * (n - half), "120")
            time.sleep(1.0)  # subscriptions settle
            post(pa, "/bench/broadcast", {"count": count, "size": 150})
            ra, rb = finish(ca), finish(cb)
            span = max(ra["seconds"], rb["seconds"]) or 1.0
            return {
                "rate": (ra["received"] + rb["received"]) / span,
                "received": ra["received"] + rb["received"],
                "expected": count * n,
            }
    finally:
        shutil.rmtree(data, ignore_errors=True)


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cluster_routing(loadgen: Path, workdir: Path, sessions: int, count: int) -> dict[str, Any]:
    """Direct messages to one session on node A, ``sessions`` registered there
    in all: through node B (one publish to A's channel, one answer back) and
    to A itself, each POST answered before the next; B's CPU per message;
    A's longest event-loop stall over idle heartbeats; A's keys in Redis."""
    from rtserver.client import Client
    from rtserver.resp import Redis

    if shutil.which("redis-server") is None:
        return {"skipped": "redis-server not installed"}
    data = tempfile.mkdtemp(dir=workdir)
    publisher = jwt.encode(
        {"sub": "svc", "role": "publisher", "exp": int(time.time()) + 3600}, SECRET, "HS256"
    )
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {publisher}"}
    loop = asyncio.new_event_loop()
    reader = threading.Thread(target=loop.run_forever, daemon=True)
    reader.start()

    def call(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    def timed(port: int, session_id: str, n: int) -> list[float]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            conn.request(
                "POST", f"/api/sessions/{session_id}/messages", json.dumps({"i": i}), headers
            )
            resp = conn.getresponse()
            resp.read()
            times.append((time.perf_counter() - t0) * 1000)
            assert resp.status == 200, resp.status
        conn.close()
        return times

    try:
        with (
            redis_server() as url,
            server("rtserver-stalls", workdir, url, data) as (pa, _),
            server("rtserver", workdir, url, data) as (pb, proc_b),
        ):
            idle = ws_clients(
                loadgen, pa, sessions - 1, token_file(workdir, sessions - 1), 10**9, 600
            )
            target = call(Client.connect(f"ws://127.0.0.1:{pa}/ws"))
            token = jwt.encode({"sub": "target", "exp": int(time.time()) + 3600}, SECRET, "HS256")
            call(target.register(token, receipts=False))
            time.sleep(1.0)
            timed(pb, target.session_id, 100)  # warm up both paths
            timed(pa, target.session_id, 100)
            cpu_b = process_cpu(proc_b.pid)
            through = timed(pb, target.session_id, count)
            cpu_b = process_cpu(proc_b.pid) - cpu_b
            local = timed(pa, target.session_id, count)
            post(pa, "/bench/stall", {})
            time.sleep(5.0)  # five heartbeats or more, nothing else going on
            stall = post(pa, "/bench/stall", {})
            r = Redis(url)
            node_a = target.session_id.split(".")[0]
            keys = {
                "node_hash_kb": call(r.execute("MEMORY", "USAGE", f"rt:node:{node_a}")) / 1024,
                "sessions_in_redis": call(r.execute("HLEN", f"rt:node:{node_a}")),
                "nodes_zset_b": call(r.execute("MEMORY", "USAGE", "rt:nodes")),
                "metrics_hash_b": call(r.execute("MEMORY", "USAGE", "rt:metrics")),
            }
            loop.call_soon_threadsafe(r.close)
            call(target.close())
            idle.kill()  # idle until now: nothing to count
            idle.communicate()
            return {
                "through_p50": percentile(through, 0.5),
                "through_p99": percentile(through, 0.99),
                "local_p50": percentile(local, 0.5),
                "local_p99": percentile(local, 0.99),
                "b_cpu_ms": cpu_b * 1000 / count,
                "stall_ms": stall["longest_ms"],
                "beat_ms": stall["beat_ms"],
                **keys,
            }
    finally:
        loop.call_soon_threadsafe(loop.stop)
        reader.join(5)
        loop.close()
        shutil.rmtree(data, ignore_errors=True)


def raw_limit(loadgen: Path, n: int, total: int, *, random_order: bool = False) -> dict[str, Any]:
    """The core's own limit: a C server send()s pre-built frames, round-robin
    (as a broadcast goes) or each to a socket picked at random (as per-user
    sends go; each then lands on a cold socket)."""
    port = free_port()
    order = ["random"] if random_order else []
    srv = subprocess.Popen(
        [str(loadgen), "rawserver", str(port), str(n), str(total), "150", *order],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=pinned(SERVER_CPU),
    )
    assert srv.stderr is not None and srv.stderr.readline().strip() == "listening"
    client = start_client(loadgen, ["rawclient", "127.0.0.1", str(port), str(n), str(total), "120"])
    received = finish(client)
    sent = finish(srv)
    return {
        "rate": sent["rate"],
        "sent": sent["sent"],
        "received": received["received"],
        "received_rate": received["rate"],
        "client_cpu_share": received["client_cpu_share"],
    }


def connections(loadgen: Path, workdir: Path, n: int, kind: str = "rtserver") -> dict[str, Any]:
    """Open and register n connections; RSS per connection while they are open."""
    tokens = token_file(workdir, n)
    with server(kind, workdir) as (port, proc):
        time.sleep(0.5)
        before = rss_kb(proc.pid)
        t0 = time.perf_counter()
        client = ws_clients(loadgen, port, n, tokens, "0", "600")
        took = time.perf_counter() - t0
        time.sleep(1.0)
        after = rss_kb(proc.pid)
        client.kill()
        client.communicate()
        return {
            "n": n,
            "kb_per_connection": (after - before) / n,
            "accept_rate": n / took,
            "registered": n,
            "rss_mb": after / 1024,
        }


def churn(loadgen: Path, workdir: Path, waves: int, per_wave: int) -> dict[str, Any]:
    """Open and register ``per_wave`` connections, drop them, ``waves`` times:
    RSS with a wave open and after it is gone. The first wave's figures are
    the reference: it has made every one-time allocation."""
    tokens = token_file(workdir, per_wave)
    with server("rtserver", workdir) as (port, proc):
        open_mb, closed_mb = [], []
        for _ in range(waves):
            client = ws_clients(loadgen, port, per_wave, tokens, "0", "600")
            open_mb.append(rss_kb(proc.pid) / 1024)
            client.kill()
            client.communicate()
            time.sleep(1.5)  # the server notices every close
            closed_mb.append(rss_kb(proc.pid) / 1024)
        return {
            "first_open_mb": open_mb[0],
            "first_closed_mb": closed_mb[0],
            "last_closed_mb": closed_mb[-1],
            "max_open_mb": max(open_mb),
            "growth": closed_mb[-1] / closed_mb[0] - 1,
            "closed_mb": [round(r, 1) for r in closed_mb],
        }


def per_user(
    loadgen: Path,
    workdir: Path,
    users: int,
    count: int,
    batch: int,
    kind: str = "rtserver",
    held: int = 0,
) -> dict[str, Any]:
    """Per-user sends to ``users`` clients; with ``held``, the server starts on
    a store that already holds that many rows (the user names match).
    ``stored``: the rows in the file once the server has stopped."""
    data = tempfile.mkdtemp(dir=workdir)
    try:
        if held:
            prefill(Path(data), held)
        with server(kind, workdir, data=data) as (port, _):
            client = ws_clients(loadgen, port, users, token_file(workdir, users), count, "120")
            took = post(port, "/bench/send", {"count": count, "users": users, "batch": batch})[
                "seconds"
            ]
            result = finish(client)
        with closing(sqlite3.connect(Path(data) / "rtserver.db")) as db:
            (stored,) = db.execute("SELECT count(*) FROM notifications").fetchone()
    finally:
        shutil.rmtree(data, ignore_errors=True)
    return {
        "rate": count / took,
        "received": result["received"],
        "stored": stored,
        "client_rate": result["rate"],
        "client_cpu_share": result["client_cpu_share"],
    }


def http_publish(workdir: Path, connections_: int, batches: int, batch: int) -> dict[str, Any]:
    token = jwt.encode(
        {"sub": "svc", "role": "publisher", "exp": int(time.time()) + 3600},
        SECRET,
        algorithm="HS256",
    )
    with server("rtserver", workdir) as (port, _):
        body = json.dumps(
            [
                {"user_id": f"u{random.randrange(10000)}", "notification": {"message": "x" * 90}}
                for _ in range(batch)
            ]
        )
        single = json.dumps({"message": "x" * 90})
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}

        done = [0, 0, 0]

        def worker(path: str, payload: str, n: int, slot: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for _ in range(n):
                extra = {"Idempotency-Key": os.urandom(12).hex()} if slot == 2 else {}
                conn.request("POST", path, payload, {**headers, **extra})
                resp = conn.getresponse()
                resp.read()
                if resp.status == 201:
                    done[slot] += 1
            conn.close()

        def run(path: str, payload: str, n: int, slot: int) -> tuple[float, float]:
            """Seconds taken, and this process's CPU share meanwhile."""
            threads = [
                threading.Thread(target=worker, args=(path, payload, n, slot))
                for _ in range(connections_)
            ]
            t0, c0 = time.perf_counter(), cpu_seconds()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            took = time.perf_counter() - t0
            return took, (cpu_seconds() - c0) / took

        took, batch_cpu = run("/api/notifications", body, batches, 0)
        single_took, single_cpu = run("/api/notifications/u1", single, 500, 1)
        keyed_took, _ = run("/api/notifications", body, batches, 2)
        # The publisher library from one thread, as an app's worker sends:
        # the same batches through Publisher.send_notifications.
        from rtserver.publisher import Publisher

        rt = Publisher(f"http://127.0.0.1:{port}", token, max_batch=batch)
        items = [(item["user_id"], item["notification"]) for item in json.loads(body)]
        t0 = time.perf_counter()
        sent = len(rt.send_notifications(items * batches))  # one call, as many items
        publisher_took = time.perf_counter() - t0
        rt.close()
        return {
            "batch_rate": done[0] * batch / took,
            "single_rate": done[1] / single_took,
            "publisher_rate": sent / publisher_took,
            "keyed_rate": done[2] * batch / keyed_took,
            "client_cpu": (batch_cpu, single_cpu),
        }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def latency(loadgen: Path, workdir: Path, idle: int, rate: int, seconds: float) -> dict[str, Any]:
    """HTTP POST to WebSocket receipt, at ``rate`` POSTs a second, to u0 while
    ``idle`` other registered connections are open."""
    n = idle + 1
    token = jwt.encode(
        {"sub": "svc", "role": "publisher", "exp": int(time.time()) + 3600},
        SECRET,
        algorithm="HS256",
    )
    total = int(rate * seconds)
    with server("rtserver", workdir) as (port, _):
        client = ws_clients(loadgen, port, n, token_file(workdir, n), total, seconds + 30)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        start = time.perf_counter()
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            conn.request(
                "POST",
                "/api/notifications/u0",
                json.dumps({"message": "ping", "t": time.monotonic_ns()}),
                headers,
            )
            conn.getresponse().read()
        conn.close()
        return finish(client)["latency_ms"]  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller counts (a smoke run, about a minute)"
    )
    parser.add_argument(
        "--only",
        default="fanout,topic,cluster,routing,connections,churn,peruser,http,latency",
        help="comma-separated scenarios",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    if shutil.which("gcc") is None:
        sys.exit("bench: gcc is needed to build the load generator (apt-get install gcc)")
    raise_nofile()
    # The harness's own clients (HTTP publishing, the latency POSTs) run on the
    # load generator's core, never beside the server; servers re-pin themselves.
    os.sched_setaffinity(0, {CLIENT_CPU})
    scale = 0.1 if args.quick else 1.0
    workdir = Path(tempfile.mkdtemp(prefix="rtbench-"))
    loadgen = build_loadgen(workdir)
    rows: list[tuple[str, str, str, str]] = []
    print(
        f"machine: {os.cpu_count()} CPUs; server on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}",
        flush=True,
    )

    for n in (1000, 10000) if "fanout" in only else ():
        total = int(2_000_000 * scale)
        raw = raw_limit(loadgen, n, total)
        stock = fanout("stock", loadgen, workdir, n, int(total / 4))
        ours = fanout("rtserver", loadgen, workdir, n, total)
        rows.append(
            (
                f"broadcast fan-out, {n:,} clients (deliveries/s)",
                f"{ours['rate']:,.0f}",
                f"stock {stock['rate']:,.0f} ({ours['rate'] / stock['rate']:.1f}x); raw send() {raw['rate']:,.0f} ({ours['rate'] / raw['rate']:.0%})",
                f"{ours['client_cpu_share']:.0%} / {stock['client_cpu_share']:.0%} / {raw['client_cpu_share']:.0%}",
            )
        )
        print(rows[-1], flush=True)

    if "topic" in only:
        n = 10000
        total = int(2_000_000 * scale)
        broadcast = fanout("rtserver", loadgen, workdir, n, total)
        topic = topic_fanout(loadgen, workdir, n, total)
        rows.append(
            (
                f"topic fan-out, {n:,} subscribers of one topic (deliveries/s)",
                f"{topic['rate']:,.0f}",
                f"a broadcast to the same clients {broadcast['rate']:,.0f}"
                f" ({topic['rate'] / broadcast['rate']:.0%})",
                f"{topic['client_cpu_share']:.0%}",
            )
        )
        print(rows[-1], flush=True)

    if "cluster" in only:
        n = 10000
        total = int(1_000_000 * scale)
        one = fanout("rtserver", loadgen, workdir, n, total)
        two = cluster_fanout(loadgen, workdir, n, total)
        rows.append(
            (
                f"broadcast fan-out, {n:,} clients: 1 process vs 2 over Redis, same server core",
                f"{two['rate']:,.0f}",
                f"1 process {one['rate']:,.0f} ({two['rate'] / one['rate']:.0%}); received {two.get('received', 0):,} of {two.get('expected', 0):,}",
                "-",
            )
        )
        print(rows[-1], flush=True)

    if "routing" in only:
        figures = {
            n: cluster_routing(loadgen, workdir, n, int(2000 * max(scale, 0.25)))
            for n in (100, 15000)
        }
        for n, f in figures.items():
            if "skipped" in f:
                continue
            rows.append(
                (
                    f"direct message through another node, {n:,} sessions there, p50 / p99 (ms)",
                    f"{f['through_p50']:.2f} / {f['through_p99']:.2f}",
                    f"to the node itself {f['local_p50']:.2f} / {f['local_p99']:.2f}; "
                    f"sender's CPU {f['b_cpu_ms']:.2f} ms a message; target's heartbeat "
                    f"{f['beat_ms']:.2f} ms CPU, longest stall {f['stall_ms']:.2f} ms; its Redis hash {f['node_hash_kb']:.0f} KB "
                    f"({f['sessions_in_redis']:,} sessions)",
                    "-",
                )
            )
            print(rows[-1], flush=True)

    if "churn" in only:
        per_wave, waves = int(10000 * scale), 10 if args.quick else 30
        result = churn(loadgen, workdir, waves, per_wave)
        rows.append(
            (
                f"RSS after {waves} waves of {per_wave:,} connections opened, registered, dropped",
                f"{result['last_closed_mb']:.0f} MB ({result['growth']:+.0%})",
                f"after the first wave {result['first_closed_mb']:.0f} MB; with a wave open:"
                f" first {result['first_open_mb']:.0f} MB, highest {result['max_open_mb']:.0f} MB",
                "-",
            )
        )
        print(rows[-1], result["closed_mb"], flush=True)

    if "connections" in only:
        n = int(19000 * scale)
        conns = connections(loadgen, workdir, n)
        stock = connections(loadgen, workdir, n, "stock")
        # rtserver with /ws through Tornado's WebSocketHandler (TLS, server.websocket: tornado)
        via = connections(loadgen, workdir, n, "rtserver-tornado")
        rows.append(
            (
                f"connections open and registered ({conns['registered']:,})",
                f"{conns['kb_per_connection']:.1f} KB each",
                f"RSS {conns['rss_mb']:.0f} MB; stock {stock['kb_per_connection']:.1f} KB each; "
                f"via Tornado's WebSocketHandler {via['kb_per_connection']:.1f} KB",
                "-",
            )
        )
        rows.append(
            (
                "accept + register, 512 handshakes in flight (connections/s)",
                f"{conns['accept_rate']:,.0f}",
                f"stock {stock['accept_rate']:,.0f} ({conns['accept_rate'] / stock['accept_rate']:.0%}); "
                f"via Tornado's WebSocketHandler {via['accept_rate']:,.0f}",
                "-",
            )
        )
        print(rows[-1], flush=True)

    if "peruser" in only:
        count = int(200_000 * scale)
        stored: dict[int, dict[str, Any]] = {}
        for batch, how in ((1, "send_notification each"), (500, "send_notifications, 500 a call")):
            pu = stored[batch] = per_user(loadgen, workdir, 10000, count, batch)
            rows.append(
                (
                    f"per-user sends, 10,000 users, {how} (stored + delivered/s)",
                    f"{pu['rate']:,.0f}",
                    f"received {pu['received']:,} at {pu['client_rate']:,.0f}/s, "
                    f"stored {pu['stored']:,}",
                    f"{pu['client_cpu_share']:.0%}",
                )
            )
            print(rows[-1], flush=True)
        # Where the batched figure's time goes: the same core's raw send() to
        # random sockets, and the same run with SQLite's writes taken out.
        raw = raw_limit(loadgen, 10000, 2 * count, random_order=True)
        unwritten = per_user(loadgen, workdir, 10000, count, 500, "rtserver-unwritten")
        rows.append(
            (
                "  the same, 500 a call, rows not written (a diagnostic, not a mode)",
                f"{unwritten['rate']:,.0f}",
                f"stored, {stored[500]['rate'] / unwritten['rate']:.0%} of it; "
                f"raw send() to random sockets {raw['rate']:,.0f}",
                f"{unwritten['client_cpu_share']:.0%} / {raw['client_cpu_share']:.0%}",
            )
        )
        print(rows[-1], flush=True)
        # A deployment keeps its history: the same with a million rows stored
        # before the run (python -m bench.store shows why it costs more).
        held = int(1_000_000 * scale)
        history = per_user(loadgen, workdir, 10000, count, 500, held=held)
        rows.append(
            (
                f"  the same, 500 a call, the store already holding {held:,} rows",
                f"{history['rate']:,.0f}",
                f"{history['rate'] / stored[500]['rate']:.0%} of the empty store's; "
                f"received {history['received']:,}, stored {history['stored'] - held:,}",
                f"{history['client_cpu_share']:.0%}",
            )
        )
        print(rows[-1], flush=True)

    if "http" in only:
        hp = http_publish(workdir, 4, int(100 * scale) or 10, 500)
        rows.append(
            (
                "HTTP publish, batches of 500 over 4 connections (notifications/s)",
                f"{hp['batch_rate']:,.0f}",
                f"single POSTs {hp['single_rate']:,.0f}/s; the batches with an"
                f" Idempotency-Key {hp['keyed_rate']:,.0f}/s; Publisher.send_notifications"
                f" from one thread, one call {hp['publisher_rate']:,.0f}/s"
                f" ({hp['publisher_rate'] / hp['batch_rate']:.0%})",
                "{:.0%} / {:.0%}".format(*hp["client_cpu"]),
            )
        )
        print(rows[-1], flush=True)

    for idle in (0, 10000) if "latency" in only else ():
        lat = latency(loadgen, workdir, idle, 1000, 5 * scale if args.quick else 5)
        rows.append(
            (
                f"latency POST -> WebSocket at 1,000/s, {idle:,} idle (ms)",
                f"p50 {lat['p50']:.3f}",
                f"p99 {lat['p99']:.3f}; p99.9 {lat['p999']:.3f}; max {lat['max']:.3f} ({lat['samples']} samples)",
                "-",
            )
        )
        print(rows[-1], flush=True)

    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'measure'.ljust(width)} | {'rtserver':>18} | baselines, same run | load generator CPU")
    print("-" * (width + 90))
    for name, ours_, base, cpu in rows:
        print(f"{name.ljust(width)} | {ours_:>18} | {base} | {cpu}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
