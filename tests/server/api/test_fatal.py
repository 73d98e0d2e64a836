"""A server that cannot serve says why and exits non-zero, so an orchestrator restarts it (DESIGN
"Isolation"): the model fails to load at start, or the engine thread dies while requests are open."""

from __future__ import annotations

import json
import shutil
import signal

import httpx
import pytest
from fastapi.testclient import TestClient

from .conftest import start_server
from .engine_hooks import allow_steps, wait_until
from .test_lifecycle import data_lines

COMPLETION = {"model": "base", "prompt": "hello", "max_tokens": 80, "temperature": 0, "ignore_eos": True}


def test_a_model_that_fails_to_load_exits_non_zero_with_the_reason(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(RuntimeError, match=r"server exited with 1") as err:
        start_server(broken, tmp_path / "state", tmp_path / "adapters")
    assert "the model failed to load" in str(err.value)
    assert "loraplex: error:" in str(err.value)


def test_a_dead_engine_thread_fails_open_streams_and_exits_non_zero(server_factory):
    live = server_factory("--served-model-name", "base")
    allow_steps(live.url, 3)  # the stream is open and unfinished when the thread dies, by construction
    with httpx.stream("POST", live.url + "/v1/completions", json={**COMPLETION, "stream": True},
                      timeout=120) as resp:
        lines = data_lines(resp.iter_lines())
        assert json.loads(next(lines))["choices"]
        assert httpx.post(live.url + "/_test/engine/crash", timeout=30).status_code == 200
        events = list(lines)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "engine stopped" in error["message"]
    assert live.proc.wait(timeout=120) == 1
    assert "engine thread died" in live.log() and "loraplex: error:" in live.log()


@pytest.fixture
def runtime_factory(tiny_model_dir, tmp_path):
    from loraplex.server.cli import build_parser, configs_from_args
    from loraplex.server.runtime import Runtime

    def make(model_dir):
        args = ["serve", "--model", str(model_dir), "--state-dir", str(tmp_path / "state"), "--device", "cpu",
                "--dtype", "float32", "--max-model-len", "128", "--num-kv-blocks", "64", "--block-size", "8",
                "--served-model-name", "base"]
        runtime = Runtime(configs_from_args(build_parser().parse_args(args)))
        reasons: list[str] = []
        runtime.on_fatal = reasons.append
        runtime.load()
        return runtime, reasons

    return make


def assert_unavailable(client: TestClient, why: str) -> None:
    for path in ("/health", "/ready"):
        resp = client.get(path)
        assert resp.status_code == 503 and why in resp.json()["reason"], (path, resp.text)
    models = client.get("/v1/models")
    assert models.status_code == 503 and why in models.json()["error"]["message"]
    gen = client.post("/v1/completions", json=COMPLETION)
    assert gen.status_code == 503 and why in gen.json()["error"]["message"]


def test_in_process_a_failed_load_is_unhealthy_and_fatal(runtime_factory, tmp_path):
    from loraplex.server.api.app import create_app

    runtime, reasons = runtime_factory(tmp_path / "missing-model")
    assert reasons and "failed to load" in reasons[0]
    with TestClient(create_app(runtime, load_in_background=False)) as client:
        assert_unavailable(client, "failed to load")


def test_in_process_a_dead_engine_is_unhealthy_and_fatal(runtime_factory, tiny_model_dir, tmp_path):
    from loraplex.server.api.app import create_app

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    runtime, reasons = runtime_factory(model)
    with TestClient(create_app(runtime, load_in_background=False)) as client:
        assert client.get("/health").status_code == 200
        runtime.engine.crash("simulated fault")
        wait_until(lambda: reasons, "the runtime told that the engine died")
        assert "simulated fault" in reasons[0]
        assert_unavailable(client, "engine thread died")


def test_a_client_gone_mid_write_cannot_kill_the_server(server_factory):
    """SIGPIPE (a write to a socket the client closed) must fail that write only, not end the process."""
    live = server_factory()
    live.proc.send_signal(signal.SIGPIPE)
    assert httpx.get(live.url + "/health", timeout=30).status_code == 200
    assert live.proc.poll() is None
