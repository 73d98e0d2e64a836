"""A real `loraplex serve` process on 127.0.0.1 for HTTP tests (tiny model, temp state dir)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen
    state_dir: Path
    adapter_root: Path | None
    log_path: Path
    args: list[str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(model_dir: Path | None, state_dir: Path, adapter_root: Path | None, *extra: str,
                 ready_timeout: float = 120) -> LiveServer:
    """Start `python -m loraplex.server.cli serve` and wait until /ready answers 200. model_dir None: the
    built-in demo; adapter_root None: no --adapter-root flag."""
    port = free_port()
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir.parent / f"server-{port}.log"
    args = [sys.executable, "-m", "loraplex.server.cli", "serve", "--port", str(port), "--state-dir", str(state_dir),
            "--device", "cpu", "--dtype", "float32", "--max-lora-rank", "32", "--max-model-len", "256",
            "--num-kv-blocks", "512", "--block-size", "8"]
    if model_dir is not None:
        args += ["--model", str(model_dir)]
    if adapter_root is not None:
        adapter_root.mkdir(parents=True, exist_ok=True)
        args += ["--adapter-root", str(adapter_root)]
    args += extra
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "LORAPLEX_TEST_HOOKS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = LiveServer(f"http://127.0.0.1:{port}", proc, state_dir, adapter_root, log_path, args)
    _wait_ready(server, ready_timeout)
    return server


def post(live: LiveServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(live.url + path, json=body, timeout=120)


def ok(live: LiveServer, path: str, body: dict) -> dict:
    """POST `body` as JSON and return the 200 answer's JSON (assert on anything else, showing the answer)."""
    answer = post(live, path, body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _wait_ready(server: LiveServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()[-4000:]}")


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> Iterator[Callable[..., LiveServer]]:
    """`server_factory(*flags, state_dir=None, adapter_root=None) -> LiveServer`; all stopped at module end."""
    started: list[LiveServer] = []

    def make(*flags: str, state_dir: Path | None = None, adapter_root: Path | None = None,
             family: str = "llama") -> LiveServer:
        base = tmp_path_factory.mktemp("server")
        server = start_server(tiny_model_dir(family), state_dir or base / "state",
                              adapter_root or base / "adapters", *flags)
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop(signal.SIGKILL)
