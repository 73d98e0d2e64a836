"""Scheduler policy with a fake adapter slot table: budgets, slot limits, loading waits, fairness, preemption
(tenant fairness itself: test_fairness.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from loraplex.adapters.slot_table import Acquired, SlotState
from loraplex.server.engine.block_pool import BlockPool
from loraplex.server.engine.request import Request, Status
from loraplex.server.engine.sampling_params import SamplingParams
from loraplex.server.engine.scheduler import Scheduler, SchedulerConfig


class FakeCache:
    """`slots` device slots; adapters in `loading` answer LOADING until moved to ready; `refuse` maps a name to
    the state acquire answers from now on (LOADING: unregistered while in use, ERRORED: its load failed)."""

    def __init__(self, slots: int, loading: set[str] | None = None) -> None:
        self.slots: dict[str, int] = {}
        self.refs: dict[str, int] = {}
        self.num_slots = slots
        self.loading = loading or set()
        self.refuse: dict[str, SlotState] = {}
        self.acquires: Counter[str] = Counter()

    def prefetch(self, name: str) -> None:
        pass

    def acquire(self, name: str, *, first: bool = True) -> Acquired:
        self.acquires[name] += 1
        if name in self.refuse:
            return Acquired(self.refuse[name], reason="refused")
        if name in self.loading:
            return Acquired(SlotState.LOADING)
        if name not in self.slots:
            free = set(range(self.num_slots)) - set(self.slots.values())
            idle = [n for n in self.slots if not self.refs.get(n)]
            if not free and not idle:
                return Acquired(SlotState.NO_SLOT)
            slot = min(free) if free else self.slots.pop(idle[0])
            self.slots[name] = slot
        self.refs[name] = self.refs.get(name, 0) + 1
        return Acquired(SlotState.READY, self.slots[name])

    def release(self, name: str) -> None:
        self.refs[name] -= 1


def _req(rid: str, n_prompt: int = 4, adapter: str | None = None, max_tokens: int = 4) -> Request:
    return Request(rid, list(range(5, 5 + n_prompt)), SamplingParams(max_tokens=max_tokens), adapter, None,
                   detokenizer=None, stop_matcher=None)  # type: ignore[arg-type]


def _fake_run(sched: Scheduler, out) -> None:
    """What the engine does after a step: mark computed, append a token to sampling requests, finish."""
    for c in out.chunks:
        c.request.num_computed = c.start + c.n
        if c.samples:
            c.request.output_ids.append(1)
            if len(c.request.output_ids) >= c.request.params.max_tokens:
                sched.finish(c.request)


def test_token_budget_chunks_long_prompts():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batch_tokens=10), BlockPool(64, 4), FakeCache(4))
    sched.add(_req("long", n_prompt=25))
    sched.add(_req("short", n_prompt=3))
    first = sched.schedule()
    assert [(c.request.request_id, c.n) for c in first.chunks] == [("long", 10)]
    assert not first.chunks[0].samples
    _fake_run(sched, first)
    second = sched.schedule()
    assert [(c.request.request_id, c.n) for c in second.chunks] == [("long", 10)]


def test_loading_adapter_waits_without_blocking_others():
    cache = FakeCache(4, loading={"cold"})
    sched = Scheduler(SchedulerConfig(), BlockPool(64, 4), cache)
    sched.add(_req("c", adapter="cold"))
    sched.add(_req("h", adapter="hot"))
    sched.add(_req("b"))
    out = sched.schedule()
    assert {c.request.request_id for c in out.chunks} == {"h", "b"}
    assert [r.request_id for r in sched.waiting] == ["c"]
    _fake_run(sched, out)
    cache.loading.clear()
    assert [c.request.request_id for c in sched.schedule().chunks if c.start == 0] == ["c"]


def test_at_most_max_loras_distinct_adapters_per_step():
    sched = Scheduler(SchedulerConfig(), BlockPool(256, 4), FakeCache(2))
    for i in range(6):
        sched.add(_req(f"r{i}", adapter=f"a{i % 3}"))
    out = sched.schedule()
    assert len({c.request.adapter for c in out.chunks}) == 2
    assert {r.adapter for r in sched.waiting} == {"a2"}


def test_cold_adapter_is_not_starved_by_a_hot_one():
    cfg = SchedulerConfig(max_num_seqs=4, starvation_steps=8)
    sched = Scheduler(cfg, BlockPool(1024, 4), FakeCache(1))
    sched.add(_req("hot0", adapter="hot", max_tokens=6))
    sched.schedule()
    sched.add(_req("cold", adapter="cold", max_tokens=2))
    cold_ran_at = None
    for step in range(200):
        sched.add(_req(f"hot{step + 1}", adapter="hot", max_tokens=6))  # a never-ending hot stream
        out = sched.schedule()
        if any(c.request.request_id == "cold" for c in out.chunks):
            cold_ran_at = step
            break
        _fake_run(sched, out)
    assert cold_ran_at is not None, "the cold adapter starved"


def test_pool_exhaustion_preempts_newest_and_recomputes():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4), BlockPool(4, 4), FakeCache(2))  # 16 positions
    preempted = []
    sched.on_preempt = preempted.append
    sched.add(_req("old", n_prompt=7, max_tokens=8))
    sched.add(_req("new", n_prompt=7, max_tokens=8))
    for _ in range(40):
        if not sched.has_work():
            break
        _fake_run(sched, sched.schedule())
    assert [r.request_id for r in preempted][:1] == ["new"]
    assert not sched.has_work()
    assert sched.pool.num_free == 4


def test_finish_returns_blocks_and_adapter_refs():
    cache = FakeCache(2)
    sched = Scheduler(SchedulerConfig(), BlockPool(16, 4), cache)
    r = _req("x", n_prompt=9, adapter="a")
    sched.add(r)
    sched.schedule()
    assert r.status is Status.RUNNING and sched.pool.num_free == 16 - 3 and cache.refs["a"] == 1
    sched.finish(r)
    assert sched.pool.num_free == 16 and cache.refs["a"] == 0 and r.status is Status.FINISHED


def _preempt_new_by_kv(cache: FakeCache) -> tuple[Scheduler, Request, list[Request]]:
    """Two requests on adapters x and y in a 16-position pool: 'new' (y) gets preempted for KV."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4), BlockPool(4, 4), cache)
    preempted: list[Request] = []
    sched.on_preempt = preempted.append
    sched.add(_req("old", n_prompt=7, adapter="x", max_tokens=8))
    new = _req("new", n_prompt=7, adapter="y", max_tokens=8)
    sched.add(new)
    while not preempted:
        _fake_run(sched, sched.schedule())
    return sched, new, preempted


def test_preempted_request_keeps_its_adapter_and_is_readmitted_without_acquire():
    cache = FakeCache(2)
    sched, new, preempted = _preempt_new_by_kv(cache)
    assert preempted == [new] and new.status is Status.WAITING and new.num_computed == 0 and not new.blocks
    assert new.holds_adapter and new.slot == cache.slots["y"] and cache.refs["y"] == 1  # only KV went
    outputs_at_preemption = list(new.output_ids)
    while sched.has_work():
        _fake_run(sched, sched.schedule())
    assert cache.acquires["y"] == 1, "re-admission asked the cache again"
    assert new.output_ids[:len(outputs_at_preemption)] == outputs_at_preemption and len(new.output_ids) == 8
    assert cache.refs == {"x": 0, "y": 0} and sched.pool.num_free == 4  # finish still releases everything


@pytest.mark.parametrize("refused", [SlotState.LOADING, SlotState.ERRORED])
def test_started_request_finishes_after_preemption_though_its_adapter_is_now_refused(refused):
    """E.g. DELETE of the adapter while the request runs: the cache would no longer hand it out."""
    cache = FakeCache(2)
    sched, new, _ = _preempt_new_by_kv(cache)
    cache.refuse["y"] = refused
    failed = []
    while sched.has_work():
        out = sched.schedule()
        failed += out.failed
        _fake_run(sched, out)
    assert not failed and new.status is Status.FINISHED and len(new.output_ids) == 8
    late = _req("late", adapter="y")  # a request that had not started is refused, as the cache says
    sched.add(late)
    out = sched.schedule()
    assert not out.chunks and [r for r, _ in out.failed] == ([late] if refused is SlotState.ERRORED else [])


def test_request_that_never_started_gives_its_adapter_back_when_the_pool_is_short():
    cache = FakeCache(2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4), BlockPool(2, 4), cache)  # 8 positions
    sched.add(_req("big", n_prompt=8, adapter="x", max_tokens=1))
    sched.add(_req("next", n_prompt=4, adapter="y"))
    sched.schedule()
    assert cache.acquires["y"] == 1 and cache.refs["y"] == 0 and [r.request_id for r in sched.waiting] == ["next"]


@pytest.mark.parametrize("policy", ["fair", "fcfs"])
def test_a_starving_request_never_blocks_the_preempted_holder_of_the_only_slot(policy):
    """Issue 19, bug 1: max_loras 1; r1 and r2 use adapter a, c uses c and starves; r2 is preempted for KV
    space and keeps the only slot; r1 finishes. The starvation gate then stopped all admission, r2 (the only one
    who can free the slot) was never admitted again, and the engine idled forever with r2 and c waiting."""
    cache = FakeCache(1)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, starvation_steps=2, policy=policy), BlockPool(6, 4), cache)
    preempted: list[Request] = []
    sched.on_preempt = preempted.append
    r1, r2 = _req("r1", n_prompt=8, adapter="a", max_tokens=8), _req("r2", n_prompt=8, adapter="a", max_tokens=8)
    sched.add(r1)
    sched.add(r2)
    _fake_run(sched, sched.schedule())
    c = _req("c", n_prompt=4, adapter="c", max_tokens=2)
    sched.add(c)
    for _ in range(100):
        if not sched.has_work():
            break
        _fake_run(sched, sched.schedule())
    assert preempted and preempted[0] is r2  # the situation the bug needed
    assert not sched.has_work(), f"stuck: {[(r.request_id, r.status.value) for r in sched.waiting]}"
    assert [len(r.output_ids) for r in (r1, r2, c)] == [8, 8, 2] and cache.refs == {"a": 0, "c": 0}


def test_the_waiting_queue_keeps_order_and_counts_adapter_names():
    from loraplex.server.engine.waiting_queue import WaitingQueue

    q = WaitingQueue()
    a, b, c, d = (_req(r, adapter=ad) for r, ad in (("a", "x"), ("b", None), ("c", "y"), ("d", "x")))
    for r in (a, b, c):
        q.append(r)
    q.appendleft(d)
    assert [r.request_id for r in q] == ["d", "a", "b", "c"] and q.adapter_names() == ("x", "y")
    q.remove(c)
    assert q.popleft() is d and q.adapter_names() == ("x",) and c not in q and a in q
    q.extendleft(reversed([c, d]))
    assert [r.request_id for r in q] == ["c", "d", "a", "b"] and len(q) == 4
