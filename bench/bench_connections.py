"""What uvicorn's own settings give against hostile connections, beside loraplex's guarded protocol (issue 20 item 6).

Three servers of one tiny ASGI app, one after the other, each in its own process:

- `default`: uvicorn as it comes (httptools);
- `limit_concurrency`: uvicorn's cap (`limit_concurrency=200`), its only connection limit;
- `guarded`: loraplex's protocol (server/api/connections.py): `--max-connections 200`, `--header-timeout 10`.

Against each: `--connections` connections, half of them idle and half with headers half-sent; then whether a new
client is served, how many are still held after 2 s and 15 s (file descriptors of the server), and an endless header
value (up to 64 MiB): how much was taken, the RSS it added, and a request's latency after it. PASS/MISS for the
guarded server (the other two are the baselines): it must hold at most the cap, serve the new client, hold none
after the header timeout, and cut the header with < 16 MiB of RSS.

Run: .venv/bin/python bench/bench_connections.py [--connections 1000]   (writes bench/results/connections.json)
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from results_io import command_line, git_commit, write_json

RESULTS = Path(__file__).parent / "results" / "connections.json"
CAP = 200
HEADER_TIMEOUT_S = 10
SERVER = r"""
import sys, uvicorn
from loraplex.server.api.connections import guarded_protocol
from loraplex.server.config import ConnectionLimits

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

mode, port, cap, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
kw = {}
if mode == "limit_concurrency":
    kw["limit_concurrency"] = cap
if mode == "guarded":
    kw["http"] = guarded_protocol(ConnectionLimits(max_connections=cap, header_timeout_s=timeout))
uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", **kw)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1]) // 1024


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def get(port: int) -> tuple[str, float]:
    """(status line or the error, seconds) of one GET on a new connection."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            line = s.recv(100).split(b"\r\n")[0].decode() or "closed"
    except OSError as exc:
        line = type(exc).__name__
    return line, round(time.perf_counter() - t0, 3)


def endless_header(port: int) -> int:
    """MiB of one header value the server took before it closed (64 at most)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        try:
            while sent < 64 << 20:
                s.sendall(b"a" * (1 << 20))
                sent += 1 << 20
        except OSError:
            pass
    return sent >> 20


def measure(mode: str, n: int) -> dict[str, object]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, mode, str(port), str(CAP), str(HEADER_TIMEOUT_S)])
    try:
        while get(port)[0] != "HTTP/1.1 200 OK":
            time.sleep(0.2)
        base_fds, base_rss = fds(proc.pid), rss_mib(proc.pid)
        socks = []
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            if i % 2:
                s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            socks.append(s)
        time.sleep(2)
        row: dict[str, object] = {"mode": mode, "connections": n, "held_after_2s": fds(proc.pid) - base_fds,
                                  "new_client": get(port)}
        time.sleep(HEADER_TIMEOUT_S + 3)
        row["held_after_15s"] = fds(proc.pid) - base_fds
        for s in socks:
            s.close()
        time.sleep(1)
        row["endless_header_taken_mib"] = endless_header(port)
        row["endless_header_rss_mib"] = rss_mib(proc.pid) - base_rss
        row["get_after_header"] = get(port)
        return row
    finally:
        proc.terminate()
        proc.wait(30)


def verdict(row: dict[str, object]) -> str:
    ok = (row["held_after_2s"] <= CAP + 5 and row["new_client"][0] == "HTTP/1.1 200 OK"  # type: ignore[index]
          and row["held_after_15s"] <= 5 and row["endless_header_rss_mib"] < 16)  # type: ignore[operator]
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    rows = [measure(mode, args.connections) for mode in ("default", "limit_concurrency", "guarded")]
    print(f"{'mode':18} {'held 2s':>8} {'new client':>28} {'held 15s':>9} {'header MiB':>11} {'RSS +MiB':>9}  verdict")
    for row in rows:
        row["verdict"] = verdict(row) if row["mode"] == "guarded" else "baseline"
        print(f"{row['mode']:18} {row['held_after_2s']:>8} {str(row['new_client']):>28} {row['held_after_15s']:>9} "
              f"{row['endless_header_taken_mib']:>11} {row['endless_header_rss_mib']:>9}  {row['verdict']}")
    write_json(RESULTS, {"commit": git_commit(), "command": command_line(), "cap": CAP,
                         "header_timeout_s": HEADER_TIMEOUT_S, "cpu_count": os.cpu_count(),
                         "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()], "rows": rows})


if __name__ == "__main__":
    main()
