"""Issue 25 in the scheduler: tenants as the API gives them (fairness.TenantSpec). Weighted VTC shares the engine by
tenant weight whatever adapters a tenant uses; the fair policy's KV victim is the newest request of the most-served
tenant by weighted counter; max_device_slots and max_concurrent hold under a flood of distinct adapters without
holding up other tenants. Driven step by step with the fake slot table; assertions count steps and tokens."""

from __future__ import annotations

from collections import Counter

from loraplex.server.engine.block_pool import BlockPool
from loraplex.server.engine.fairness import TenantSpec
from loraplex.server.engine.request import Request, Status
from loraplex.server.engine.scheduler import Scheduler, SchedulerConfig

from .test_scheduler import FakeCache, _fake_run, _req

W1, W3 = TenantSpec("w1", 1.0), TenantSpec("w3", 3.0)


def _with(req: Request, spec: TenantSpec | None) -> Request:
    req.tenant = spec
    return req


def _flood_shares(with_tenants: bool, steps: int = 600) -> dict[str, float]:
    """w1 floods through two adapters (A1, A2), w3 through one (B); 4 sequence slots. Output tokens per tenant
    over `steps` steps, as shares."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4), BlockPool(4096, 4), FakeCache(8))
    owner = {"A1": W1, "A2": W1, "B": W3}
    for i in range(300):  # w1 sends as many requests as w3, half of them on each of its adapters
        for adapter in ("A1" if i % 2 else "A2", "B"):
            sched.add(_with(_req(f"{adapter}-{i}", adapter=adapter, max_tokens=6),
                            owner[adapter] if with_tenants else None))
    tokens: Counter[str] = Counter()
    for _ in range(steps):
        out = sched.schedule()
        for c in out.chunks:
            if c.samples:
                tokens[owner[c.request.adapter].id] += 1
        _fake_run(sched, out)
    total = sum(tokens.values())
    return {t: n / total for t, n in tokens.items()}


def test_weighted_vtc_shares_by_tenant_weight_whatever_adapters_it_uses():
    shares = _flood_shares(with_tenants=True)
    assert abs(shares["w1"] - 0.25) <= 0.03 and abs(shares["w3"] - 0.75) <= 0.03, shares
    # Without tenants each adapter is a tenant of weight 1: w1's two adapters get two shares of three.
    per_adapter = _flood_shares(with_tenants=False)
    assert abs(per_adapter["w1"] - 2 / 3) <= 0.05, per_adapter


def test_the_kv_victim_is_the_newest_request_of_the_most_served_tenant_by_weighted_counter():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8), BlockPool(4096, 4), FakeCache(8))
    reqs = [_with(_req("w3-old", adapter="B"), W3), _with(_req("w1-a", adapter="A1"), W1),
            _with(_req("w1-b", adapter="A2"), W1), _with(_req("w3-new", adapter="B"), W3)]
    for r in reqs:
        sched.add(r)
    sched.vtc.charge("w3", 90, 0)  # 90 tokens of service / weight 3 = 30
    sched.vtc.charge("w1", 40, 0)  # 40 / weight 1 = 40: the most served, though w3 got more tokens
    assert sched._kv_victim(reqs).request_id == "w1-b"  # w1's newest, across its two adapters
    sched.vtc.charge("w3", 60, 0)  # now 50 > 40
    assert sched._kv_victim(reqs).request_id == "w3-new"


def test_max_device_slots_holds_under_a_flood_of_distinct_adapters_and_others_run_meanwhile():
    capped = TenantSpec("capped", max_device_slots=2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8), BlockPool(4096, 4), FakeCache(8))
    flood = [_with(_req(f"c{i}", adapter=f"cap-{i % 6}", max_tokens=3), capped) for i in range(30)]
    other = [_with(_req(f"o{i}", adapter="other", max_tokens=3), TenantSpec("other")) for i in range(3)]
    for r in flood + other:
        sched.add(r)
    first_run: dict[str, int] = {}
    for step in range(200):
        out = sched.schedule()
        for c in out.chunks:
            first_run.setdefault(c.request.request_id, step)
        held = {r.adapter for r in flood if r.holds_adapter}
        assert len(held) <= 2 and sched.tenant_slots("capped") == held, (step, held)
        _fake_run(sched, out)
        if all(r.status is Status.FINISHED for r in flood + other):
            break
    assert all(r.status is Status.FINISHED for r in flood + other)  # every one of the 6 adapters got its turn
    assert all(first_run[r.request_id] == 0 for r in other)  # the capped tenant's wait held nobody else up


def test_max_concurrent_holds_and_the_rest_of_the_queue_runs():
    capped = TenantSpec("capped", max_concurrent=2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8), BlockPool(4096, 4), FakeCache(8))
    flood = [_with(_req(f"c{i}", adapter="cap", max_tokens=4), capped) for i in range(10)]
    other = [_with(_req(f"o{i}", adapter="other", max_tokens=4), TenantSpec("other")) for i in range(4)]
    for r in flood + other:
        sched.add(r)
    out = sched.schedule()
    assert Counter(c.request.tenant.id for c in out.chunks) == {"capped": 2, "other": 4}
    while any(r.status is not Status.FINISHED for r in flood):
        assert sum(r.status is Status.RUNNING for r in flood) <= 2
        _fake_run(sched, out)
        out = sched.schedule()
