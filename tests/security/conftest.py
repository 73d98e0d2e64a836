"""The hostile-client / hostile-adapter battery (issue 20; BAD_INPUTS.md rows 45-57): shared fixtures.

One live `loraplex serve` (tiny model, keys set, small limits so each attack is cheap to mount) is shared by the
battery's HTTP tests (session scope: a server start is the battery's largest cost). Every attack is measured the
same way: the answer's status, its wall time and the server's peak RSS growth while it ran (VmHWM after resetting
it through /proc/<pid>/clear_refs), read from /proc, never from the machine's speed beyond generous ceilings.

With LORAPLEX_SECURITY_REPORT=path set, each measurement is also appended to that file as one JSON line (the
before/after table of the issue note is made from it).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ..conftest import load_test_helper  # tests/conftest.py

_api = load_test_helper("server/api/conftest.py")
hooks = load_test_helper("server/api/engine_hooks.py")
start_server = _api.start_server
LiveServer = _api.LiveServer

API_KEY = "battery-api-key"
ADMIN_KEY = "battery-admin-key"
MAX_QUEUE = 8  # one adapter (or the base model) may hold 6; one request at most 3
BODY_LIMIT = 8 * 2**20
S3_TIMEOUT_S = 2.0
STREAM_WRITE_TIMEOUT_S = 3.0
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 200
MAX_MODEL_LEN = 2048


# ---- measuring -------------------------------------------------------------------------------------------
def rss_mib(pid: int, key: str = "VmRSS") -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M)[1]) / 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def reset_peak_rss(pid: int) -> None:
    """VmHWM := VmRSS (Linux: writing 5 to clear_refs resets the peak resident set size)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Measured:
    item: str
    case: str
    pid: int
    status: object = None
    seconds: float = 0.0
    peak_rss_mib: float = 0.0  # peak RSS growth while the attack ran
    rss_after_mib: float = 0.0  # RSS growth that stayed after it
    extra: dict = field(default_factory=dict)


@contextmanager
def measure(item: str, case: str, pid: int) -> Iterator[Measured]:
    """Time a block and the server's RSS around it; record it in the report (always, pass or fail)."""
    reset_peak_rss(pid)
    before = rss_mib(pid)
    m = Measured(item, case, pid)
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.seconds = round(time.perf_counter() - t0, 3) if not m.seconds else m.seconds
        m.peak_rss_mib = round(rss_mib(pid, "VmHWM") - before, 1)
        m.rss_after_mib = round(rss_mib(pid) - before, 1)
        _report(m)


def _report(m: Measured) -> None:
    path = os.environ.get("LORAPLEX_SECURITY_REPORT")
    if not path:
        return
    row = {"item": m.item, "case": m.case, "status": m.status, "seconds": m.seconds,
           "peak_rss_mib": m.peak_rss_mib, "rss_after_mib": m.rss_after_mib, **m.extra}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


class HealthProbe:
    """Polls /health every 20 ms on its own thread and connection; the slowest answer is the stall."""

    def __init__(self, url: str) -> None:
        self.url, self.worst, self.count, self.failures = url, 0.0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = client.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.worst = max(self.worst, time.perf_counter() - t0)
                self.count += 1
                self.failures += not ok
                self._stop.wait(0.02)


# ---- the server --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def blackhole() -> Iterator[str]:
    """An "S3 endpoint" that accepts TCP connections and never answers a byte."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)  # connections complete in the backlog; nobody ever accepts or reads them
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


AWS_ENV = {"AWS_ACCESS_KEY_ID": "battery", "AWS_SECRET_ACCESS_KEY": "battery", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def battery_flags(blackhole_url: str) -> list[str]:
    return ["--api-key", API_KEY, "--admin-key", ADMIN_KEY, "--max-queue", str(MAX_QUEUE),
            "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "1024", "--block-size", "16",
            "--max-body-bytes", str(BODY_LIMIT), "--stream-write-timeout", str(STREAM_WRITE_TIMEOUT_S),
            "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
            "--max-connections", str(MAX_CONNECTIONS), "--s3-timeout", str(S3_TIMEOUT_S),
            "--s3-endpoint", blackhole_url, "--served-model-name", "base", "--max-loras", "4",
            "--max-cpu-loras", "8"]


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model_dir, blackhole) -> Iterator[LiveServer]:
    """One server for the whole battery (each test uses its own adapter names; admission is back to zero after
    each test)."""
    base = tmp_path_factory.mktemp("battery")
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    try:
        live = start_server(tiny_model_dir("llama"), base / "state", base / "adapters", *battery_flags(blackhole))
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def client(server) -> Iterator[httpx.Client]:
    """Generation calls with the API key."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def admin(server) -> Iterator[httpx.Client]:
    """Adapter admin calls with the admin key."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def good_adapter(adapter_dir) -> Path:
    return adapter_dir("llama", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), 0)


def error_message(resp: httpx.Response, status: int, *words: str) -> str:
    """The JSON error with `status` whose message names every one of `words` (case-insensitive)."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    message = resp.json()["error"]["message"]
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    assert "Traceback" not in resp.text
    return message


def completion(client: httpx.Client, **overrides: object) -> httpx.Response:
    body = {"model": "base", "prompt": "The weather today", "max_tokens": 2, "temperature": 0} | overrides
    return client.post("/v1/completions", json=body)


WaitFor = Callable[[Callable[[], object], str, float], object]
