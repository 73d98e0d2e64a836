"""Metrics: every documented name is exposed on /metrics with its type and labels, values follow real
requests, label values come only from registered adapters, and the router-facing vllm:* gauges carry what
the inference extension's model-server protocol expects.

Runs the app in-process (a real Runtime on the tiny model, FastAPI's TestClient) to stay fast.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from loraplex.adapters import versions as V
from loraplex.adapters.registry import AdapterRecord, AdapterVersion, RecordView
from loraplex.adapters.slot_table import AdapterSnapshot, AdapterState, AdapterView, CacheStats
from loraplex.server.engine.async_engine import EngineSnapshot
from loraplex.server.metrics import Metrics
from loraplex.server.usage import UsageBook

ADAPTERS = ("alpha", "beta")


def fake_runtime(**parts) -> SimpleNamespace:
    """The parts of a Runtime the collector reads, without tenants (its per-tenant families read an empty book)."""
    return SimpleNamespace(usage=UsageBook(), tenants=None, tenant_names=lambda: ["default"], queue_depths=dict,
                           **parts)
MAX_LORAS = 4

# DESIGN.md's metric list: family name (as the parser reports it: counters without _total) -> (type, labels).
DOCUMENTED = {
    "loraplex_requests": ("counter", {"adapter", "endpoint", "status"}),
    "loraplex_request_latency_seconds": ("histogram", set()),
    "loraplex_time_to_first_token_seconds": ("histogram", set()),
    "loraplex_time_per_output_token_seconds": ("histogram", set()),
    "loraplex_prompt_tokens": ("counter", set()),
    "loraplex_generation_tokens": ("counter", {"adapter"}),
    "loraplex_num_requests_running": ("gauge", set()),
    "loraplex_num_requests_waiting": ("gauge", set()),
    "loraplex_batch_size": ("histogram", set()),
    "loraplex_batch_distinct_adapters": ("histogram", set()),
    "loraplex_kv_cache_usage_ratio": ("gauge", set()),
    "loraplex_adapter_cache_hits": ("counter", {"tier"}),
    "loraplex_adapter_cache_misses": ("counter", {"tier"}),
    "loraplex_adapter_evictions": ("counter", {"tier"}),
    "loraplex_adapter_load_seconds": ("histogram", set()),
    "loraplex_adapters_resident": ("gauge", {"tier"}),
    "loraplex_adapter_slots_total": ("gauge", set()),
    "loraplex_adapters_registered": ("gauge", set()),
    "vllm:lora_requests_info": ("gauge", {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}),
    "vllm:num_requests_running": ("gauge", set()),
    "vllm:num_requests_waiting": ("gauge", set()),
    "vllm:gpu_cache_usage_perc": ("gauge", set()),
    "vllm:lora_adapter_loaded": ("gauge", {"adapter_name", "level", "pinned", "rank"}),
    "vllm:num_gpu_loaded_lora_adapters": ("gauge", set()),
    "vllm:max_gpu_lora_adapters": ("gauge", set()),
    "vllm:lora_adapter_load_seconds": ("histogram", set()),
    "loraplex_adapter_version_info": ("gauge", {"adapter", "version"}),
}


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model_dir, adapter_dir):
    """A loaded runtime serving two preloaded adapters, behind the real app."""
    from loraplex.server.api.app import create_app
    from loraplex.server.cli import build_parser, configs_from_args
    from loraplex.server.runtime import Runtime

    base = tmp_path_factory.mktemp("metrics")
    root = base / "adapters"
    for i, name in enumerate(ADAPTERS):
        shutil.copytree(adapter_dir("llama", rank=4, seed=i), root / name)
    args = ["serve", "--model", str(tiny_model_dir("llama")), "--state-dir", str(base / "state"),
            "--adapter-root", str(root), "--device", "cpu", "--dtype", "float32", "--max-model-len", "256",
            "--num-kv-blocks", "256", "--block-size", "8", "--max-loras", str(MAX_LORAS),
            "--served-model-name", "base", *[f"--preload={n}={n}" for n in ADAPTERS]]
    runtime = Runtime(configs_from_args(build_parser().parse_args(args)))
    runtime.load()
    assert runtime.load_error is None, runtime.load_error
    with TestClient(create_app(runtime, load_in_background=False)) as c:
        yield c


def scrape(client: TestClient) -> dict:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(resp.text)}


def value(families: dict, sample_name: str, **labels: str) -> float:
    """The sample's value; 0 when the labelled series does not exist yet (counters start lazily)."""
    family = families[_family_of(sample_name)]
    for s in family.samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return 0.0


def _family_of(sample_name: str) -> str:
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in DOCUMENTED:
            return sample_name[: -len(suffix)]
    return sample_name


def complete(client: TestClient, model: str, max_tokens: int = 4) -> dict:
    resp = client.post("/v1/completions", json={"model": model, "prompt": "hello world", "max_tokens": max_tokens,
                                                "temperature": 0, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_every_documented_metric_is_exposed_with_its_type_and_labels(client):
    complete(client, "alpha")  # labelled counters appear with their first observation
    families = scrape(client)
    missing = sorted(set(DOCUMENTED) - set(families))
    assert not missing, f"not exposed: {missing}"
    for name, (kind, labels) in DOCUMENTED.items():
        family = families[name]
        assert family.type == kind, f"{name} is a {family.type}, documented as a {kind}"
        assert family.samples, f"{name} has no samples"
        for s in family.samples:
            assert set(s.labels) - {"le"} == labels, f"{s.name} labels {sorted(s.labels)}, want {sorted(labels)}"


def test_values_follow_a_completion(client):
    before = scrape(client)
    body = complete(client, "beta", max_tokens=5)
    after = scrape(client)

    def delta(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    # The engine thread records a step's batch histograms just after delivering that step's tokens, so the
    # last step's observation may land after the HTTP answer: give it a moment (bounded) before checking.
    for _ in range(100):
        if delta("loraplex_batch_size_count") >= 5:
            break
        time.sleep(0.05)
        after = scrape(client)

    ok = {"adapter": "beta", "endpoint": "/v1/completions", "status": "200"}
    assert delta("loraplex_requests_total", **ok) == 1
    assert delta("loraplex_generation_tokens_total", adapter="beta") == body["usage"]["completion_tokens"] == 5
    assert delta("loraplex_prompt_tokens_total") == body["usage"]["prompt_tokens"] > 0
    for hist in ("loraplex_request_latency_seconds", "loraplex_time_to_first_token_seconds",
                 "loraplex_time_per_output_token_seconds"):
        assert delta(f"{hist}_count") == 1, hist
        assert delta(f"{hist}_sum") > 0, hist
    assert delta("loraplex_batch_size_count") >= 5  # at least one engine step per generated token
    assert value(after, "loraplex_adapters_registered") == len(ADAPTERS)
    assert value(after, "loraplex_adapter_slots_total") == MAX_LORAS
    assert value(after, "loraplex_adapters_resident", tier="disk") == len(ADAPTERS)
    assert 1 <= value(after, "loraplex_adapters_resident", tier="device") <= MAX_LORAS
    hits_misses = sum(value(after, f"loraplex_adapter_cache_{k}_total", tier=t)
                      for k in ("hits", "misses") for t in ("host", "device"))
    assert hits_misses >= 2  # alpha's and beta's device lookups at least
    # Idle again: nothing running or waiting, every KV block returned.
    for name in ("loraplex_num_requests_running", "loraplex_num_requests_waiting", "vllm:num_requests_running",
                 "vllm:num_requests_waiting"):
        assert value(after, name) == 0, name
    assert value(after, "loraplex_kv_cache_usage_ratio") == value(after, "vllm:gpu_cache_usage_perc") == 0


def test_lora_requests_info_value_is_a_fresh_timestamp(client):
    t0 = time.time()
    (sample,) = scrape(client)["vllm:lora_requests_info"].samples
    assert t0 - 1 <= sample.value <= time.time() + 1
    assert sample.labels == {"max_lora": str(MAX_LORAS), "running_lora_adapters": "", "waiting_lora_adapters": ""}


def _all_label_values(families: dict) -> set[str]:
    return {v for f in families.values() for s in f.samples for v in s.labels.values()}


@pytest.mark.parametrize("name", ["no-such-adapter", 'evil"} 1\n# HELP x', "a" * 300])
def test_unknown_model_names_never_become_label_values(client, name):
    before = scrape(client)
    resp = client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 4, "temperature": 0})
    assert resp.status_code == 404, resp.text
    tgi = client.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": name, "max_new_tokens": 4}})
    assert tgi.status_code == 404, tgi.text
    after = scrape(client)  # parses: a hostile name cannot break the exposition format either
    assert name not in _all_label_values(after)
    assert all(name[:20] not in v for v in _all_label_values(after) if v)
    # The rejection was counted, under the placeholder label rather than the requested name.
    rejected = {"adapter": "unknown", "endpoint": "/v1/completions", "status": "404"}
    assert value(after, "loraplex_requests_total", **rejected) - value(before, "loraplex_requests_total",
                                                                       **rejected) == 1
    assert set(_all_label_values(after)) >= {"alpha", "unknown"}


class _Registry(RecordView):
    def __init__(self, records: list[AdapterRecord]) -> None:
        self._records = {r.name: r for r in records}


def _version(seed: str, rank: int) -> AdapterVersion:
    return AdapterVersion(hashlib.sha256(seed.encode()).hexdigest(), "upload", "", meta={"rank": rank})


def test_state_gauges_read_the_engine_snapshot_at_scrape_time():
    """The collector's view of queues, KV usage, residency and cache counters: the snapshots the engine
    thread published (never its live queues or slot table). The engine knows adapter versions (name@sha256);
    routers read names."""
    stats = CacheStats(hits={"host": 0, "device": 7}, misses={"host": 2, "device": 0},
                       evictions={"host": 0, "device": 1})
    a1, a2, b1, c1, d1 = (_version(s, r) for s, r in (("a1", 8), ("a2", 8), ("b1", 4), ("c1", 16), ("d1", 8)))
    records = [AdapterRecord("a-ad", (a2, a1), pinned=True), AdapterRecord.of("b-ad", b1),
               AdapterRecord.of("c-ad", c1), AdapterRecord.of("d-ad", d1)]
    store = SimpleNamespace(names=lambda: [r.name for r in records], registry=_Registry(records))
    ka1, ka2, kb, kc = (V.engine_key(n, v.sha256) for n, v in (("a-ad", a1), ("a-ad", a2), ("b-ad", b1),
                                                                 ("c-ad", c1)))
    views = {ka2: AdapterView("device", AdapterState.DEVICE_READY, pinned=True)}
    adapters = AdapterSnapshot(views, resident={"device": (ka1, ka2, kb, "merge:x"), "host": (ka2, kb, kc)},
                               stats=stats)
    snap = EngineSnapshot(waiting=1, running=4, kv_usage=0.25, running_adapters=(ka1, ka2, kb),
                          waiting_adapters=(kc,))
    runtime = fake_runtime(engine=SimpleNamespace(snapshot=snap, adapters=adapters), store=store, poller=None,
                              resolver=None, served_model_name="base",
                              config=SimpleNamespace(engine=SimpleNamespace(lora=SimpleNamespace(max_loras=4))))
    body, _ = Metrics(runtime).render()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    (info,) = families["vllm:lora_requests_info"].samples
    assert info.labels == {"max_lora": "4", "running_lora_adapters": "a-ad,b-ad", "waiting_lora_adapters": "c-ad"}
    assert value(families, "vllm:num_requests_running") == value(families, "loraplex_num_requests_running") == 4
    assert value(families, "vllm:num_requests_waiting") == value(families, "loraplex_num_requests_waiting") == 1
    assert value(families, "vllm:gpu_cache_usage_perc") == value(families, "loraplex_kv_cache_usage_ratio") == 0.25
    assert [value(families, "loraplex_adapters_resident", tier=t) for t in ("device", "host", "disk")] == [3, 3, 4]
    assert value(families, "loraplex_adapter_cache_hits_total", tier="device") == 7
    assert value(families, "loraplex_adapter_cache_misses_total", tier="host") == 2
    assert value(families, "loraplex_adapter_evictions_total", tier="device") == 1
    assert value(families, "loraplex_adapters_registered") == 4
    # Loaded adapters by name and level (a canary's two versions of a-ad count 2 in one series when their labels
    # agree; the pinned current one has its own); a merge's virtual adapter is no registered adapter.
    loaded = {tuple(s.labels[k] for k in ("adapter_name", "level", "pinned", "rank")): s.value
              for s in families["vllm:lora_adapter_loaded"].samples}
    assert loaded == {("a-ad", "device", "false", "8"): 1, ("a-ad", "device", "true", "8"): 1,
                      ("b-ad", "device", "false", "4"): 1, ("a-ad", "host", "true", "8"): 1,
                      ("b-ad", "host", "false", "4"): 1, ("c-ad", "host", "false", "16"): 1}
    assert value(families, "vllm:num_gpu_loaded_lora_adapters") == 3
    assert value(families, "vllm:max_gpu_lora_adapters") == 4
    versions = {s.labels["adapter"]: s.labels["version"] for s in families["loraplex_adapter_version_info"].samples}
    assert versions == {"a-ad": a2.sha256[:12], "b-ad": b1.sha256[:12], "c-ad": c1.sha256[:12],
                        "d-ad": d1.sha256[:12]}


def test_label_sanitizer_accepts_only_registered_names_and_the_base():
    class Store(set):
        registry = _Registry([])

        def names(self) -> list[str]:
            return sorted(self)

    runtime = fake_runtime(store=Store({"alpha"}), served_model_name="base", engine=None, poller=None, resolver=None,
                              config=SimpleNamespace(engine=SimpleNamespace(lora=SimpleNamespace(max_loras=1))))
    metrics = Metrics(runtime)
    assert [metrics.label(n) for n in ("alpha", "base", None, "ALPHA", "beta", "", "alpha@" + "0" * 64)] == \
        ["alpha", "base", "base", "unknown", "unknown", "unknown", "alpha"]


class _Store(set):
    registry = _Registry([])

    def names(self) -> list[str]:
        return sorted(self)


def _bare_metrics(*registered: str) -> tuple[Metrics, _Store]:
    store = _Store(registered)
    runtime = fake_runtime(store=store, served_model_name="base", engine=None, poller=None, resolver=None,
                              config=SimpleNamespace(engine=SimpleNamespace(lora=SimpleNamespace(max_loras=1))))
    return Metrics(runtime), store


def _labelled(metrics: Metrics) -> set[str]:
    """Every label value on the registry's collected samples."""
    return {v for fam in metrics.registry.collect() for s in fam.samples for v in s.labels.values()}


def test_children_of_an_unregistered_adapter_are_removed():
    """Registering and deleting adapters with fresh names does not grow the label sets: after the DELETE,
    no sample names them, whatever endpoint/status children they had; other children stay."""
    names = [f"tenant-{i}" for i in range(20)]
    metrics, store = _bare_metrics("keep", *names)
    for i, name in enumerate(["keep", *names]):
        for endpoint, status in (("/v1/completions", 200), ("/generate", 400 + i % 3)):
            metrics.record_request(endpoint=endpoint, adapter=name, status=status, generation_tokens=3)
    metrics.record_request(endpoint="/v1/completions", adapter=None, status=200, generation_tokens=1)
    assert _labelled(metrics) >= {"keep", "base", *names}
    for name in names:  # as the DELETE route does: the store first, then the metrics
        store.discard(name)
        metrics.forget_adapter(name)
    assert not _labelled(metrics) & set(names)
    assert _labelled(metrics) >= {"keep", "base"}
    assert set(metrics._children) == {"keep", "base"}  # the bookkeeping is bounded as well


def test_a_request_ending_after_the_delete_does_not_recreate_the_children():
    """The race: a request for the adapter finishes just after its DELETE. It is counted under "unknown"
    (the adapter is no longer registered), and its adapter's children stay removed."""
    metrics, store = _bare_metrics("gone")
    metrics.record_request(endpoint="/v1/completions", adapter="gone", status=200, generation_tokens=2)
    store.discard("gone")
    metrics.forget_adapter("gone")
    metrics.record_request(endpoint="/v1/completions", adapter="gone", status=200, generation_tokens=5)
    assert "gone" not in _labelled(metrics)
    late = metrics.registry.get_sample_value("loraplex_generation_tokens_total", {"adapter": "unknown"})
    assert late == 5


def test_delete_routes_remove_the_adapters_metric_children(client):
    """Live app: adapters registered under fresh names, one request each, then unregistered (REST DELETE and
    vLLM's unload alias): /metrics names none of them any more."""
    root = client.app.state.runtime.config.server.adapter_root
    src = root / ADAPTERS[0]
    names = [f"short-lived-{i}" for i in range(4)]
    complete(client, ADAPTERS[0], max_tokens=2)  # a registered adapter's children, which must stay
    for name in names:
        shutil.copytree(src, root / name)
        assert client.post("/v1/adapters", json={"name": name, "path": name}).status_code == 201
        complete(client, name, max_tokens=2)
    assert _all_label_values(scrape(client)) >= set(names)
    for i, name in enumerate(names):
        resp = (client.delete(f"/v1/adapters/{name}") if i % 2 else
                client.post("/v1/unload_lora_adapter", json={"lora_name": name}))
        assert resp.status_code == 200, resp.text
    after = scrape(client)
    assert not _all_label_values(after) & set(names)
    assert value(after, "loraplex_requests_total", adapter=ADAPTERS[0], endpoint="/v1/completions", status="200") > 0
