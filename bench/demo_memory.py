"""The demo's memory over several starts (issue 22, item 3): resident memory and the KV pool's size and rule.

    .venv/bin/python bench/demo_memory.py [--starts 3] [--port 8391]

Each start runs `loraplex serve` (the built-in demo, default flags, on the CPU), waits for /ready, reads the
server's VmRSS, sends 4 completions (the base and each demo adapter, 32 tokens each) and reads VmRSS again,
then stops it (SIGTERM). The KV pool line comes from the server's log. Target: RSS <= 1.5 GB at every reading,
the same pool at every start. Writes bench/results/demo_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from results_io import write_json

ROOT = Path(__file__).resolve().parent.parent
TARGET_BYTES = 1.5e9
MODELS = ("smollm2-135m-instruct", "emoji", "pirate", "json")


def rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server not ready")


def complete(port: int, model: str) -> None:
    body = json.dumps({"model": model, "prompt": "Tell me about the sea.", "max_tokens": 32}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        json.load(r)


def one_start(port: int, state_dir: Path) -> dict[str, object]:
    log_path = state_dir / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "loraplex.server.cli", "serve", "--port", str(port),
                                 "--state-dir", str(state_dir)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(port, proc)
        idle = rss(proc.pid)
        for model in MODELS:
            complete(port, model)
        served = rss(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    kv = next((line.split("engine: ", 1)[1] for line in log_path.read_text().splitlines() if "KV pool:" in line), "")
    return {"rss_ready_bytes": idle, "rss_after_requests_bytes": served, "kv_pool": kv}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--port", type=int, default=8391)
    args = parser.parse_args()
    import tempfile

    starts = []
    for i in range(args.starts):
        with tempfile.TemporaryDirectory(prefix="demo-memory-") as tmp:
            starts.append(one_start(args.port, Path(tmp)))
        s = starts[-1]
        print(f"start {i + 1}: RSS ready {s['rss_ready_bytes'] / 1e9:.2f} GB, after 4 requests "
              f"{s['rss_after_requests_bytes'] / 1e9:.2f} GB; {s['kv_pool']}", flush=True)
    worst = max(max(s["rss_ready_bytes"], s["rss_after_requests_bytes"]) for s in starts)
    same_pool = len({s["kv_pool"].split(" by ")[0] for s in starts}) == 1
    ok = worst <= TARGET_BYTES and same_pool
    print(f"{'PASS' if ok else 'MISS'}: worst RSS {worst / 1e9:.2f} GB (target <= 1.5 GB), "
          f"pool {'the same' if same_pool else 'DIFFERENT'} at every start")
    write_json(ROOT / "bench" / "results" / "demo_memory.json",
               {"starts": starts, "worst_rss_bytes": worst, "same_pool": same_pool, "target_bytes": TARGET_BYTES})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
