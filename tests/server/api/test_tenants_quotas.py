"""Issue 25's quotas and metering: requests_per_minute and tokens_per_minute hold within 5 % over a minute of flood
(time is a fake clock the test advances, so the minute takes what the requests take, on any machine), the 429s name
the quota and carry Retry-After, max_queued and max_concurrent cap what a tenant has in flight, max_adapters and
max_upload_bytes cap its registrations, and GET /v1/usage and the loraplex_tenant_* metrics count the same tokens
the responses report."""

from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.server.api.quotas import TenantQuotas
from loraplex.server.tenants import Tenant, TenantLimits
from loraplex.server.usage import UsageBook

from .tenants_app import METRICS_KEY, OPERATOR_KEY, auth, key_of, tenant_server, tenant_toml

RPM, TPM = 60, 1200
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- the buckets alone -------------------------------------------------------------------------------------
def _quotas(**limits: int) -> tuple[TenantQuotas, Tenant, FakeClock]:
    clock = FakeClock()
    return TenantQuotas(UsageBook(), clock), Tenant("t", limits=TenantLimits(**limits)), clock


@pytest.mark.parametrize("per_minute", [60, 120, 600, 6000])
def test_requests_per_minute_holds_within_5_percent_over_a_minute_of_flood(per_minute):
    quotas, tenant, clock = _quotas(requests_per_minute=per_minute)
    admitted = 0
    for _ in range(20 * per_minute):  # 20x the quota, evenly over one minute
        admitted += quotas.admit(tenant, 1, 0, lambda: None) is None
        clock.now += 60 / (20 * per_minute)
    assert per_minute <= admitted <= 1.05 * per_minute, admitted


def test_tokens_per_minute_holds_within_5_percent_with_requests_in_flight():
    """8 requests in flight at once, each 20 prompt tokens (charged at admission) and 40 output tokens produced
    over the next 2 s: what the tenant got in the minute stays within 5 % of its quota, and close to it."""
    per_minute = 24_000
    quotas, tenant, clock = _quotas(tokens_per_minute=per_minute)
    running: list[list[int]] = []  # per request: output tokens still to produce
    served = 0
    for _ in range(6000):  # a 10 ms tick over one minute
        for left in running:
            n = min(left[0], 2)  # 2 tokens per tick = 40 tokens in 0.2 s
            quotas.charge_output("t", n)
            left[0] -= n
            served += n
        running = [left for left in running if left[0]]
        while len(running) < 8 and quotas.admit(tenant, 1, 20, lambda: None) is None:
            running.append([40])
            served += 20
        clock.now += 0.01
    assert 0.95 * per_minute <= served <= 1.05 * per_minute, served


def test_a_running_request_finishes_past_the_budget_and_the_next_one_waits_for_the_debt():
    quotas, tenant, clock = _quotas(tokens_per_minute=600)  # 10 tokens a second, a burst of 10
    assert quotas.admit(tenant, 1, 5, lambda: None) is None
    quotas.charge_output("t", 100)  # way over: nothing stops it
    refused = quotas.admit(tenant, 1, 5, lambda: None)
    assert refused is not None and refused.quota == "tokens_per_minute" and refused.retry_after_s == 10
    assert "tokens_per_minute" in refused.message and "600" in refused.message
    clock.now += 10
    assert quotas.admit(tenant, 1, 5, lambda: None) is None


def test_the_server_wide_refusal_charges_nothing():
    quotas, tenant, _ = _quotas(requests_per_minute=60)
    refused = quotas.admit(tenant, 1, 0, lambda: "the server is at capacity")
    assert refused is not None and refused.quota == "max_queue"
    assert quotas.admit(tenant, 1, 0, lambda: None) is None  # the bucket was not charged by the refusal
    assert quotas.usage.snapshot()["t"].throttled == {"max_queue": 1}


# ---- over HTTP ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, adapter_dir):
    toml = (tenant_toml("rated", ["rated/*", "base"], ["rated/*"], requests_per_minute=RPM)
            + tenant_toml("metered", ["metered/*", "base"], ["metered/*"], tokens_per_minute=TPM)
            + tenant_toml("capped", ["capped/*", "base"], ["capped/*"], max_concurrent=1, max_queued=2,
                          max_adapters=2, max_upload_bytes=20_000)
            + tenant_toml("free", ["*", "base"], ["free/*"]))
    with tenant_server(tmp_path_factory.mktemp("quotas"), tiny_model_dir("llama"),
                       lambda seed: adapter_dir("llama", rank=4, seed=seed), toml, {"capped/one": 0}) as served:
        yield served


@pytest.fixture
def clock(served):
    client, runtime = served
    fake = FakeClock()
    runtime.quotas.clock = fake
    yield fake


def _complete(client, tenant: str, max_tokens: int = 8, **extra):
    body = {"model": "base", "prompt": "hello there", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return client.post("/v1/completions", json={**body, **extra}, headers=auth(key_of(tenant)))


def test_requests_per_minute_over_http_a_minute_of_flood(served, clock):
    client, _ = served
    ok, refused = 0, None
    for _ in range(240):  # 4 a second for a minute: 4x the quota
        resp = _complete(client, "rated", max_tokens=1)
        if resp.status_code == 200:
            ok += 1
        else:
            refused = resp
        clock.now += 0.25
    assert RPM <= ok <= 1.05 * RPM, ok
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    message = refused.json()["error"]["message"]
    assert "'rated'" in message and "requests_per_minute" in message and str(RPM) in message


def test_tokens_per_minute_over_http_a_minute_of_flood_and_usage_agrees(served, clock):
    client, _ = served
    before = _usage(client, "metered")
    tokens, refused = 0, None
    for _ in range(600):  # 10 a second for a minute
        resp = _complete(client, "metered")
        if resp.status_code == 200:
            tokens += resp.json()["usage"]["total_tokens"]
        else:
            refused = resp
        clock.now += 0.1
    assert 0.95 * TPM <= tokens <= 1.05 * TPM, tokens
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "tokens_per_minute" in refused.json()["error"]["message"]
    after = _usage(client, "metered")
    counted = sum(after["tokens"][k] - before["tokens"][k] for k in ("prompt", "output"))
    assert counted == tokens  # metering = what the responses reported
    assert after["throttled"]["tokens_per_minute"] - before["throttled"].get("tokens_per_minute", 0) > 0


def _usage(client, tenant: str) -> dict:
    (entry,) = client.get("/v1/usage", headers=auth(key_of(tenant))).json()["data"]
    assert entry["tenant"] == tenant
    return entry


def test_max_queued_caps_what_a_tenant_has_in_flight_and_max_concurrent_what_runs(served):
    client, runtime = served
    runtime.engine.allow_steps(0)  # nothing finishes: the requests stay in flight by construction
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(_complete(client, "capped", max_tokens=2)))
               for _ in range(3)]
    free = threading.Thread(target=lambda: results.append(_complete(client, "free", max_tokens=2)))
    try:
        for t in threads:
            t.start()
        _wait(lambda: runtime.quotas.in_flight("capped") == 3)
        refused = _complete(client, "capped", max_tokens=2)
        assert refused.status_code == 429 and "max_queued" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "1"
        free.start()  # another tenant is admitted meanwhile: capped's cap is its own
        _wait(lambda: runtime.quotas.in_flight("free") == 1)
    finally:
        runtime.engine.allow_steps(None)
        for t in [*threads, free]:
            if t.ident is not None:  # started
                t.join(60)
    assert [r.status_code for r in results] == [200, 200, 200, 200]
    too_big = _complete(client, "capped", max_tokens=2, n=4, temperature=1.0)
    assert too_big.status_code == 400 and "max_concurrent + max_queued" in too_big.json()["error"]["message"]


def _wait(condition, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout  # bounds a broken server only
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_held_tenant_does_not_hold_up_another(served):
    """capped (max_concurrent 1) has a request held in the engine's queue behind its running one; free's request
    is admitted and runs meanwhile (the engine holds only capped's)."""
    client, runtime = served
    sched = runtime.engine.engine.scheduler
    runtime.engine.allow_steps(1)
    done: list = []
    threads = [threading.Thread(target=lambda: done.append(_complete(client, "capped", max_tokens=4)))
               for _ in range(2)]
    try:
        for t in threads:
            t.start()
        _wait(lambda: runtime.engine.snapshot.waiting + runtime.engine.snapshot.running == 2)
        _wait(lambda: dict(runtime.engine.snapshot.waiting_tenants).get("capped") == 1)
        assert sum(r.tenant.id == "capped" for r in sched.running) <= 1
    finally:
        runtime.engine.allow_steps(None)
        for t in threads:
            t.join(60)
    assert [r.status_code for r in done] == [200, 200]


def test_max_adapters_and_max_upload_bytes(served, adapter_dir):
    client, _ = served
    key = auth(key_of("capped"))
    files = {n: (adapter_dir("llama", rank=4, seed=1) / n).read_bytes() for n in (CONFIG, WEIGHTS)}
    big = {CONFIG: files[CONFIG], WEIGHTS: files[WEIGHTS] + b"\0" * 30_000}
    over = client.put("/v1/adapters/capped/big", files={k: (k, v) for k, v in big.items()}, headers=key)
    assert over.status_code == 413 and "max_upload_bytes" in over.text and "20000" in over.text

    def chunks():  # no Content-Length: counted as it arrives
        yield b"--b\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"a\"\r\n\r\n"
        for _ in range(30):
            yield b"\0" * 1000

    chunked = client.put("/v1/adapters/capped/big", content=chunks(), headers={
        **key, "content-type": "multipart/form-data; boundary=b"})
    assert chunked.status_code == 413 and "max_upload_bytes" in chunked.text
    assert client.post("/v1/adapters", json={"name": "capped/two", "path": "spare-1"}, headers=key).status_code == 201
    full = client.post("/v1/adapters", json={"name": "capped/three", "path": "spare-2"}, headers=key)
    assert full.status_code == 403 and "max_adapters is 2" in full.text
    assert client.delete("/v1/adapters/capped/two", headers=key).status_code == 200
    assert client.post("/v1/adapters", json={"name": "capped/three", "path": "spare-2"}, headers=key).status_code == 201
    throttled = _usage(client, "capped")["throttled"]
    assert throttled["max_adapters"] == 1 and throttled["max_upload_bytes"] == 2


def test_usage_and_metrics_agree_and_a_tenant_sees_only_its_own(served):
    client, _ = served
    assert _complete(client, "free").status_code == 200
    mine = client.get("/v1/usage", headers=auth(key_of("free"))).json()
    assert [e["tenant"] for e in mine["data"]] == ["free"]
    everyone = client.get("/v1/usage", headers=auth(OPERATOR_KEY)).json()["data"]
    assert [e["tenant"] for e in everyone] == sorted(["admin", "capped", "free", "metered", "rated"])
    text = client.get("/metrics", headers=auth(METRICS_KEY)).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for entry in everyone:
        for kind, value in entry["tokens"].items():
            assert _sample(families, "loraplex_tenant_tokens", tenant=entry["tenant"], kind=kind) == value
        for status, value in entry["requests"].items():
            assert _sample(families, "loraplex_tenant_requests", tenant=entry["tenant"], status=status) == value
        for quota, value in entry["throttled"].items():
            assert _sample(families, "loraplex_tenant_throttled", tenant=entry["tenant"], quota=quota) == value
        assert _sample(families, "loraplex_tenant_queue_depth", tenant=entry["tenant"]) == entry["queue_depth"]
    assert families["loraplex_tenants_reload_errors"].samples[0].value == 0


def _sample(families: dict, family: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name in (family, family + "_total") and s.labels == labels:
            return s.value
    raise AssertionError(f"no {family}{labels}")
