"""Fair sharing between tenants (adapters): the virtual token counter's admission order and lift rule, the
fairness preemption and its anti-thrash guards, and `fcfs` left as it was. Driven step by step with a fake
adapter cache; every assertion counts steps or tokens, never time."""

from __future__ import annotations

from collections import Counter

import pytest

from loraplex.server.engine.block_pool import BlockPool
from loraplex.server.engine.fairness import W_OUTPUT, W_PROMPT, VirtualTokenCounter
from loraplex.server.engine.request import Request, Status
from loraplex.server.engine.scheduler import REFAIR_TOKENS, Scheduler, SchedulerConfig

from .test_scheduler import FakeCache, _fake_run, _req


def _sched(policy: str = "fair", seqs: int = 4) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=seqs, policy=policy), BlockPool(4096, 4), FakeCache(8))


class Driver:
    """Steps a scheduler like the engine does and records when each request first ran and who was preempted."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.step_no = 0
        self.first_run: dict[str, int] = {}  # request id -> step of its first chunk
        self.preempted: list[Request] = []
        self.charged: dict[str, float] = {}  # tenant -> its counter after the last step it ran in
        sched.on_preempt = self.preempted.append

    def step(self) -> list[str]:
        """One step; the ids of the requests that ran for the first time in it."""
        out = self.sched.schedule()
        new = [c.request.request_id for c in out.chunks if c.request.request_id not in self.first_run]
        self.first_run.update(dict.fromkeys(new, self.step_no))
        self.charged.update({t: self.sched.vtc.counter(t) for t in {c.request.adapter for c in out.chunks}})
        _fake_run(self.sched, out)
        self.step_no += 1
        return new

    def admission_order(self, steps: int) -> list[str]:
        return [rid for _ in range(steps) for rid in self.step()]


def _flood_then_one(policy: str) -> list[str]:
    """A queues 6 requests, then the base model ("b") 4, all alike; 2 sequence slots. Returns the order
    they started in."""
    sched = _sched(policy, seqs=2)
    for i in range(6):
        sched.add(_req(f"a{i}", adapter="A", max_tokens=3))
    for i in range(4):
        sched.add(_req(f"b{i}", adapter=None, max_tokens=3))
    return Driver(sched).admission_order(40)


def test_fair_interleaves_two_tenants_that_both_want_more_than_their_share():
    order = _flood_then_one("fair")
    # Both want more than their share of the 2 slots: plain VTC order, B does not queue behind all of A.
    assert order[:6] == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert [r for r in order if r.startswith("a")] == [f"a{i}" for i in range(6)]  # FCFS within a tenant


def test_fcfs_keeps_arrival_order():
    assert _flood_then_one("fcfs") == [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(4)]


def test_counters_charge_prompt_once_and_each_output_token():
    sched = _sched()
    drv = Driver(sched)
    sched.add(_req("a", n_prompt=5, adapter="A", max_tokens=3))
    drv.admission_order(10)
    assert drv.charged["A"] == 5 * W_PROMPT + 3 * W_OUTPUT


def test_recomputation_after_preemption_is_not_charged_again():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4), BlockPool(4, 4), FakeCache(2))  # 16 positions
    drv = Driver(sched)
    sched.add(_req("old", n_prompt=7, adapter="x", max_tokens=8))
    sched.add(_req("new", n_prompt=7, adapter="y", max_tokens=8))
    drv.admission_order(60)
    assert drv.preempted and not sched.has_work()
    assert drv.charged["y"] == 7 * W_PROMPT + 8 * W_OUTPUT


def test_tenant_joining_the_queue_is_lifted_to_the_lowest_backlogged_counter():
    sched = _sched(seqs=1)
    drv = Driver(sched)
    for i in range(8):
        sched.add(_req(f"a{i}", adapter="A", max_tokens=3))
    drv.admission_order(12)  # A alone: its counter grows, B's stays 0
    assert sched.vtc.counter("A") > 0 and sched.vtc.counter("B") == 0
    for i in range(4):
        sched.add(_req(f"b{i}", adapter="B", max_tokens=3))
    assert sched.vtc.counter("B") == sched.vtc.counter("A")  # no credit banked while B asked for nothing
    order = drv.admission_order(40)
    assert order[:6] == ["a4", "b0", "a5", "b1", "a6", "b2"]  # shares from now on (a tie goes to the older)


def test_tenant_joining_an_empty_queue_is_lifted_to_the_last_one_that_left_it():
    sched = _sched(seqs=4)
    drv = Driver(sched)
    sched.add(_req("a0", adapter="A", max_tokens=5))
    drv.admission_order(3)  # a0 admitted at once: nobody waits any more, A's counter keeps growing
    level = sched.vtc.counter("A")
    sched.add(_req("b0", adapter="B"))
    assert sched.vtc.counter("B") == level > 0


def test_a_lift_never_lowers_a_counter():
    vtc = VirtualTokenCounter()
    vtc.arrive("A")
    vtc.charge("A", 10, 10)
    vtc.dequeue("A")  # admitted, still running
    vtc.arrive("B")  # lifted to 30, the last to leave the queue
    vtc.arrive("A")  # A is above the level: kept
    assert vtc.counter("A") == 30 and vtc.counter("B") == 30


def test_idle_tenants_at_or_below_the_level_are_forgotten():
    sched = _sched(seqs=2)
    drv = Driver(sched)
    for i in range(200):  # a stream of one-off tenants, one at a time
        sched.add(_req(f"r{i}", adapter=f"t{i}", max_tokens=2))
        drv.admission_order(3)
    assert not sched.has_work() and sched.vtc.num_tracked() <= 2


def _long_a_requests(sched: Scheduler, n: int, max_tokens: int) -> None:
    for i in range(n):
        sched.add(_req(f"a{i}", n_prompt=6, adapter="A", max_tokens=max_tokens))


def test_an_idle_tenant_takes_a_slot_from_the_most_served_at_once():
    sched = _sched(seqs=4)
    drv = Driver(sched)
    _long_a_requests(sched, 6, max_tokens=40)
    drv.admission_order(5)  # a0..a3 run and fill every slot, a4 and a5 wait
    sched.add(_req("b", adapter="B", max_tokens=2))
    assert drv.step() == ["b"]  # the very next step
    victim = drv.preempted[0]
    assert [r.request_id for r in drv.preempted] == ["a3"]  # the newest request of the most-served tenant
    assert victim.status is Status.WAITING and victim.num_computed == 0 and victim.output_ids
    assert victim.fair_preempted_at == len(victim.output_ids) and victim.holds_adapter
    drv.admission_order(400)
    assert not sched.has_work() and len(victim.output_ids) == 40  # recomputed, outputs kept


def test_fcfs_never_preempts_for_fairness():
    sched = _sched("fcfs", seqs=4)
    drv = Driver(sched)
    _long_a_requests(sched, 6, max_tokens=40)
    drv.admission_order(5)
    sched.add(_req("b", adapter="B", max_tokens=2))
    order = drv.admission_order(400)
    assert not drv.preempted and order.index("b") > order.index("a5")


@pytest.mark.parametrize("policy", ["fair", "fcfs"])
def test_light_tenant_wait_does_not_hinge_on_the_flooder_generation_length(policy):
    def wait_steps(a_tokens: int) -> int:
        sched = _sched(policy, seqs=4)
        drv = Driver(sched)
        _long_a_requests(sched, 8, max_tokens=a_tokens)
        drv.admission_order(3)
        sched.add(_req("b", adapter="B", max_tokens=2))
        arrived = drv.step_no
        drv.admission_order(4 * a_tokens)
        return drv.first_run["b"] - arrived

    short, long = wait_steps(20), wait_steps(200)
    if policy == "fair":
        assert short == long == 0
    else:
        assert long > short > 0


def _b0_and_three_a(sched: Scheduler, drv: Driver) -> None:
    """B runs one long request, A three and has more waiting: every slot of 4 taken, A the most served."""
    sched.add(_req("b0", adapter="B", max_tokens=200))
    drv.step()
    _long_a_requests(sched, 6, max_tokens=200)
    drv.admission_order(4)
    assert sched.vtc.counter("A") > sched.vtc.counter("B")


def test_a_light_tenant_that_already_runs_still_gets_a_slot_at_once():
    sched = _sched(seqs=4)
    drv = Driver(sched)
    _b0_and_three_a(sched, drv)
    sched.add(_req("b1", adapter="B", max_tokens=2))  # B's demand, 2, fits its share of 4 slots
    assert drv.step() == ["b1"] and [r.request_id for r in drv.preempted] == ["a2"]


def test_a_tenant_asking_for_more_than_its_share_does_not_preempt():
    sched = _sched(seqs=4)
    drv = Driver(sched)
    _b0_and_three_a(sched, drv)
    for i in range(1, 4):  # B's demand, 4, exceeds its share of 2: it waits for slots to free
        sched.add(_req(f"b{i}", adapter="B", max_tokens=2))
    drv.admission_order(20)
    assert not drv.preempted and "b1" not in drv.first_run


def _two_tenants(b_charge: float) -> VirtualTokenCounter:
    """A: 8 queued, counter 100; B: 1 queued, lifted to 100 then charged `b_charge`."""
    vtc = VirtualTokenCounter()
    for _ in range(8):
        vtc.arrive("A")
    vtc.charge("A", 100, 0)
    vtc.arrive("B")
    vtc.charge("B", int(b_charge), 0)
    return vtc


@pytest.mark.parametrize(("b_charge", "b_next_worth", "first"), [(50, 60, "B"), (50, 40, "A"), (0, 1, "B")])
def test_a_light_tenant_goes_first_only_within_one_request_of_the_lowest_counter(b_charge, b_next_worth, first):
    vtc = _two_tenants(b_charge)
    running = {"A": 3}  # 4 slots, 2 tenants: B (demand 1) fits its share of 2, A (demand 11) does not
    assert vtc.order({"A": 10.0, "B": float(b_next_worth)}, running, 4)[0] == (first, first == "B")


def test_with_more_tenants_than_slots_the_order_is_plain_vtc():
    vtc = _two_tenants(50)
    vtc.arrive("C")  # lifted to 100: three tenants, two slots, nobody fits a share of 2/3
    assert vtc.order({"A": 10.0, "B": 1000.0, "C": 1000.0}, {}, 2) == [("A", False), ("C", False), ("B", False)]


def test_the_victim_is_the_most_served_tenant_over_its_share_not_the_most_served_overall():
    sched = _sched(seqs=4)
    drv = Driver(sched)
    _long_a_requests(sched, 6, max_tokens=100)
    drv.step()  # A takes all 4 slots
    sched.add(_req("b0", n_prompt=200, adapter="B", max_tokens=100))  # B takes one back: a3 goes
    drv.admission_order(3)
    assert sched.vtc.counter("B") > sched.vtc.counter("A")  # B is the most served, with one sequence
    sched.add(_req("c", adapter="C", max_tokens=2))  # shares of 4/3: A (3 running) is over, B is not
    assert drv.step() == ["c"] and [r.request_id for r in drv.preempted] == ["a3", "a2"]


def test_two_busy_tenants_do_not_thrash():
    """Both tenants keep requests queued: counters stay level, and slots rarely change hands by force."""
    sched = _sched(seqs=4)
    drv = Driver(sched)
    n = 0
    for _ in range(400):
        for tenant in "AB":
            while sum(r.adapter == tenant for r in sched.waiting) < 6:
                n += 1
                sched.add(_req(f"{tenant}{n}", n_prompt=3 + n % 7, adapter=tenant, max_tokens=2 + (n * 7) % 11))
        drv.step()
    started = len(drv.first_run)
    assert len(drv.preempted) <= started // 100  # at most 1 % of requests (both ask for more than their share)
    assert max(Counter(r.request_id for r in drv.preempted).values(), default=0) <= 1
    gap = abs(sched.vtc.counter("A") - sched.vtc.counter("B"))
    assert gap <= 3 * 12 * W_OUTPUT  # within a few requests' worth after ~1500 tokens each


def test_never_preempts_the_tenant_being_admitted_nor_one_running_as_much():
    sched = _sched(seqs=4)
    drv = Driver(sched)
    for i in range(2):
        sched.add(_req(f"a{i}", adapter="A", max_tokens=100))
        sched.add(_req(f"b{i}", adapter="B", max_tokens=100))
    drv.step()  # 2 + 2: both tenants run, slots full
    for i in range(2, 6):
        sched.add(_req(f"a{i}", adapter="A", max_tokens=2))
    drv.admission_order(50)
    assert not drv.preempted  # A waits, but B runs no more sequences than A


def test_policy_is_validated_and_read_from_the_cli():
    from loraplex.server.cli import build_parser, configs_from_args

    with pytest.raises(ValueError, match="--scheduling-policy"):
        SchedulerConfig(policy="lottery")
    parse = build_parser().parse_args
    assert configs_from_args(parse(["serve"])).engine.scheduler.policy == "fair"
    assert configs_from_args(parse(["serve", "--scheduling-policy", "fcfs"])).engine.scheduler.policy == "fcfs"


def test_a_light_tenant_keeps_getting_slots_after_every_flooder_request_was_preempted_once():
    """Issue 19 item 7: A keeps 8 long requests queued (4 run, every slot); B sends 2-token requests one after
    another, each a step after the last one ended (the client's round trip, in which A takes the freed slot back).
    A request preempted for fairness may be chosen again after REFAIR_TOKENS more tokens (the old rule, "at most
    once per request", ran out of victims, and B then waited for one of A's 300-token requests to end)."""
    sched = _sched(seqs=4)
    drv = Driver(sched)
    _long_a_requests(sched, 8, max_tokens=300)
    drv.admission_order(3)
    waits = []
    for i in range(30):
        req = _req(f"b{i}", adapter="B", max_tokens=2)
        sched.add(req)
        arrived = drv.step_no
        while req.status is not Status.FINISHED:
            drv.step()
        waits.append(drv.first_run[req.request_id] - arrived)
        drv.step()  # B's round trip: A takes the freed slot back
    assert max(waits) <= REFAIR_TOKENS, waits  # a victim is eligible again after REFAIR_TOKENS of its tokens
    assert len(drv.preempted) == 30 and len({r.request_id for r in drv.preempted}) == 4  # each one several times
