"""Adapters as versioned artifacts over HTTP, against a real server and PEFT as the oracle: sha256 versions and
their history, an atomic replace (admitted requests finish on the old weights, later ones run the new), rollback,
"name@version", canary routes (sticky by `user` or X-Loraplex-Route-Key), new weights from a training loop
(PUT …/weights, vLLM's load_inplace), prefetch, the version header, history trimming and the version metrics.

Requests are greedy with `ignore_eos`, prompts are token ids, and every output must equal PEFT's for the weights
the response's X-Loraplex-Adapter-Version names.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from loraplex.adapters.digest import dir_digest

from ..engine_helpers import PeftReference
from .engine_hooks import held, wait_queued, wait_until

if TYPE_CHECKING:
    from .conftest import LiveServer

N_TOKENS = 5
PROMPT = [5, 17, 42, 99, 7]
VERSION_HEADER = "x-loraplex-adapter-version"
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def versions(adapter_dir) -> list[Path]:
    """Four sets of weights with one config (rank 4 on q/v): versions of one adapter."""
    return [adapter_dir("llama", 4, ("q_proj", "v_proj"), 700 + i) for i in range(4)]


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, versions, tokenizer):  # -> Callable[[Path], str]
    ref = PeftReference(tiny_model_dir("llama"), {str(i): d for i, d in enumerate(versions)})
    memo: dict[Path, str] = {}
    lock = threading.Lock()

    def text(weights: Path) -> str:
        with lock:
            if weights not in memo:
                memo[weights] = tokenizer.decode(ref.generate(PROMPT, str(versions.index(weights)), N_TOKENS),
                                                 skip_special_tokens=True)
            return memo[weights]

    return text


@pytest.fixture(scope="module")
def server(server_factory) -> LiveServer:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        return server_factory("--max-loras", "3", "--max-cpu-loras", "6", "--adapter-history", "3")


@pytest.fixture(scope="module")
def by_sha(versions) -> dict[str, Path]:
    """12-hex version -> its weights' folder."""
    return {dir_digest(d)[:12]: d for d in versions}


def place(server: LiveServer, rel: str, src: Path) -> str:
    if not (server.adapter_root / rel).exists():
        shutil.copytree(src, server.adapter_root / rel)
    return rel


def register(server: LiveServer, name: str, src: Path, **extra: object) -> httpx.Response:
    rel = place(server, f"{name}-{dir_digest(src)[:8]}", src)
    return httpx.post(f"{server.url}/v1/adapters", json={"name": name, "path": rel, **extra}, timeout=60)


def completion(server: LiveServer, model: str, **extra: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": model, "prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True, **extra})


def answered_by(resp: httpx.Response, by_sha: dict[str, Path], oracle) -> str:  # noqa: ANN001
    """The version that answered (its header), after checking the text is PEFT's for those weights."""
    assert resp.status_code == 200, resp.text
    version = resp.headers[VERSION_HEADER]
    assert resp.json()["choices"][0]["text"] == oracle(by_sha[version]), version
    return version


# ---------------------------------------------------------------------------------------------------------
# versions, sha256, replace
# ---------------------------------------------------------------------------------------------------------


def test_the_oracle_tells_the_versions_apart(versions, oracle):
    """Else a response's text could not show which weights answered it."""
    assert len({oracle(d) for d in versions}) == len(versions)


def test_a_registration_is_a_version_named_by_the_sha256_of_its_files(server, versions):
    resp = register(server, "v-basic", versions[0])
    assert resp.status_code == 201, resp.text
    rec, sha = resp.json(), dir_digest(versions[0])
    assert (rec["sha256"], rec["version"], rec["source"]) == (sha, sha[:12], f"local:v-basic-{sha[:8]}")
    assert isinstance(rec["created"], int) and rec["route"] is None
    assert [(v["version"], v["current"]) for v in rec["versions"]] == [(sha[:12], True)]
    listed = httpx.get(f"{server.url}/v1/adapters", timeout=30).json()["data"]
    assert next(r for r in listed if r["name"] == "v-basic")["sha256"] == sha


def test_a_stated_sha256_that_does_not_match_is_a_400_naming_both_and_nothing_is_stored(server, versions):
    wrong = "ab" * 32
    sha = dir_digest(versions[1])
    resp = register(server, "v-sha", versions[1], sha256=wrong)
    assert resp.status_code == 400 and wrong in resp.text and sha in resp.text, resp.text
    assert httpx.get(f"{server.url}/v1/adapters/v-sha", timeout=30).status_code == 404
    files = {f: (f, (versions[1] / f).read_bytes()) for f in (CONFIG, WEIGHTS)}
    before = sorted((server.state_dir / "uploads").iterdir())
    resp = httpx.put(f"{server.url}/v1/adapters/v-sha", files=files, data={"sha256": wrong}, timeout=60)
    assert resp.status_code == 400 and wrong in resp.text and sha in resp.text, resp.text
    assert sorted((server.state_dir / "uploads").iterdir()) == before  # the upload's copy is gone too
    resp = httpx.put(f"{server.url}/v1/adapters/v-sha", files=files, data={"sha256": sha.upper()}, timeout=60)
    assert resp.status_code == 201 and resp.json()["sha256"] == sha  # the right digest (any case) registers


def test_replace_is_atomic_admitted_requests_finish_on_the_old_version_new_ones_run_the_new(server, versions,
                                                                                           by_sha, oracle):
    """The engine is held with a request for v0 queued and another streaming (admitted on v0); the replace
    answers; a request sent after it runs v1. Released, all three finish: the first two on v0, the last on v1."""
    assert register(server, "v-swap", versions[0]).status_code == 201
    old, new = dir_digest(versions[0])[:12], dir_digest(versions[1])[:12]
    assert answered_by(completion(server, "v-swap"), by_sha, oracle) == old  # v0 is loaded

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            body = {"model": "v-swap", "prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}
            steps = _engine(server)["steps"]
            with held(server.url, steps=2):  # the first request computes 2 steps, then everything holds
                running = asyncio.ensure_future(client.post("/v1/completions", json=body))
                await asyncio.to_thread(wait_until, lambda: _engine(server)["steps"] >= steps + 2, "2 steps")
                queued = asyncio.ensure_future(client.post("/v1/completions", json=body))
                await asyncio.to_thread(wait_queued, server.url, 1, 1)
                replaced = await asyncio.to_thread(register, server, "v-swap", versions[1], replace=True)
                assert replaced.status_code == 200 and replaced.json()["version"] == new, replaced.text
                after = asyncio.ensure_future(client.post("/v1/completions", json=body))
                await asyncio.to_thread(wait_queued, server.url, 2, 1)
            return await asyncio.gather(running, queued, after)

    running, queued, after = asyncio.run(scenario())
    assert [answered_by(r, by_sha, oracle) for r in (running, queued, after)] == [old, old, new]
    rec = httpx.get(f"{server.url}/v1/adapters/v-swap", timeout=30).json()
    assert [(v["version"], v["current"]) for v in rec["versions"]] == [(new, True), (old, False)]
    wait_until(lambda: _tier(server, "v-swap", old) == "disk", "the old version's slot and host copy freed")


def test_without_replace_a_taken_name_stays_409_and_the_same_bytes_again_change_nothing(server, versions):
    assert register(server, "v-409", versions[0]).status_code == 201
    resp = register(server, "v-409", versions[1])
    assert resp.status_code == 409 and '"replace": true' in resp.json()["error"]["message"]
    again = register(server, "v-409", versions[0], replace=True)
    assert again.status_code == 200 and len(again.json()["versions"]) == 1  # identical digest: no new version


def test_rollback_name_at_version_and_the_history_bound(server, versions, by_sha, oracle):
    shas = [dir_digest(d) for d in versions]
    assert register(server, "v-hist", versions[0]).status_code == 201
    for d in versions[1:3]:
        assert register(server, "v-hist", d, replace=True).status_code == 200
    assert answered_by(completion(server, "v-hist"), by_sha, oracle) == shas[2][:12]
    assert answered_by(completion(server, f"v-hist@{shas[0][:6]}"), by_sha, oracle) == shas[0][:12]
    resp = completion(server, "v-hist")
    assert resp.json()["model"] == "v-hist"  # the response names the adapter, the header the version
    rolled = httpx.post(f"{server.url}/v1/adapters/v-hist/rollback", timeout=60)  # default: the previous one
    assert rolled.status_code == 200 and rolled.json()["version"] == shas[1][:12], rolled.text
    assert answered_by(completion(server, "v-hist"), by_sha, oracle) == shas[1][:12]
    rolled = httpx.post(f"{server.url}/v1/adapters/v-hist/rollback", json={"version": shas[0][:8]}, timeout=60)
    assert rolled.status_code == 200 and rolled.json()["version"] == shas[0][:12]
    # --adapter-history 3: a fourth version drops the least recently current one (v2 now), files and all
    assert register(server, "v-hist", versions[3], replace=True).status_code == 200
    kept = [v["sha256"] for v in httpx.get(f"{server.url}/v1/adapters/v-hist", timeout=30).json()["versions"]]
    assert kept == [shas[3], shas[0], shas[1]]
    gone = completion(server, f"v-hist@{shas[2][:8]}")
    assert gone.status_code == 404 and shas[3][:12] in gone.text  # the message lists what the history holds
    for bad, status in (({"version": "zz"}, 400), ({"version": "0000"}, 404), ({"extra": 1}, 400)):
        resp = httpx.post(f"{server.url}/v1/adapters/v-hist/rollback", json=bad, timeout=30)
        assert resp.status_code == status, (bad, resp.text)
    assert httpx.post(f"{server.url}/v1/adapters/nope/rollback", timeout=30).status_code == 404


def test_a_single_version_has_nothing_to_roll_back_to(server, versions):
    assert register(server, "v-single", versions[2]).status_code == 201
    resp = httpx.post(f"{server.url}/v1/adapters/v-single/rollback", timeout=30)
    assert resp.status_code == 400 and "nothing to roll back to" in resp.text


# ---------------------------------------------------------------------------------------------------------
# canary routes
# ---------------------------------------------------------------------------------------------------------


def test_a_route_splits_by_user_sticky_and_delete_returns_to_the_current_version(server, versions, by_sha, oracle):
    a, b = dir_digest(versions[0])[:12], dir_digest(versions[1])[:12]
    assert register(server, "v-route", versions[0]).status_code == 201
    assert register(server, "v-route", versions[1], replace=True).status_code == 200  # b current, a previous
    route = {"versions": [{"version": a, "weight": 50}, {"version": b, "weight": 50}], "sticky": "user"}
    resp = httpx.put(f"{server.url}/v1/adapters/v-route/route", json=route, timeout=60)
    assert resp.status_code == 200 and resp.json()["route"]["sticky"] == "user", resp.text
    seen = {user: {answered_by(completion(server, "v-route", user=user), by_sha, oracle) for _ in range(2)}
            for user in (f"u{i}" for i in range(12))}
    assert all(len(v) == 1 for v in seen.values()), seen  # one user, one version
    assert {v for vs in seen.values() for v in vs} == {a, b}  # 12 users over a 50/50 split reach both
    header = httpx.post(f"{server.url}/v1/completions", headers={"X-Loraplex-Route-Key": "u3"}, timeout=60,
                        json={"model": "v-route", "prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0,
                              "ignore_eos": True, "user": "someone-else"})
    assert {answered_by(header, by_sha, oracle)} == seen["u3"]  # the header wins over `user`
    tgi = httpx.post(f"{server.url}/generate", headers={"X-Loraplex-Route-Key": "u3"}, timeout=60,
                     json={"inputs": "hi", "parameters": {"adapter_id": "v-route", "max_new_tokens": 2}})
    assert tgi.status_code == 200 and {tgi.headers[VERSION_HEADER]} == seen["u3"]
    cleared = httpx.delete(f"{server.url}/v1/adapters/v-route/route", timeout=60)
    assert cleared.status_code == 200 and cleared.json()["route"] is None
    assert {answered_by(completion(server, "v-route", user=u), by_sha, oracle) for u in seen} == {b}


@pytest.mark.parametrize(("route", "status", "says"), [
    ({"versions": [{"version": "ffff", "weight": 1}]}, 404, "no version 'ffff'"),
    ({"versions": [{"version": "{a}", "weight": -1}]}, 400, "versions.0.weight"),
    ({"versions": [{"version": "{a}", "weight": 0}]}, 400, "at least one weight"),
    ({"versions": [{"version": "{a}", "weight": 1}, {"version": "{a}", "weight": 1}]}, 400, "listed twice"),
    ({"versions": []}, 422, "versions"),
    ({"versions": [{"version": "{a}", "weight": 1}], "sticky": "cookie"}, 422, "sticky"),
])
def test_bad_routes_are_refused_naming_the_field(server, versions, route, status, says):
    if httpx.get(f"{server.url}/v1/adapters/v-badroute", timeout=30).status_code == 404:
        assert register(server, "v-badroute", versions[0]).status_code == 201
    a = dir_digest(versions[0])[:12]
    resp = httpx.put(f"{server.url}/v1/adapters/v-badroute/route", timeout=30,
                     json=json.loads(json.dumps(route).replace("{a}", a)))
    assert resp.status_code == status and says in resp.text, resp.text


# ---------------------------------------------------------------------------------------------------------
# weights from a training loop, vLLM's load_inplace, prefetch
# ---------------------------------------------------------------------------------------------------------


def test_put_weights_makes_a_raw_safetensors_body_the_new_current_version(server, versions, by_sha, oracle):
    assert register(server, "v-train", versions[0]).status_code == 201
    body = (versions[2] / WEIGHTS).read_bytes()
    resp = httpx.put(f"{server.url}/v1/adapters/v-train/weights", content=body, timeout=60,
                     headers={"content-type": "application/octet-stream"})
    assert resp.status_code == 200, resp.text
    rec = resp.json()
    assert rec["sha256"] == dir_digest(versions[2]) and rec["source"] == "weights"  # same config: same digest
    assert answered_by(completion(server, "v-train"), by_sha, oracle) == rec["version"]
    mismatch = httpx.put(f"{server.url}/v1/adapters/v-train/weights?sha256={'0' * 64}", content=body, timeout=60)
    assert mismatch.status_code == 400 and "0" * 64 in mismatch.text
    assert httpx.put(f"{server.url}/v1/adapters/v-train/weights", content=b"", timeout=30).status_code == 400
    bad = httpx.put(f"{server.url}/v1/adapters/v-train/weights", content=b"\x00" * 16, timeout=30)
    assert bad.status_code == 400, bad.text
    assert httpx.put(f"{server.url}/v1/adapters/nope/weights", content=body, timeout=30).status_code == 404


def test_vllm_load_inplace_replaces_a_registered_name(server, versions, by_sha, oracle):
    assert register(server, "v-vllm", versions[0]).status_code == 201
    rel = place(server, f"v-vllm-{dir_digest(versions[3])[:8]}", versions[3])
    taken = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "v-vllm", "lora_path": rel},
                       timeout=60)
    assert taken.status_code == 409
    resp = httpx.post(f"{server.url}/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": "v-vllm", "lora_path": rel, "load_inplace": True})
    assert resp.status_code == 200 and resp.text == "Success: LoRA adapter 'v-vllm' added successfully."
    assert answered_by(completion(server, "v-vllm"), by_sha, oracle) == dir_digest(versions[3])[:12]


def test_prefetch_loads_without_a_request(server, versions):
    assert register(server, "v-pre", versions[1]).status_code == 201
    version = dir_digest(versions[1])[:12]
    resp = httpx.post(f"{server.url}/v1/adapters/v-pre/prefetch", json={"tier": "device"}, timeout=30)
    assert resp.status_code == 202 and resp.json() == {"name": "v-pre", "tier": "device", "versions": [version]}
    wait_until(lambda: _tier(server, "v-pre", version) == "device", "v-pre in a device slot")
    bad = httpx.post(f"{server.url}/v1/adapters/v-pre/prefetch", json={"tier": "gpu"}, timeout=30)
    assert bad.status_code == 422 and "tier" in bad.text
    assert httpx.post(f"{server.url}/v1/adapters/nope/prefetch", timeout=30).status_code == 404


def test_every_generation_response_names_its_version_and_the_metrics_the_current_ones(server, versions):
    assert register(server, "v-meta", versions[3]).status_code == 201
    version = dir_digest(versions[3])[:12]
    base = httpx.post(f"{server.url}/v1/completions", timeout=60, json={"prompt": PROMPT, "max_tokens": 2})
    assert base.headers[VERSION_HEADER] == "base"
    stream = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": "v-meta", "prompt": PROMPT, "max_tokens": 2, "stream": True})
    assert stream.status_code == 200 and stream.headers[VERSION_HEADER] == version
    tgi = httpx.post(f"{server.url}/generate", timeout=60, json={
        "inputs": "hi", "parameters": {"adapter_id": "v-meta", "max_new_tokens": 2, "details": True}})
    assert tgi.headers[VERSION_HEADER] == version
    if httpx.get(f"{server.url}/v1/adapters/v-basic", timeout=30).status_code == 404:
        assert register(server, "v-basic", versions[0]).status_code == 201
    merged = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": httpx.get(f"{server.url}/ready", timeout=30).json()["model"], "prompt": PROMPT, "max_tokens": 2,
        "adapters": [{"name": "v-meta", "weight": 0.5}, {"name": "v-basic", "weight": 0.5}]})
    assert merged.status_code == 200, merged.text
    assert merged.headers[VERSION_HEADER] == f"v-meta@{version},v-basic@{dir_digest(versions[0])[:12]}"
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert f'loraplex_adapter_version_info{{adapter="v-meta",version="{version}"}} 1.0' in text
    assert re.search(r'^vllm:lora_adapter_loaded\{adapter_name="v-meta",level="(device|host)"', text, re.M)
    assert re.search(r"^vllm:max_gpu_lora_adapters 3\.0$", text, re.M)
    assert re.search(r"^vllm:lora_adapter_load_seconds_count [1-9]", text, re.M)


def _engine(server: LiveServer) -> dict:
    return httpx.get(server.url + "/_test/engine", timeout=30).json()


def _tier(server: LiveServer, name: str, version: str) -> str:
    rec = httpx.get(f"{server.url}/v1/adapters/{name}", timeout=30).json()
    return next(v["tier"] for v in rec["versions"] if v["version"] == version)
