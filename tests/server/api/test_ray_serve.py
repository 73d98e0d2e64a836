"""loraplex on Ray Serve (`loraplex.server.ray_serve`): two engine replicas behind Ray's HTTP proxy.

A local Ray instance (its own temp dir, removed at the end) runs the application `build_app` makes; the two
replicas share one adapter registry in a real S3 protocol server (moto). Four adapters are registered through
Ray's proxy and reach both replicas. Then, through the proxy: greedy completions and chat completions, streamed
and not, equal PEFT's for each adapter and the base model; each adapter's requests all land on one replica (the
`X-Loraplex-Replica` header, and the merged /metrics) and both replicas hold some; a server-sent event arrives
while the replica's engine is held mid-generation (the stream is relayed, not buffered); a client leaving
mid-stream aborts its request on the replica; error bodies pass through unchanged; a deletion reaches both.

Placement is made deterministic, not hoped for: each adapter's first request is followed by a wait until Ray's
router knows which replica holds it (the replica reports within 0.1 s; the wait's deadline only bounds a broken
setup). Ray sends an adapter it has not placed yet to the replica holding the fewest adapters, so the second
adapter goes to the other replica.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

NO_RAY = "Ray Serve is an optional extra, not installed: pip install 'loraplex[ray]'"
ray = pytest.importorskip("ray", reason=NO_RAY, exc_type=ImportError)
serve = pytest.importorskip("ray.serve", reason=NO_RAY, exc_type=ImportError)

from loraplex.server.ray_serve import (  # noqa: E402
    REPLICA_DEPLOYMENT,
    REPLICA_HEADER,
    ROUTER_DEPLOYMENT,
    RayOptions,
    app_builder,
    build_app,
    main,
    registration_refusal,
    requested_adapter,
)

from ..engine_helpers import PeftReference  # noqa: E402
from .conftest import free_port  # noqa: E402
from .engine_hooks import wait_until  # noqa: E402
from .test_lifecycle import data_lines  # noqa: E402
from .test_openai_api import chat_ids, expected_text  # noqa: E402

pytestmark = pytest.mark.slow

APP = "loraplex-test"
ADAPTERS = {"r1": (8, ("q_proj", "k_proj", "v_proj", "o_proj"), 21), "r2": (4, ("q_proj", "v_proj", "down_proj"), 22),
            "r3": (16, ("q_proj", "k_proj", "v_proj", "o_proj"), 23), "r4": (8, ("q_proj", "o_proj", "up_proj"), 24)}
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]
N = 12
PROPAGATION_DEADLINE_S = 120  # registry polls every 0.2 s: the bound is for a broken setup only
STARTUP_DEADLINE_S = 300  # Ray, two replicas importing torch and loading the model, on a loaded 2-core machine
# Environment of every Ray process (set while Ray starts; its workers inherit it):
RAY_ENV = {
    "LORAPLEX_TEST_HOOKS": "1",  # the replicas mount /_test (hold the engine: test_sse_is_relayed_as_it_comes)
    # Ray routes an adapter to the replica holding it only if that replica answers its queue-length probe within
    # this deadline (0.1 s by default), else to another one: generous here, so a busy machine changes nothing.
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "10",
    "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "10",
    # Ray's controller kills a proxy that misses its ready check (5 s) or 3 health checks (10 s each): on 2 cores
    # beside two busy loops it did, and every test of the module errored. Generous: a slow machine is not a fault.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "120",
}


@dataclass
class RayApp:
    url: str
    base: str  # the base model's served name

    def routing_state(self) -> dict:
        return serve.get_deployment_handle(ROUTER_DEPLOYMENT, APP).routing_state.remote().result(timeout_s=60)

    def catalogs(self) -> list[dict]:
        """Each replica's registered adapters (asked of every replica, not through the router)."""
        return serve.get_deployment_handle(REPLICA_DEPLOYMENT, APP).broadcast("catalog").results(timeout_s=60)

    def everywhere(self, test) -> bool:
        return all(test(set(c["adapters"])) for c in self.catalogs())

    def holders(self, adapter: str) -> set[str]:
        """The replicas Ray's router (in our router deployment) would send `adapter` to first."""
        placement = self.routing_state()["placement"]
        assert placement is not None, "Ray's private router state is unreadable: see LoraplexRouter.routing_state"
        return {replica for replica, names in placement.items() if adapter in names}


@pytest.fixture(scope="module")
def adapter_dirs(adapter_dir):
    return {name: adapter_dir("llama", rank, targets, seed) for name, (rank, targets, seed) in ADAPTERS.items()}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_dirs):
    return PeftReference(tiny_model_dir("llama"), adapter_dirs)


@pytest.fixture(scope="module")
def ray_app(tiny_model_dir, adapter_dirs, s3_endpoint, tmp_path_factory) -> Iterator[RayApp]:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="ray-fleet")
    root = tmp_path_factory.mktemp("ray-adapter-root")
    for name, src in adapter_dirs.items():
        shutil.copytree(src, root / name)
    flags = ["--model", str(tiny_model_dir("llama")), "--adapter-root", str(root),
             "--registry", "s3://ray-fleet/prod", "--s3-endpoint", s3_endpoint, "--registry-poll-seconds", "0.2",
             "--state-dir", str(tmp_path_factory.mktemp("ray-state")), "--device", "cpu", "--dtype", "float32",
             "--max-lora-rank", "32", "--max-model-len", "256", "--num-kv-blocks", "512", "--block-size", "8"]
    app = build_app(flags, RayOptions(replicas=2, replica_cpus=0, replica_gpus=0))
    # A short private temp dir (Ray's socket paths must stay under 108 characters), removed at the end: no
    # session left in /tmp/ray, no clash with another Ray on the machine.
    temp = tempfile.mkdtemp(prefix="lpray-", dir="/tmp")
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    port = free_port()
    t0 = time.monotonic()
    try:
        ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False,
                 _temp_dir=temp, log_to_driver=False)
        _restore(saved)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(app, name=APP, route_prefix="/")  # returns once both replicas loaded the model
        except RuntimeError as exc:  # Ray's message names no cause; its status holds the replicas' tracebacks
            raise RuntimeError(f"{exc}\n{deploy_messages()}") from exc
        url = f"http://127.0.0.1:{port}"
        ready = wait_until(lambda: _get(url + "/ready"), "the proxy answering /ready", timeout=STARTUP_DEADLINE_S)
        print(f"[ray] Ray started, two replicas loaded, proxy ready: {time.monotonic() - t0:.1f}s")
        yield RayApp(url, ready.json()["model"])
    finally:
        _restore(saved)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def deploy_messages() -> str:
    deployments = serve.status().applications[APP].deployments
    return "\n".join(f"{name}: {d.status}: {d.message}" for name, d in deployments.items())


def _restore(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _get(url: str) -> httpx.Response | None:
    try:
        resp = httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return None
    return resp if resp.status_code == 200 else None


@pytest.fixture(scope="module")
def registered(ray_app) -> None:
    """The four adapters, registered through Ray's proxy (each reaches one replica), then on both replicas
    (the shared registry) and known to the router."""
    t0 = time.monotonic()
    for name in ADAPTERS:
        resp = httpx.post(ray_app.url + "/v1/adapters", json={"name": name, "path": name}, timeout=120)
        assert resp.status_code == 201, resp.text
    wait_until(lambda: ray_app.everywhere(lambda names: names == set(ADAPTERS)),
               "every replica listing the four adapters", timeout=PROPAGATION_DEADLINE_S)
    wait_until(lambda: set(ray_app.routing_state()["adapters"]) == set(ADAPTERS), "the router knowing them",
               timeout=PROPAGATION_DEADLINE_S)
    print(f"[ray] 4 registrations through the router, on both replicas and known to the router: "
          f"{time.monotonic() - t0:.2f}s")


@pytest.fixture(scope="module")
def placement(ray_app, registered) -> dict[str, str]:
    """Each adapter's first request, one at a time, each followed by a wait until Ray's router knows where it
    went: {adapter: replica id}. Every test that sends adapter requests uses it, so it runs first."""
    where = {}
    for name in ADAPTERS:
        resp = completion(ray_app, name)
        where[name] = resp.headers[REPLICA_HEADER]
        wait_until(lambda n=name: ray_app.holders(n) == {where[n]},
                   f"Ray's router learning that {name} is on replica {where[name]}", timeout=60)
    print(f"[ray] placement: {where}")
    return where


def completion(ray_app: RayApp, model: str, *, stream: bool = False, chat: bool = False) -> httpx.Response:
    body = {"model": model, "max_tokens": N, "temperature": 0, "ignore_eos": True, "stream": stream}
    body |= {"messages": MESSAGES} if chat else {"prompt": PROMPT}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    resp = httpx.post(ray_app.url + path, json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp


def streamed_text(resp: httpx.Response, chat: bool) -> str:
    events = list(data_lines(resp.text.splitlines()))
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    if chat:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def test_routing_keys_are_the_ones_nginx_uses():
    def key(method, path, body=None, header=None):
        headers = [(b"x-loraplex-adapter", header.encode())] if header else []
        return requested_adapter(method, path, json.dumps(body).encode() if body else b"", headers)

    assert key("POST", "/v1/completions", {"model": "a"}) == "a"
    assert key("POST", "/v1/completions", {"model": "a"}, header="h") == "h"
    assert key("POST", "/generate_stream", {"inputs": "x", "parameters": {"adapter_id": "t"}}) == "t"
    assert key("POST", "/generate", {"inputs": "x"}) is None
    assert key("POST", "/v1/load_lora_adapter", {"lora_name": "v", "lora_path": "p"}) == "v"
    assert key("DELETE", "/v1/adapters/d") == "d"
    assert key("PUT", "/v1/adapters/acme/support") == "acme/support"  # issue 25: a namespaced name is one key
    assert key("GET", "/v1/models") is None
    assert requested_adapter("POST", "/v1/completions", b"{not json", []) is None


def test_registration_is_refused_only_when_it_would_reach_one_replica():
    assert "--registry" in registration_refusal({"registry": None}, replicas=2)
    assert registration_refusal({"registry": "s3://b/p"}, replicas=2) is None
    assert registration_refusal({"registry": None}, replicas=1) is None


def test_serve_ray_help_lists_its_flags_and_the_serve_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--replicas" in out and "--ray-address" in out and "--max-loras" in out


def test_app_builder_for_serve_run_and_config_files():
    app = app_builder({"flags": "--model /models/base --registry s3://b/p --max-loras 4", "replicas": "3",
                       "replica_cpus": "0.5"})
    assert isinstance(app, serve.Application)
    with pytest.raises(ValueError, match="unknown argument"):
        app_builder({"flags": "", "replica": "2"})


def test_router_is_light_and_lists_every_adapter(ray_app, registered):
    assert ray_app.routing_state()["torch_imported"] is False
    models = httpx.get(ray_app.url + "/v1/models", timeout=60).json()["data"]
    assert {m["id"] for m in models} == {ray_app.base, *ADAPTERS}


def test_each_adapter_stays_on_one_replica_and_both_replicas_serve(ray_app, placement):
    assert len(set(placement.values())) == 2, placement  # a new adapter goes to the replica holding fewer
    for name, replica in placement.items():
        for stream in (False, True):
            assert completion(ray_app, name, stream=stream).headers[REPLICA_HEADER] == replica, name
    assert {name: ray_app.holders(name) for name in ADAPTERS} == {name: {r} for name, r in placement.items()}


def test_metrics_merge_every_replica_with_a_replica_label(ray_app, placement):
    """One scrape of the router covers both replicas, each series labelled with its replica; the request
    counters agree with the placement."""
    from prometheus_client.parser import text_string_to_metric_families

    resp = httpx.get(ray_app.url + "/metrics", timeout=60)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    slots = families["loraplex_adapter_slots_total"].samples
    assert sorted(s.labels["replica"] for s in slots) == sorted(set(placement.values()))
    served = {(s.labels["adapter"], s.labels["replica"]) for s in families["loraplex_requests"].samples
              if s.name == "loraplex_requests_total" and s.labels["status"] == "200"
              and s.labels["adapter"] in ADAPTERS}
    assert served == set(placement.items())


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_greedy_outputs_equal_peft_for_every_adapter(ray_app, placement, reference, tokenizer, chat, stream):
    prompt_ids = chat_ids(tokenizer, MESSAGES) if chat else tokenizer.encode(PROMPT)
    for name in [*ADAPTERS, None]:
        resp = completion(ray_app, name or ray_app.base, stream=stream, chat=chat)
        if stream:
            assert resp.headers["content-type"].startswith("text/event-stream")
            text = streamed_text(resp, chat)
        else:
            choice = resp.json()["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        assert text == expected_text(reference, tokenizer, prompt_ids, name, N), name
        if name is not None:
            assert resp.headers[REPLICA_HEADER] == placement[name]


def on_replica_of(ray_app: RayApp, adapter: str, method: str, path: str, **kwargs) -> httpx.Response:
    """A request the router sends to the replica holding `adapter` (the X-Loraplex-Adapter hint): the test
    hooks and /metrics of that replica."""
    resp = httpx.request(method, ray_app.url + path, headers={"X-Loraplex-Adapter": adapter}, timeout=60, **kwargs)
    assert resp.status_code == 200, resp.text
    return resp


def steps(ray_app: RayApp, adapter: str, n: int | None) -> None:
    """The engine of `adapter`'s replica runs `n` more steps, then holds (None: runs freely)."""
    on_replica_of(ray_app, adapter, "POST", "/_test/engine/steps", json={"steps": n})


def test_sse_is_relayed_as_it_comes(ray_app, placement, reference, tokenizer):
    """The replica's engine is held after 3 steps: a first event can only arrive if nothing on the way (router,
    Ray's proxy) waits for the end of the stream; the httpx read timeout bounds a buffering setup."""
    name = "r2"
    assert on_replica_of(ray_app, name, "GET", "/_test/engine").headers[REPLICA_HEADER] == placement[name]
    body = {"model": name, "prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": True, "stream": True}
    steps(ray_app, name, 3)
    try:
        with httpx.stream("POST", ray_app.url + "/v1/completions", json=body, timeout=60) as resp:
            assert resp.headers[REPLICA_HEADER] == placement[name]
            lines = data_lines(resp.iter_lines())
            first = json.loads(next(lines))  # while the engine holds: streamed, not buffered
            steps(ray_app, name, None)
            rest = list(lines)
    finally:
        steps(ray_app, name, None)
    assert rest[-1] == "[DONE]"
    text = first["choices"][0]["text"] + "".join(json.loads(e)["choices"][0]["text"] for e in rest[:-1])
    assert text == expected_text(reference, tokenizer, tokenizer.encode(PROMPT), name, N)


def test_client_leaving_mid_stream_aborts_the_request_on_the_replica(ray_app, placement):
    """Ray cancels the router's call, the router the replica's, and the replica tells our app the client went
    away: the request leaves the (held) engine and counts as 499 there."""
    name, endpoint = "r3", "/v1/completions"
    gone = f'loraplex_requests_total{{adapter="{name}",endpoint="{endpoint}",status="499"}}'

    def gone_count() -> float:
        text = on_replica_of(ray_app, name, "GET", "/metrics").text
        return float(next((line.split()[-1] for line in text.splitlines() if line.startswith(gone)), 0))

    before = gone_count()
    body = {"model": name, "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    steps(ray_app, name, 3)
    try:
        with httpx.stream("POST", ray_app.url + endpoint, json=body, timeout=60) as resp:
            lines = data_lines(resp.iter_lines())  # keep a reference: a collected iterator closes the stream
            assert json.loads(next(lines))["choices"], "a first event"
            assert on_replica_of(ray_app, name, "GET", "/_test/engine").json()["running"] == 1
        # Leaving the block closed the connection with about 197 tokens to go; the engine still holds.
        wait_until(lambda: on_replica_of(ray_app, name, "GET", "/_test/engine").json()["running"] == 0,
                   "the request aborted in the held engine")
        wait_until(lambda: gone_count() == before + 1, "the request counted as 499 on its replica")
    finally:
        steps(ray_app, name, None)


def test_unknown_adapter_404_passes_through_in_each_dialect(ray_app, placement):
    resp = httpx.post(ray_app.url + "/v1/completions", json={"model": "no-such-adapter", "prompt": "hi",
                                                             "max_tokens": 2}, timeout=60)
    assert resp.status_code == 404 and resp.headers[REPLICA_HEADER] in placement.values()
    error = resp.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("not_found_error", "model", 404)
    assert "no-such-adapter" in error["message"]
    resp = httpx.post(ray_app.url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "nope"}},
                      timeout=60)
    assert resp.status_code == 404 and resp.json()["error_type"] == "not_found" and "nope" in resp.json()["error"]
    # A name that never was an adapter leaves no trace in Ray's routing state.
    assert not any({"no-such-adapter", "nope"} & set(names) for names in ray_app.routing_state()["placement"].values())


def test_base_model_over_tgi(ray_app):
    resp = httpx.post(ray_app.url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}},
                      timeout=60)
    assert resp.status_code == 200 and resp.json()["generated_text"]


def test_a_deletion_through_the_router_reaches_both_replicas(ray_app, placement):
    """Last: r4 is gone afterwards."""
    resp = httpx.delete(ray_app.url + "/v1/adapters/r4", timeout=60)
    assert resp.status_code == 200 and resp.headers[REPLICA_HEADER] == placement["r4"], resp.text
    wait_until(lambda: ray_app.everywhere(lambda names: "r4" not in names), "every replica forgetting r4",
               timeout=PROPAGATION_DEADLINE_S)
    resp = httpx.post(ray_app.url + "/v1/completions", json={"model": "r4", "prompt": "hi", "max_tokens": 2},
                      timeout=60)
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "model"

