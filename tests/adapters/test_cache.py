"""AdapterCache with a fake disk loader and fake device slots: tiers, LRU, pinning, refcounts, errors,
unregistering while in use or mid-load, and a multi-threaded churn that checks no slot is ever rewritten
while a holder uses it."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from loraplex.adapters.cache import AdapterCache, SlotState
from loraplex.adapters.peft_config import LoraSpec
from loraplex.adapters.weights import AdapterWeights

TIMEOUT = 10.0


def weights(tag: str, size: int = 64) -> AdapterWeights:
    """Stand-in weights; `tag` (e.g. "a@v1") travels in the spec so a slot's content can be identified."""
    return AdapterWeights(LoraSpec(r=1, lora_alpha=1.0, target_modules=(tag,)), {}, size_bytes=size)


def tag(w: AdapterWeights) -> str:
    return w.spec.target_modules[0]


class FakeDisk:
    """The loader: `name` -> weights tagged `name@v<version>`; can fail or block per name."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.version: Counter[str] = Counter()
        self.fail: dict[str, Exception] = {}
        self.gates: dict[str, threading.Event] = {}
        self.entered: dict[str, threading.Event] = {}
        self.size: Counter[str] = Counter()  # size_bytes per name; 0 -> 64

    def gate(self, name: str) -> threading.Event:
        self.gates[name], self.entered[name] = threading.Event(), threading.Event()
        return self.gates[name]

    def __call__(self, name: str) -> AdapterWeights:
        self.calls[name] += 1
        if name in self.gates:
            self.entered[name].set()
            assert self.gates[name].wait(TIMEOUT)
        if name in self.fail:
            raise self.fail[name]
        return weights(f"{name}@v{self.version[name]}", self.size[name] or 64)


class FakeSlots:
    """Device slots: what each holds, and every write/clear."""

    def __init__(self, n: int) -> None:
        self.content: list[str | None] = [None] * n
        self.writes: list[tuple[int, str]] = []
        self.clears: list[int] = []

    def write(self, slot: int, w: AdapterWeights) -> None:
        self.content[slot] = tag(w)
        self.writes.append((slot, tag(w)))

    def clear(self, slot: int) -> None:
        self.content[slot] = None
        self.clears.append(slot)


@pytest.fixture
def make() -> Callable[..., tuple[AdapterCache, FakeDisk, FakeSlots]]:
    made: list[AdapterCache] = []

    def build(num_slots: int = 2, max_host: int = 4, **kw: int) -> tuple[AdapterCache, FakeDisk, FakeSlots]:
        disk, slots = FakeDisk(), FakeSlots(num_slots)
        cache = AdapterCache(disk, slots.write, slots.clear, num_slots=num_slots, max_host=max_host, **kw)
        made.append(cache)
        return cache, disk, slots

    yield build
    for cache in made:
        cache.close()


def wait_for(cond: Callable[[], object], what: str = "condition") -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def acquire_ready(cache: AdapterCache, name: str) -> int:
    """Acquire like the scheduler does (retry while loading, retries not counted); the slot, one reference."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        got = cache.acquire(name, first=False)
        if got.state is SlotState.READY:
            return got.slot
        assert got.state is not SlotState.ERRORED, got.reason
        time.sleep(0.002)
    raise AssertionError(f"{name} never became ready")


def start_blocked_load(cache: AdapterCache, disk: FakeDisk, name: str) -> threading.Event:
    """Start a load of `name` that stays inside the disk read until the returned gate is set."""
    gate = disk.gate(name)
    assert cache.acquire(name).state is SlotState.LOADING
    assert disk.entered[name].wait(TIMEOUT)
    return gate


# ---------------------------------------------------------------------------------------------------------
# tiers and refcounts
# ---------------------------------------------------------------------------------------------------------


def test_cold_acquire_loads_disk_to_host_to_device(make):
    cache, disk, slots = make()
    assert cache.tier("a") == "disk"
    assert cache.acquire("a").state is SlotState.LOADING
    slot = acquire_ready(cache, "a")
    assert slots.content[slot] == "a@v0" and cache.tier("a") == "device" and cache.refcount("a") == 1
    assert disk.calls["a"] == 1 and cache.resident() == {"device": ["a"], "host": ["a"]}
    # one miss for the first ask above; acquire_ready's retries are not counted
    assert cache.stats.misses["device"] == 1 and cache.stats.misses["host"] == 1
    assert cache.stats.hits["device"] == 0 and cache.stats.bytes_loaded == 64
    cache.release("a")
    assert cache.acquire("a").slot == slot and cache.stats.hits["device"] == 1
    info = cache.load_info("a")
    assert info["loads"] == 1 and info["last_load_seconds"] >= info["host_load_seconds"] >= 0
    cache.release("a")
    assert cache.refcount("a") == 0 and cache.tier("a") == "device"  # stays resident after release


def test_on_ready_and_on_load_seconds_hooks_fire(make):
    cache, _, _ = make()
    ready, seconds = threading.Event(), []
    cache.on_ready, cache.on_load_seconds = ready.set, seconds.append
    cache.acquire("a")
    assert ready.wait(TIMEOUT)
    wait_for(lambda: seconds, "load seconds")
    assert seconds[0] >= 0


def test_put_host_seeds_the_host_tier_without_touching_disk(make):
    cache, disk, slots = make()
    cache.put_host("a", weights("a@seeded"))
    assert cache.tier("a") == "host"
    slot = acquire_ready(cache, "a")
    assert disk.calls["a"] == 0 and slots.content[slot] == "a@seeded" and cache.stats.hits["host"] == 1


def test_host_lru_holds_max_host_adapters(make):
    cache, disk, _ = make(num_slots=1, max_host=2)
    for name in ("a", "b", "c"):
        acquire_ready(cache, name)
        cache.release(name)
    assert cache.resident()["host"] == ["b", "c"] and cache.stats.evictions["host"] == 1
    acquire_ready(cache, "a")  # gone from host: read from disk again
    assert disk.calls["a"] == 2


def test_host_lru_holds_at_most_max_host_bytes(make):
    """Count and byte budget both bound the host tier: least recently used entries go until both fit."""
    cache, _, _ = make(num_slots=1, max_host=10, max_host_bytes=1000)
    cache.put_host("a", weights("a", 400))
    cache.put_host("b", weights("b", 400))
    assert cache.host_bytes == 800 and cache.stats.evictions["host"] == 0
    acquire_ready(cache, "a")  # a host hit makes a the most recently used
    cache.release("a")
    cache.put_host("c", weights("c", 500))  # 1300 > 1000: the LRU (b) goes, a stays
    assert cache.resident()["host"] == ["a", "c"] and cache.host_bytes == 900
    assert cache.stats.evictions["host"] == 1
    cache.put_host("d", weights("d", 1000))  # exactly the budget: everything else goes
    assert cache.resident()["host"] == ["d"] and cache.host_bytes == 1000
    assert cache.stats.evictions["host"] == 3
    cache.put_host("d", weights("d@v1", 10))  # a new copy under the same name replaces, never adds up
    assert cache.host_bytes == 10
    cache.forget("d")
    assert cache.host_bytes == 0 and cache.resident()["host"] == []


def test_an_adapter_larger_than_the_host_budget_skips_host_but_still_loads(make):
    cache, disk, slots = make(num_slots=1, max_host=10, max_host_bytes=1000)
    cache.put_host("small", weights("small", 100))
    disk.size["huge"] = 1001
    slot = acquire_ready(cache, "huge")
    assert slots.content[slot] == "huge@v0" and cache.tier("huge") == "device"
    assert cache.resident()["host"] == ["small"] and cache.host_bytes == 100
    assert cache.stats.evictions["host"] == 0  # nothing that fits was pushed out for it
    cache.release("huge")


# ---------------------------------------------------------------------------------------------------------
# device slots: LRU, in use, pinning
# ---------------------------------------------------------------------------------------------------------


def test_device_lru_evicts_the_least_recently_used_unreferenced_slot(make):
    cache, _, slots = make(num_slots=2)
    sa, sb = acquire_ready(cache, "a"), acquire_ready(cache, "b")
    cache.release("a")
    cache.release("b")
    acquire_ready(cache, "a")  # a is now the most recently used
    cache.release("a")
    sc = acquire_ready(cache, "c")
    assert sc == sb and slots.content[sa] == "a@v0" and slots.content[sc] == "c@v0"
    assert cache.tier("b") == "host" and cache.stats.evictions["device"] == 1 and sb in slots.clears


def test_slots_in_use_are_never_evicted(make):
    cache, _, slots = make(num_slots=2)
    acquire_ready(cache, "a")
    acquire_ready(cache, "b")
    cache.prefetch("c")  # queued: brought to host memory while it waits for a slot
    wait_for(lambda: cache.tier("c") == "host", "c prefetched to host while it waits")
    assert cache.acquire("c").state is SlotState.NO_SLOT
    assert sorted(c for c in slots.content) == ["a@v0", "b@v0"]
    cache.release("b")
    sc = acquire_ready(cache, "c")
    assert slots.content[sc] == "c@v0" and cache.tier("a") == "device"


def test_an_adapter_held_twice_stays_until_both_release(make):
    cache, _, _ = make(num_slots=1)
    acquire_ready(cache, "a")
    acquire_ready(cache, "a")
    assert cache.refcount("a") == 2
    cache.release("a")
    assert cache.acquire("b").state is SlotState.NO_SLOT
    cache.release("a")
    acquire_ready(cache, "b")


def test_pinned_adapters_are_loaded_at_once_and_never_evicted(make):
    cache, _, slots = make(num_slots=2)
    cache.pin("p")
    wait_for(lambda: cache.tier("p") == "device", "pinned adapter on device")
    for name in ("a", "b", "c"):
        acquire_ready(cache, name)
        cache.release(name)
        assert cache.tier("p") == "device"
    cache.pin("p", False)
    acquire_ready(cache, "d")
    cache.release("d")
    acquire_ready(cache, "e")  # now p is the least recently used, and unpinned
    assert cache.tier("p") != "device" and "p@v0" not in slots.content


def test_prefetch_never_evicts_but_acquire_and_pin_do(make):
    """A queued request's prefetch must not take the slot of a loaded adapter whose requests are about to
    run (with steady arrivals that could evict it forever); the scheduler's acquire may."""
    cache, disk, _ = make(num_slots=1)
    acquire_ready(cache, "a")
    cache.release("a")
    cache.prefetch("b")
    wait_for(lambda: cache.tier("b") == "host", "b on host")
    assert cache.tier("a") == "device" and cache.stats.evictions["device"] == 0
    acquire_ready(cache, "b")
    cache.release("b")
    cache.pin("p")
    wait_for(lambda: cache.tier("p") == "device", "pinned p on device")
    assert cache.stats.evictions["device"] == 2 and disk.calls["p"] == 1


def test_retried_acquires_do_not_reload_host_copies_in_circles(make):
    """The scheduler retries waiting requests every step; with more waiting adapters than host room, a
    host prefetch per retry would evict them from host in a circle and flood the loader."""
    cache, disk, _ = make(num_slots=1, max_host=2)
    acquire_ready(cache, "busy")
    for _ in range(20):
        for name in ("a", "b", "c", "d"):
            assert cache.acquire(name).state is SlotState.NO_SLOT
    time.sleep(0.05)
    assert disk.calls == Counter({"busy": 1})


def test_prefetch_starts_a_load_and_skips_errored_or_resident(make):
    cache, disk, _ = make()
    cache.prefetch("a")
    wait_for(lambda: cache.tier("a") == "device", "prefetched a")
    cache.prefetch("a")
    disk.fail["x"] = OSError("gone")
    cache.prefetch("x")
    wait_for(lambda: cache.error("x"), "x errored")
    cache.prefetch("x")
    time.sleep(0.05)
    assert disk.calls == Counter({"a": 1, "x": 1})


# ---------------------------------------------------------------------------------------------------------
# load failures
# ---------------------------------------------------------------------------------------------------------


def test_a_failing_load_marks_only_that_adapter_and_frees_its_slot(make):
    cache, disk, slots = make(num_slots=1)
    disk.fail["bad"] = FileNotFoundError("adapter_model.safetensors vanished")
    assert cache.acquire("bad").state is SlotState.LOADING
    wait_for(lambda: cache.error("bad"), "bad errored")
    got = cache.acquire("bad")
    assert got.state is SlotState.ERRORED and "vanished" in got.reason
    assert cache.resident()["device"] == [] and cache.tier("bad") == "disk"
    slot = acquire_ready(cache, "good")  # the only slot was given back
    assert slots.content[slot] == "good@v0" and cache.error("good") is None
    # registered again (files repaired): restore clears the error and the next acquire retries
    del disk.fail["bad"]
    cache.release("good")
    cache.restore("bad")
    assert slots.content[acquire_ready(cache, "bad")] == "bad@v0"


def test_a_failing_slot_write_marks_the_adapter_errored(make):
    cache, _, _ = make(num_slots=1)

    def broken(slot: int, w: AdapterWeights) -> None:
        raise RuntimeError("device out of memory")

    cache._write_slot = broken  # the one seam the engine provides
    cache.acquire("a")
    wait_for(lambda: cache.error("a"), "a errored")
    assert "out of memory" in cache.acquire("a").reason and cache.resident()["device"] == []


def test_a_failing_host_prefetch_marks_the_adapter_errored(make):
    cache, disk, _ = make(num_slots=1)
    acquire_ready(cache, "a")
    disk.fail["b"] = ValueError("corrupt")
    cache.prefetch("b")  # no free slot: to host only
    wait_for(lambda: cache.error("b"), "b errored")
    assert cache.acquire("b").state is SlotState.ERRORED


# ---------------------------------------------------------------------------------------------------------
# unregistering (forget) and registering again
# ---------------------------------------------------------------------------------------------------------


def test_an_unregistered_name_evicts_and_loads_nothing(make):
    """A request added just as its adapter is DELETEd: its acquire must not evict a resident adapter for a
    load that can only fail."""
    cache, disk, slots = make(num_slots=1)
    registered = {"a", "b"}
    cache.is_registered = registered.__contains__
    slot = acquire_ready(cache, "a")
    cache.release("a")
    registered.discard("b")  # unregistered before its request reached the cache
    got = cache.acquire("b")
    assert got.state is SlotState.ERRORED and got.reason == "adapter 'b' is not registered"
    cache.prefetch("b", evict=True)  # nor does a prefetch (or a pin) for it
    assert slots.content[slot] == "a@v0" and cache.tier("a") == "device"
    assert cache.stats.evictions["device"] == 0 and disk.calls == Counter({"a": 1})
    assert cache.error("b") is None and cache.stats.misses["device"] == 0  # an ERRORED ask is no miss
    registered.add("b")  # registered again: the next request loads it normally
    assert slots.content[acquire_ready(cache, "b")] == "b@v0"


def test_an_unregistered_name_does_not_wait_for_its_doomed_copy(make):
    cache, _, _ = make(num_slots=1)
    registered = {"a"}
    cache.is_registered = registered.__contains__
    acquire_ready(cache, "a")
    registered.discard("a")
    cache.forget("a")  # still in use: the slot is freed on the last release
    assert cache.acquire("a").state is SlotState.ERRORED
    registered.add("a")
    assert cache.acquire("a").state is SlotState.LOADING  # registered again: waits for the old copy


def test_forget_an_idle_adapter_frees_its_slot_at_once(make):
    cache, _, slots = make()
    slot = acquire_ready(cache, "a")
    cache.release("a")
    cache.forget("a")
    assert slots.content[slot] is None and cache.resident() == {"device": [], "host": []}
    assert cache.tier("a") == "disk" and cache.load_info("a") == {}


def test_forget_while_in_use_frees_the_slot_on_the_last_release(make):
    cache, _, slots = make(num_slots=1)
    slot = acquire_ready(cache, "a")
    acquire_ready(cache, "a")
    cache.forget("a")
    assert slots.content[slot] == "a@v0"  # running requests keep computing with it
    assert cache.tier("a") == "disk"  # not the copy of any registered adapter any more
    assert cache.acquire("b").state is SlotState.NO_SLOT
    cache.release("a")
    assert slots.content[slot] == "a@v0"
    cache.release("a")
    assert slots.content[slot] is None and cache.resident()["device"] == []
    acquire_ready(cache, "b")


def test_reregistered_while_the_old_copy_is_in_use_serves_the_new_weights(make):
    cache, disk, slots = make(num_slots=2)
    old = acquire_ready(cache, "a")
    cache.forget("a")
    disk.version["a"] = 1
    cache.restore("a")
    cache.put_host("a", weights("a@v1"))
    assert cache.acquire("a").state is SlotState.LOADING  # waits for the old copy's holders
    assert slots.content[old] == "a@v0"
    cache.release("a")
    new = acquire_ready(cache, "a")
    assert slots.content[new] == "a@v1"


def test_forget_during_a_load_leaves_no_trace(make):
    cache, disk, slots = make(num_slots=1)
    gate = start_blocked_load(cache, disk, "a")
    cache.forget("a")
    gate.set()
    wait_for(lambda: slots.content == [None] and cache.resident()["device"] == [], "slot freed after the load")
    assert cache.resident()["host"] == [] and cache.load_info("a") == {} and cache.error("a") is None
    acquire_ready(cache, "b")


def test_a_stale_failed_load_does_not_poison_the_next_registration(make):
    """The old copy's load fails after the name was unregistered and registered again: the new one is
    neither marked errored nor stuck waiting for a slot that was never filled."""
    cache, disk, slots = make(num_slots=1)
    disk.fail["a"] = FileNotFoundError("old files deleted")
    gate = start_blocked_load(cache, disk, "a")
    cache.forget("a")
    cache.restore("a")
    cache.put_host("a", weights("a@v1"))
    gate.set()
    wait_for(lambda: slots.content == [None] and cache.resident()["device"] == [], "old load finished")
    assert cache.error("a") is None
    del disk.fail["a"], disk.gates["a"]
    assert slots.content[acquire_ready(cache, "a")] == "a@v1"


def test_a_stale_load_does_not_overwrite_the_new_host_copy(make):
    cache, disk, slots = make(num_slots=1)
    gate = start_blocked_load(cache, disk, "a")
    cache.forget("a")
    cache.put_host("a", weights("a@v1"))  # registered again with new files
    gate.set()  # the old load returns a@v0
    wait_for(lambda: cache.resident()["device"] == [], "stale slot freed")
    del disk.gates["a"]
    assert slots.content[acquire_ready(cache, "a")] == "a@v1"


# ---------------------------------------------------------------------------------------------------------
# churn: many threads, few slots
# ---------------------------------------------------------------------------------------------------------


def test_concurrent_churn_never_rewrites_a_slot_in_use(make):
    """Threads acquire random adapters (3 slots, 20 adapters, host 5) and check, while holding, that their
    slot still holds their adapter; the fake device refuses to write or clear a held slot."""
    cache, disk, slots = make(num_slots=3, max_host=5)
    holders, lock, errors = Counter(), threading.Lock(), []
    write, clear = slots.write, slots.clear

    def guarded_write(slot: int, w: AdapterWeights) -> None:
        with lock:
            if holders[slot]:
                errors.append(f"slot {slot} rewritten while held")
        write(slot, w)

    def guarded_clear(slot: int) -> None:
        with lock:
            if holders[slot]:
                errors.append(f"slot {slot} cleared while held")
        clear(slot)

    cache._write_slot, cache._clear_slot = guarded_write, guarded_clear

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            name = f"a{rng.randrange(20)}"
            slot = acquire_ready(cache, name)
            with lock:
                holders[slot] += 1
            time.sleep(rng.random() * 0.002)
            if slots.content[slot] != f"{name}@v0":
                errors.append(f"{name} found {slots.content[slot]} in its slot {slot}")
            with lock:
                holders[slot] -= 1
            cache.release(name)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 6)
    assert not errors, errors[:5]
    assert cache.stats.evictions["device"] > 0 and cache.stats.evictions["host"] > 0
    assert all(cache.refcount(f"a{i}") == 0 for i in range(20))
    assert sum(disk.calls.values()) >= 20
