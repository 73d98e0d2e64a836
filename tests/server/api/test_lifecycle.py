"""Admission, disconnects and draining on live servers (BAD_INPUTS.md rows 31 and 32, and the
"client disconnects mid-stream" fault).

- row 31: with --max-queue 2, requests beyond two in flight get 429 + Retry-After; admitted ones complete.
- disconnect: a client that leaves mid-stream (or mid non-streamed request) gets its request aborted:
  KV usage, running requests and running adapters return to zero, and the request is counted as 499.
- row 32: after SIGTERM new requests get 503, the in-flight stream finishes with its full output, the
  process exits 0.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .engine_hooks import allow_steps, engine_state, held, wait_queued, wait_until

COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def queued(server_factory, adapter_dir, tmp_path_factory):
    """--max-queue 2. One host-cache entry: "doomed" is pushed out of it by the adapters preloaded after it,
    so its first request reads its files from disk again (which test_engine_failure deletes)."""
    root = tmp_path_factory.mktemp("lifecycle-root")
    flags = []
    for seed, name in enumerate(("doomed", "evictor", "a1"), start=4):
        shutil.copytree(adapter_dir("llama", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), seed), root / name)
        flags += ["--preload", f"{name}={name}"]
    return server_factory(*flags, "--max-queue", "2", "--max-loras", "1", "--max-cpu-loras", "1",
                          adapter_root=root)


def body(max_tokens, *, stream=True, model="a1"):
    return {"model": model, "prompt": "The weather today", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream, "stream_options": {"include_usage": True} if stream else None}


def data_lines(lines):
    return (line[len("data: "):] for line in lines if line.startswith("data: "))


def read_to_end(lines) -> tuple[str, list[dict]]:
    """Rest of an OpenAI stream: (text, chunks); asserts it ends with [DONE]."""
    chunks = [json.loads(d) if d != "[DONE]" else d for d in data_lines(lines)]
    assert chunks and chunks[-1] == "[DONE]", chunks[-3:]
    chunks = chunks[:-1]
    assert not any("error" in c for c in chunks), chunks
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def scrape(live) -> str:
    return httpx.get(live.url + "/metrics").text


# ---- row 31 -------------------------------------------------------------------------------------
def test_31_requests_beyond_the_queue_get_429_and_admitted_ones_complete(queued):
    url = queued.url + COMPLETIONS
    with held(queued.url), httpx.stream("POST", url, json=body(48), timeout=120) as s1, \
            httpx.stream("POST", url, json=body(48), timeout=120) as s2:
        wait_queued(queued.url, waiting=2)  # both admitted; the held engine keeps them in flight
        with ThreadPoolExecutor(4) as pool:
            refused = list(pool.map(lambda path: httpx.post(queued.url + path, timeout=60, json=(
                {"inputs": "hi"} if path.startswith("/generate") else body(4, stream=False))),
                [COMPLETIONS, COMPLETIONS, "/generate", "/generate_stream"]))
        for r in refused:
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert "--max-queue 2" in r.text
        assert refused[2].json()["error_type"] == "overloaded"
        allow_steps(queued.url, None)
        for s in (s1, s2):
            _, chunks = read_to_end(s.iter_lines())
            assert chunks[-1]["usage"]["completion_tokens"] == 48
    # Slots are back: the next request is admitted.
    assert httpx.post(url, json=body(2, stream=False), timeout=60).status_code == 200


def test_31_concurrent_burst_admits_exactly_the_queue(queued):
    def one(_):
        with httpx.stream("POST", queued.url + COMPLETIONS, json=body(40), timeout=120) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, r.headers.get("retry-after"), None
            return 200, None, read_to_end(r.iter_lines())[1][-1]["usage"]["completion_tokens"]

    with held(queued.url), ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        wait_until(lambda: sum(f.done() for f in futures) == 4, "the four requests beyond the queue refused")
        wait_queued(queued.url, waiting=2)
        allow_steps(queued.url, None)
        results = [f.result() for f in futures]
    admitted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert len(admitted) == 2 and len(refused) == 4, results
    assert all(status == 429 and retry for status, retry, _ in refused), results
    assert all(tokens == 40 for _, _, tokens in admitted), results


def test_42_one_adapter_cannot_take_the_whole_queue(server_factory, adapter_dir, tmp_path_factory):
    """--max-queue 8: one adapter may hold 6 in-flight requests; the last 2 slots stay for the others."""
    root = tmp_path_factory.mktemp("queue-share-root")
    shutil.copytree(adapter_dir("llama", 8, ("q_proj", "v_proj"), 4), root / "a1")
    live = server_factory("--preload", "a1=a1", "--max-queue", "8", "--served-model-name", "base",
                          adapter_root=root)

    def post(model):
        return httpx.post(live.url + COMPLETIONS, json=body(4, stream=False, model=model), timeout=120)

    with held(live.url), ThreadPoolExecutor(9) as pool:
        flood = [pool.submit(post, "a1") for _ in range(6)]
        wait_queued(live.url, waiting=6)
        refused = post("a1")
        others = [pool.submit(post, "base") for _ in range(2)]
        wait_queued(live.url, waiting=8)
        full = post("base")
        allow_steps(live.url, None)
        done = [f.result() for f in flood + others]
    assert refused.status_code == 429 and "adapter 'a1' has 6 requests in flight" in refused.text
    assert full.status_code == 429 and "--max-queue 8" in full.text
    assert all(r.status_code == 200 for r in done), [r.text for r in done if r.status_code != 200]


# ---- client disconnects -------------------------------------------------------------------------
def wait_idle(live) -> str:
    def idle() -> str | None:
        text = scrape(live)
        quiet = metric(text, "vllm:num_requests_running") == 0 and metric(text, "loraplex_kv_cache_usage_ratio") == 0
        return text if quiet else None

    return wait_until(idle, "no running request and an empty KV cache")


def gone_count(live, endpoint) -> float:
    return metric(scrape(live), "loraplex_requests_total", f'{{adapter="a1",endpoint="{endpoint}",status="499"}}')


def test_disconnect_mid_stream_frees_kv_blocks_and_adapter(queued):
    before = gone_count(queued, COMPLETIONS)
    with held(queued.url, steps=8), \
            httpx.stream("POST", queued.url + COMPLETIONS, json=body(200), timeout=120) as r:
        lines = data_lines(r.iter_lines())  # keep a reference: a collected iterator closes the stream
        first = json.loads(next(lines))
        assert first["choices"][0]["text"], first
        busy = scrape(queued)  # the engine holds after 8 steps: the request is running by construction
        assert metric(busy, "vllm:num_requests_running") == 1
        assert metric(busy, "loraplex_kv_cache_usage_ratio") > 0
        assert 'running_lora_adapters="a1"' in busy
        # Leaving the block closes the connection with 192 tokens still to go.
    idle = wait_idle(queued)
    assert metric(idle, "vllm:num_requests_running") == 0
    assert metric(idle, "loraplex_kv_cache_usage_ratio") == 0
    assert 'running_lora_adapters=""' in idle
    wait_until(lambda: gone_count(queued, COMPLETIONS) == before + 1, "the request counted as 499")


def raw_post(live, path: str, payload: dict) -> socket.socket:
    """Send a POST on a bare socket, so that the test alone decides when the client goes away."""
    host, port = live.url.removeprefix("http://").split(":")
    data = json.dumps(payload).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("path", [COMPLETIONS, "/generate"])
def test_disconnect_during_non_streamed_request_aborts_it(queued, path):
    before = gone_count(queued, path)
    payload = body(200, stream=False) if path == COMPLETIONS else {
        "inputs": "The weather today", "parameters": {"adapter_id": "a1", "max_new_tokens": 200,
                                                      "ignore_eos_token": True}}
    with held(queued.url):
        sock = raw_post(queued, path, payload)
        wait_queued(queued.url, waiting=1)
        steps = engine_state(queued.url)["steps"]
        allow_steps(queued.url, 3)  # prefill + 2 decodes, then hold: mid-generation by construction
        wait_until(lambda: engine_state(queued.url)["steps"] == steps + 3, "three engine steps")
        assert engine_state(queued.url)["running"] == 1
        sock.close()  # the client goes away with 197 tokens to go
        wait_until(lambda: gone_count(queued, path) == before + 1, "the request counted as 499")
        wait_until(lambda: engine_state(queued.url)["running"] == 0, "the request aborted in the held engine")
    idle = wait_idle(queued)
    assert metric(idle, "loraplex_kv_cache_usage_ratio") == 0


# ---- engine failures reach the client -----------------------------------------------------------
def test_engine_failure_is_a_clear_error_streamed_or_not(queued):
    shutil.rmtree(queued.adapter_root / "doomed")  # after registration, before its first device load
    resp = httpx.post(queued.url + COMPLETIONS, json=body(4, stream=False, model="doomed"), timeout=60)
    assert resp.status_code == 400  # errored adapter: a clear 4xx naming it, never a 500
    assert "doomed" in resp.json()["error"]["message"] and "failed to load" in resp.json()["error"]["message"]
    with httpx.stream("POST", queued.url + COMPLETIONS, json=body(4, model="doomed"), timeout=60) as r:
        events = list(data_lines(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert "failed to load" in json.loads(events[-2])["error"]["message"]
    tgi = stream_tgi(queued, "doomed")
    assert tgi[-1]["error_type"] == "generation" and "failed to load" in tgi[-1]["error"]
    # Everyone else is unaffected.
    ok = httpx.post(queued.url + COMPLETIONS, json=body(3, stream=False), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def stream_tgi(live, adapter):
    payload = {"inputs": "hi", "parameters": {"adapter_id": adapter, "max_new_tokens": 3}}
    with httpx.stream("POST", live.url + "/generate_stream", json=payload, timeout=60) as r:
        return [json.loads(d) for d in data_lines(r.iter_lines())]


# ---- row 32 -------------------------------------------------------------------------------------
def test_32_sigterm_drains_in_flight_and_refuses_new(server_factory):
    live = server_factory()
    base = httpx.get(live.url + "/v1/models").json()["data"][0]["id"]
    url = live.url + COMPLETIONS
    expected = httpx.post(url, json=body(80, stream=False, model=base), timeout=120).json()["choices"][0]["text"]
    allow_steps(live.url, 8)  # the stream stays in flight until the test lets it go on
    with httpx.stream("POST", url, json=body(80, model=base), timeout=120) as r:
        lines = r.iter_lines()
        first = json.loads(next(data_lines(lines)))
        live.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(live.url + "/ready").status_code == 503, "/ready 503 while draining")
        refused = httpx.post(url, json=body(2, stream=False, model=base), timeout=30)
        refused_tgi = httpx.post(live.url + "/generate", json={"inputs": "hi"}, timeout=30)
        allow_steps(live.url, None)
        text, chunks = read_to_end(lines)
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert refused_tgi.status_code == 503 and refused_tgi.json()["error_type"] == "unavailable"
    assert first["choices"][0]["text"] + text == expected
    assert chunks[-1]["usage"]["completion_tokens"] == 80
    assert live.proc.wait(timeout=60) == 0
