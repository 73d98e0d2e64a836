"""SlotTable, driven by hand as the engine thread drives it: the reads it asks for are answered by posting
HostLoaded / HostLoadFailed messages, and slot copies happen at a "step start" (`load_due`). No threads, no
sleeps: tiers and states, LRU, pinning, refcounts, errors, unregistering while in use or mid-load, snapshots,
and a seeded churn that checks no slot is ever rewritten while a holder uses it."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from loraplex.adapters.messages import (
    Forget,
    HostLoaded,
    HostLoadFailed,
    Message,
    Pin,
    Prefetch,
    PutHost,
    Restore,
    Retire,
)
from loraplex.adapters.peft_config import LoraSpec
from loraplex.adapters.slot_table import AdapterState, SlotState, SlotTable
from loraplex.adapters.weights import AdapterWeights


def weights(tag: str, size: int = 64) -> AdapterWeights:
    """Stand-in weights; `tag` (e.g. "a@v1") travels in the spec so a slot's content can be identified."""
    return AdapterWeights(LoraSpec(r=1, lora_alpha=1.0, target_modules=(tag,)), {}, size_bytes=size)


def tag(w: AdapterWeights) -> str:
    return w.spec.target_modules[0]


class FakeDisk:
    """What the host loader reads: `name` -> weights tagged `name@v<version>`; can fail per name."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.version: Counter[str] = Counter()
        self.fail: dict[str, Exception] = {}
        self.size: Counter[str] = Counter()  # size_bytes per name; 0 -> 64

    def read(self, name: str, epoch: int) -> Message:
        """The message the host loader would post for this read."""
        self.calls[name] += 1
        if name in self.fail:
            return HostLoadFailed(name, epoch, str(self.fail[name]))
        return HostLoaded(name, epoch, weights(f"{name}@v{self.version[name]}", self.size[name] or 64), 0.001)


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


class Rig:
    """A SlotTable with a fake disk and fake slots; `asked` records the reads it asked the host loader for."""

    def __init__(self, num_slots: int = 2, max_host: int = 4, **kw: int) -> None:
        self.disk, self.slots = FakeDisk(), FakeSlots(num_slots)
        self.asked: list[tuple[str, int, bool]] = []
        self.table = SlotTable(num_slots=num_slots, max_host=max_host, request_load=self._ask,
                               clear_slot=self.slots.clear, **kw)

    def _ask(self, name: str, epoch: int, urgent: bool) -> None:
        self.asked.append((name, epoch, urgent))

    def land(self) -> list[Message]:
        """Answer every read asked for so far (one per name and epoch, as the host loader merges repeats)."""
        asked, self.asked = self.asked, []
        msgs = [self.disk.read(name, epoch) for name, epoch in dict.fromkeys((n, e) for n, e, _ in asked)]
        for msg in msgs:
            self.table.apply(msg)
        return msgs

    def step_start(self) -> int:
        """What LLMEngine.apply_adapter_messages does: apply landed reads, then copy due weights into slots."""
        self.land()
        return self.table.load_due(self.slots.write)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def acquire_ready(rig: Rig, name: str) -> int:
    """Acquire like the scheduler does (asking again each step, asks not counted); the slot, one reference."""
    for _ in range(4):
        got = rig.table.acquire(name, first=False)
        if got.state is SlotState.READY:
            return got.slot
        assert got.state is not SlotState.ERRORED, got.reason
        rig.step_start()
    raise AssertionError(f"{name} never became ready")


# ---------------------------------------------------------------------------------------------------------
# tiers, states and refcounts
# ---------------------------------------------------------------------------------------------------------


def test_cold_acquire_loads_disk_to_host_to_device(rig):
    table = rig.table
    assert table.tier("a") == "disk" and table.state("a") is AdapterState.REGISTERED
    assert table.acquire("a").state is SlotState.LOADING
    assert table.state("a") is AdapterState.HOST_LOADING and rig.asked == [("a", rig.asked[0][1], True)]
    slot = acquire_ready(rig, "a")
    assert rig.slots.content[slot] == "a@v0" and table.tier("a") == "device" and table.refcount("a") == 1
    assert table.state("a") is AdapterState.DEVICE_READY
    assert rig.disk.calls["a"] == 1 and table.resident() == {"device": ["a"], "host": ["a"]}
    # one miss for the first ask above; acquire_ready's asks are not counted
    assert table.stats.misses["device"] == 1 and table.stats.misses["host"] == 1
    assert table.stats.hits["device"] == 0 and table.stats.bytes_loaded == 64
    table.release("a")
    assert table.acquire("a").slot == slot and table.stats.hits["device"] == 1
    info = table.load_info("a")
    assert info["loads"] == 1 and info["last_load_seconds"] >= info["host_load_seconds"] >= 0
    table.release("a")
    assert table.refcount("a") == 0 and table.tier("a") == "device"  # stays resident after release


def test_weights_are_copied_at_the_step_start_not_when_they_land(rig):
    """A read that lands only makes the adapter HOST_READY; the engine copies it into its reserved slot at its
    next step start, on its own thread (then the forward may read it)."""
    table = rig.table
    table.acquire("a")
    rig.land()
    assert table.state("a") is AdapterState.HOST_READY and table.copies_pending()
    assert rig.slots.content == [None, None] and table.acquire("a", first=False).state is SlotState.LOADING
    assert table.load_due(rig.slots.write) == 1 and not table.copies_pending()
    assert table.state("a") is AdapterState.DEVICE_READY and table.acquire("a").state is SlotState.READY


def test_on_load_seconds_hook_fires_at_the_copy(rig):
    seconds: list[float] = []
    rig.table.on_load_seconds = seconds.append
    rig.table.acquire("a")
    rig.land()
    assert seconds == []
    rig.table.load_due(rig.slots.write)
    assert len(seconds) == 1 and seconds[0] >= 0


def test_put_host_seeds_the_host_tier_without_touching_disk(rig):
    table = rig.table
    table.put_host("a", weights("a@seeded"))
    assert table.tier("a") == "host" and table.state("a") is AdapterState.HOST_READY
    slot = acquire_ready(rig, "a")
    assert rig.disk.calls["a"] == 0 and rig.slots.content[slot] == "a@seeded" and table.stats.hits["host"] == 1
    assert table.load_info("a")["host_load_seconds"] == 0  # a host hit waited for no read


def test_host_lru_holds_max_host_adapters():
    rig = Rig(num_slots=1, max_host=2)
    for name in ("a", "b", "c"):
        acquire_ready(rig, name)
        rig.table.release(name)
    assert rig.table.resident()["host"] == ["b", "c"] and rig.table.stats.evictions["host"] == 1
    assert rig.table.state("a") is AdapterState.REGISTERED  # evicted from device and host
    acquire_ready(rig, "a")  # gone from host: read from disk again
    assert rig.disk.calls["a"] == 2


def test_host_lru_holds_at_most_max_host_bytes():
    """Count and byte budget both bound the host tier: least recently used entries go until both fit."""
    rig = Rig(num_slots=1, max_host=10, max_host_bytes=1000)
    table = rig.table
    table.put_host("a", weights("a", 400))
    table.put_host("b", weights("b", 400))
    assert table.host_bytes == 800 and table.stats.evictions["host"] == 0
    acquire_ready(rig, "a")  # a host hit makes a the most recently used
    table.release("a")
    table.put_host("c", weights("c", 500))  # 1300 > 1000: the LRU (b) goes, a stays
    assert table.resident()["host"] == ["a", "c"] and table.host_bytes == 900
    assert table.stats.evictions["host"] == 1 and table.state("b") is AdapterState.REGISTERED
    table.put_host("d", weights("d", 1000))  # exactly the budget: everything else goes
    assert table.resident()["host"] == ["d"] and table.host_bytes == 1000
    assert table.stats.evictions["host"] == 3
    table.put_host("d", weights("d@v1", 10))  # a new copy under the same name replaces, never adds up
    assert table.host_bytes == 10
    table.forget("d")
    assert table.host_bytes == 0 and table.resident()["host"] == []


def test_an_adapter_larger_than_the_host_budget_skips_host_but_still_loads():
    rig = Rig(num_slots=1, max_host=10, max_host_bytes=1000)
    rig.table.put_host("small", weights("small", 100))
    rig.disk.size["huge"] = 1001
    slot = acquire_ready(rig, "huge")
    assert rig.slots.content[slot] == "huge@v0" and rig.table.tier("huge") == "device"
    assert rig.table.resident()["host"] == ["small"] and rig.table.host_bytes == 100
    assert rig.table.stats.evictions["host"] == 0  # nothing that fits was pushed out for it
    rig.table.release("huge")


# ---------------------------------------------------------------------------------------------------------
# device slots: LRU, in use, pinning
# ---------------------------------------------------------------------------------------------------------


def test_device_lru_evicts_the_least_recently_used_unreferenced_slot(rig):
    table, slots = rig.table, rig.slots
    sa, sb = acquire_ready(rig, "a"), acquire_ready(rig, "b")
    table.release("a")
    table.release("b")
    acquire_ready(rig, "a")  # a is now the most recently used
    table.release("a")
    sc = acquire_ready(rig, "c")
    assert sc == sb and slots.content[sa] == "a@v0" and slots.content[sc] == "c@v0"
    assert table.tier("b") == "host" and table.state("b") is AdapterState.HOST_READY
    assert table.stats.evictions["device"] == 1
    assert slots.writes[-1] == (sb, "c@v0")  # the new copy overwrote the whole slot


def test_slots_in_use_are_never_evicted(rig):
    table, slots = rig.table, rig.slots
    acquire_ready(rig, "a")
    acquire_ready(rig, "b")
    table.prefetch("c")  # queued: brought to host memory while it waits for a slot
    assert rig.asked[-1][::2] == ("c", False)  # a prefetch: the host loader's slow lane
    rig.step_start()
    assert table.tier("c") == "host"
    assert table.acquire("c").state is SlotState.NO_SLOT
    assert sorted(slots.content) == ["a@v0", "b@v0"]
    table.release("b")
    sc = acquire_ready(rig, "c")
    assert slots.content[sc] == "c@v0" and table.tier("a") == "device"


def test_an_adapter_held_twice_stays_until_both_release():
    rig = Rig(num_slots=1)
    acquire_ready(rig, "a")
    acquire_ready(rig, "a")
    assert rig.table.refcount("a") == 2
    rig.table.release("a")
    assert rig.table.acquire("b").state is SlotState.NO_SLOT
    rig.table.release("a")
    acquire_ready(rig, "b")


def test_pinned_adapters_are_loaded_at_once_and_never_evicted(rig):
    table, slots = rig.table, rig.slots
    table.pin("p")
    rig.step_start()
    assert table.tier("p") == "device" and table.is_pinned("p")
    for name in ("a", "b", "c"):
        acquire_ready(rig, name)
        table.release(name)
        assert table.tier("p") == "device"
    table.pin("p", False)
    acquire_ready(rig, "d")
    table.release("d")
    acquire_ready(rig, "e")  # now p is the least recently used, and unpinned
    assert table.tier("p") != "device" and "p@v0" not in slots.content


def test_prefetch_never_evicts_but_acquire_and_pin_do():
    """A queued request's prefetch must not take the slot of a loaded adapter whose requests are about to
    run (with steady arrivals that could evict it forever); the scheduler's acquire may."""
    rig = Rig(num_slots=1)
    table = rig.table
    acquire_ready(rig, "a")
    table.release("a")
    table.prefetch("b")
    rig.step_start()
    assert table.tier("b") == "host" and table.tier("a") == "device" and table.stats.evictions["device"] == 0
    acquire_ready(rig, "b")
    table.release("b")
    table.pin("p")
    rig.step_start()
    assert table.tier("p") == "device" and table.stats.evictions["device"] == 2 and rig.disk.calls["p"] == 1


def test_a_queued_prefetch_moves_to_the_urgent_lane_when_a_slot_waits_for_it():
    """Device-bound reads never queue behind host prefetches: once a slot is reserved for an adapter whose
    prefetch has not landed, the table asks for the same read again, urgently (the host loader merges them)."""
    rig = Rig(num_slots=1)
    acquire_ready(rig, "a")
    rig.table.prefetch("c")  # no free slot: a host prefetch
    rig.table.release("a")
    assert rig.table.acquire("c").state is SlotState.LOADING  # evicts a; the read is still queued
    (name, epoch, urgent), again = rig.asked
    assert (name, urgent) == ("c", False) and again == ("c", epoch, True)
    assert rig.table.stats.misses["host"] == 2  # a's read and c's, once
    rig.step_start()
    assert rig.disk.calls["c"] == 1 and rig.table.acquire("c", first=False).state is SlotState.READY


def test_retried_acquires_do_not_reload_host_copies_in_circles():
    """The scheduler asks again for waiting requests every step; with more waiting adapters than host room, a
    host prefetch per ask would evict them from host in a circle and flood the loader."""
    rig = Rig(num_slots=1, max_host=2)
    acquire_ready(rig, "busy")
    for _ in range(20):
        for name in ("a", "b", "c", "d"):
            assert rig.table.acquire(name).state is SlotState.NO_SLOT
        rig.step_start()
    assert rig.disk.calls == Counter({"busy": 1}) and rig.asked == []


def test_prefetch_starts_a_load_and_skips_errored_or_resident(rig):
    table = rig.table
    table.prefetch("a")
    rig.step_start()
    assert table.tier("a") == "device"
    table.prefetch("a")
    rig.disk.fail["x"] = OSError("gone")
    table.prefetch("x")
    rig.step_start()
    assert table.error("x") == "gone" and table.state("x") is AdapterState.ERRORED
    table.prefetch("x")
    rig.step_start()
    assert rig.disk.calls == Counter({"a": 1, "x": 1})


# ---------------------------------------------------------------------------------------------------------
# load failures
# ---------------------------------------------------------------------------------------------------------


def test_a_failing_load_marks_only_that_adapter_and_frees_its_slot():
    rig = Rig(num_slots=1)
    table, slots = rig.table, rig.slots
    rig.disk.fail["bad"] = FileNotFoundError("adapter_model.safetensors vanished")
    assert table.acquire("bad").state is SlotState.LOADING
    rig.step_start()
    got = table.acquire("bad")
    assert got.state is SlotState.ERRORED and "vanished" in got.reason
    assert table.resident()["device"] == [] and table.tier("bad") == "disk"
    slot = acquire_ready(rig, "good")  # the only slot was given back
    assert slots.content[slot] == "good@v0" and table.error("good") is None
    # registered again (files repaired): restore clears the error and the next acquire asks again
    del rig.disk.fail["bad"]
    table.release("good")
    table.restore("bad")
    assert table.state("bad") is AdapterState.REGISTERED
    assert slots.content[acquire_ready(rig, "bad")] == "bad@v0"


def test_a_failing_slot_copy_marks_only_that_adapter_errored_and_frees_the_slot():
    rig = Rig(num_slots=2)
    acquire_ready(rig, "ok")

    def broken(slot: int, w: AdapterWeights) -> None:
        raise RuntimeError("device out of memory")

    rig.table.acquire("a")
    rig.land()
    assert rig.table.load_due(broken) == 1
    got = rig.table.acquire("a")
    assert got.state is SlotState.ERRORED and "out of memory" in got.reason
    assert rig.table.resident()["device"] == ["ok"] and rig.slots.clears == [1]
    assert rig.table.acquire("b").state is SlotState.LOADING  # the slot is free again


def test_a_failing_host_prefetch_marks_the_adapter_errored():
    rig = Rig(num_slots=1)
    acquire_ready(rig, "a")
    rig.disk.fail["b"] = ValueError("corrupt")
    rig.table.prefetch("b")  # no free slot: to host only
    rig.step_start()
    assert rig.table.acquire("b").state is SlotState.ERRORED and rig.table.error("b") == "corrupt"


# ---------------------------------------------------------------------------------------------------------
# unregistering (forget) and registering again
# ---------------------------------------------------------------------------------------------------------


def test_an_unregistered_name_evicts_and_loads_nothing():
    """A request added just as its adapter is DELETEd: its acquire must not evict a resident adapter for a
    load that can only fail."""
    rig = Rig(num_slots=1)
    table = rig.table
    registered = {"a", "b"}
    table.is_registered = registered.__contains__
    slot = acquire_ready(rig, "a")
    table.release("a")
    registered.discard("b")  # unregistered before its request reached the table
    got = table.acquire("b")
    assert got.state is SlotState.ERRORED and got.reason == "adapter 'b' is not registered"
    table.prefetch("b", evict=True)  # nor does a prefetch (or a pin) for it
    table.pin("b")
    assert rig.slots.content[slot] == "a@v0" and table.tier("a") == "device"
    assert table.stats.evictions["device"] == 0 and rig.disk.calls == Counter({"a": 1}) and rig.asked == []
    assert table.error("b") is None and table.stats.misses["device"] == 0  # an ERRORED ask is no miss
    registered.add("b")  # registered again: the next request loads it normally
    assert rig.slots.content[acquire_ready(rig, "b")] == "b@v0"


def test_an_unregistered_name_does_not_wait_for_its_doomed_copy():
    rig = Rig(num_slots=1)
    registered = {"a"}
    rig.table.is_registered = registered.__contains__
    acquire_ready(rig, "a")
    registered.discard("a")
    rig.table.forget("a")  # still in use: the slot is freed on the last release
    assert rig.table.acquire("a").state is SlotState.ERRORED
    registered.add("a")
    assert rig.table.acquire("a").state is SlotState.LOADING  # registered again: waits for the old copy


def test_forget_an_idle_adapter_frees_its_slot_at_once(rig):
    slot = acquire_ready(rig, "a")
    rig.table.release("a")
    rig.table.forget("a")
    assert rig.slots.content[slot] is None and rig.table.resident() == {"device": [], "host": []}
    assert rig.table.tier("a") == "disk" and rig.table.load_info("a") == {}


def test_forget_while_in_use_frees_the_slot_on_the_last_release():
    rig = Rig(num_slots=1)
    table, slots = rig.table, rig.slots
    slot = acquire_ready(rig, "a")
    acquire_ready(rig, "a")
    table.forget("a")
    assert slots.content[slot] == "a@v0"  # running requests keep computing with it
    assert table.tier("a") == "disk" and table.refcount("a") == 2  # not the copy of any registered adapter
    assert table.acquire("b").state is SlotState.NO_SLOT
    table.release("a")
    assert slots.content[slot] == "a@v0" and table.resident()["device"] == ["a"]
    table.release("a")
    assert slots.content[slot] is None and table.resident()["device"] == []
    acquire_ready(rig, "b")


def test_reregistered_while_the_old_copy_is_in_use_serves_the_new_weights(rig):
    table, slots = rig.table, rig.slots
    old = acquire_ready(rig, "a")
    table.forget("a")
    rig.disk.version["a"] = 1
    table.restore("a")
    table.put_host("a", weights("a@v1"))
    assert table.acquire("a").state is SlotState.LOADING  # waits for the old copy's holders
    rig.step_start()
    assert slots.content[old] == "a@v0" and table.acquire("a", first=False).state is SlotState.LOADING
    table.release("a")
    new = acquire_ready(rig, "a")
    assert slots.content[new] == "a@v1" and rig.disk.calls["a"] == 1


def test_forget_during_a_load_leaves_no_trace():
    rig = Rig(num_slots=1)
    table = rig.table
    assert table.acquire("a").state is SlotState.LOADING  # its read is in flight
    table.forget("a")
    assert rig.slots.content == [None] and table.resident()["device"] == []  # the slot is free at once
    rig.step_start()  # the read lands for a registration that is gone
    assert table.resident() == {"device": [], "host": []} and table.host_bytes == 0
    assert table.load_info("a") == {} and table.error("a") is None and rig.slots.writes == []
    acquire_ready(rig, "b")


def test_a_stale_failed_load_does_not_poison_the_next_registration():
    """The old copy's read fails after the name was unregistered and registered again: the new one is
    neither marked errored nor stuck waiting for a slot that was never filled."""
    rig = Rig(num_slots=1)
    table = rig.table
    rig.disk.fail["a"] = FileNotFoundError("old files deleted")
    table.acquire("a")
    table.forget("a")
    table.restore("a")
    table.put_host("a", weights("a@v1"))
    rig.step_start()  # the old read fails now
    assert table.error("a") is None and table.state("a") is AdapterState.HOST_READY
    assert rig.slots.content == [None] and table.resident()["device"] == []
    del rig.disk.fail["a"]
    assert rig.slots.content[acquire_ready(rig, "a")] == "a@v1"


def test_a_stale_load_does_not_overwrite_the_new_host_copy():
    rig = Rig(num_slots=1)
    rig.table.acquire("a")
    rig.table.forget("a")
    rig.table.put_host("a", weights("a@v1"))  # registered again with new files
    rig.step_start()  # the old read returns a@v0
    assert rig.table.resident() == {"device": [], "host": ["a"]}
    assert rig.slots.content[acquire_ready(rig, "a")] == "a@v1"


def test_admin_commands_arrive_as_messages(rig):
    table = rig.table
    for msg in (PutHost("a", weights("a@seeded")), Pin("a")):
        table.apply(msg)
    rig.step_start()
    assert table.tier("a") == "device" and table.is_pinned("a") and rig.disk.calls["a"] == 0
    rig.disk.fail["b"] = OSError("gone")
    table.prefetch("b")
    rig.step_start()
    table.apply(Restore("b"))
    assert table.error("b") is None
    table.apply(Forget("a"))
    assert table.tier("a") == "disk" and rig.slots.content.count(None) == 2
    with pytest.raises(TypeError):
        table.apply("not a message")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# the snapshot other threads read
# ---------------------------------------------------------------------------------------------------------


def test_the_snapshot_tells_where_each_adapter_is_and_never_changes_afterwards():
    rig = Rig(num_slots=1, max_host=4)
    table = rig.table
    table.put_host("h", weights("h", 100))
    acquire_ready(rig, "d")
    rig.disk.fail["e"] = OSError("broken")
    table.prefetch("e")
    rig.step_start()
    snap = table.snapshot()
    assert {n: (v.tier, v.state) for n, v in snap.adapters.items()} == {
        "h": ("host", AdapterState.HOST_READY), "d": ("device", AdapterState.DEVICE_READY),
        "e": ("disk", AdapterState.ERRORED)}
    assert snap.view("e").error == "broken" and snap.view("d").load_info["loads"] == 1
    assert snap.view("never-seen").tier == "disk" and snap.view("never-seen").error is None
    assert snap.resident == {"device": ("d",), "host": ("h", "d")} and snap.host_bytes == 164
    assert snap.num_slots == 1 and snap.stats.misses["device"] == 0 and snap.stats.misses["host"] == 2
    table.release("d")
    table.forget("d")
    table.forget("h")
    assert snap.view("d").tier == "device" and snap.resident["host"] == ("h", "d")  # as it was published
    with pytest.raises(TypeError):
        snap.adapters["x"] = snap.view("d")  # type: ignore[index]
    later = table.snapshot()
    assert set(later.adapters) == {"e"} and later.resident == {"device": (), "host": ()}


def test_the_snapshot_is_rebuilt_only_when_something_changed(rig):
    acquire_ready(rig, "a")
    first = rig.table.snapshot()
    assert rig.table.snapshot() is first  # nothing moved: the same object, no work per step
    rig.table.release("a")
    assert rig.table.acquire("a").state is SlotState.READY  # a counted hit: only the counters moved
    second = rig.table.snapshot()
    assert second is not first and second.adapters is first.adapters
    assert second.stats.hits["device"] == first.stats.hits["device"] + 1


# ---------------------------------------------------------------------------------------------------------
# churn: many holders, few slots, loads landing in random order
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_churn_never_rewrites_or_clears_a_slot_in_use(seed):
    """Simulated requests (3 slots, 20 adapters, host 5) acquire random adapters, hold them for random
    numbers of steps and check each step that their slot still holds their adapter; reads land late and in
    random order. The fake device refuses to write or clear a held slot."""
    rng = random.Random(seed)
    rig = Rig(num_slots=3, max_host=5)
    table, slots = rig.table, rig.slots
    held: Counter[int] = Counter()
    errors: list[str] = []

    def guarded_write(slot: int, w: AdapterWeights) -> None:
        if held[slot]:
            errors.append(f"slot {slot} rewritten while held")
        slots.write(slot, w)

    def guarded_clear(slot: int) -> None:
        if held[slot]:
            errors.append(f"slot {slot} cleared while held")
        slots.clear(slot)

    table._clear_slot = guarded_clear
    holders: list[tuple[str, int, int]] = []  # (name, slot, steps left)
    waiting: list[str] = []
    for _ in range(400):
        waiting += [f"a{rng.randrange(20)}" for _ in range(rng.randrange(3))]
        for name in list(waiting):
            got = table.acquire(name)
            if got.state is SlotState.READY:
                waiting.remove(name)
                held[got.slot] += 1
                holders.append((name, got.slot, rng.randrange(1, 5)))
        errors += [f"{n} found {slots.content[s]} in its slot {s}" for n, s, _ in holders
                   if slots.content[s] != f"{n}@v0"]
        for name, slot, left in holders:
            if left == 1:
                held[slot] -= 1
                table.release(name)
        holders = [(n, s, left - 1) for n, s, left in holders if left > 1]
        rng.shuffle(rig.asked)  # some reads land this step, in any order; the others later
        cut = rng.randrange(len(rig.asked) + 1)
        landing, rig.asked = rig.asked[:cut], rig.asked[cut:]
        for name, epoch, _ in landing:
            table.apply(rig.disk.read(name, epoch))
        table.load_due(guarded_write)
    for name, _, _ in holders:
        table.release(name)
    assert not errors, errors[:5]
    assert table.stats.evictions["device"] > 0 and table.stats.evictions["host"] > 0
    assert all(table.refcount(f"a{i}") == 0 for i in range(20))
    assert sum(rig.disk.calls.values()) >= 20


# ---------------------------------------------------------------------------------------------------------
# retired versions (adapters/versions.py: a replaced, rolled-back-from or unrouted version)
# ---------------------------------------------------------------------------------------------------------


def test_a_retired_version_keeps_its_slot_while_a_request_holds_or_names_it_then_frees_it(rig):
    table = rig.table
    slot = acquire_ready(rig, "a@v1")
    table.apply(Retire("a@v1"))
    table.sweep_retired(lambda: set())
    assert table.tier("a@v1") == "device" and rig.slots.content[slot] == "a@v1@v0"  # held: kept
    table.release("a@v1")
    table.sweep_retired(lambda: {"a@v1"})  # a queued request still names it: kept for it
    assert table.tier("a@v1") == "device" and table.acquire("a@v1").state is SlotState.READY
    table.release("a@v1")
    table.sweep_retired(lambda: {"b"})
    assert table.tier("a@v1") == "disk" and rig.slots.content[slot] is None and "a@v1" not in table.resident()["host"]
    assert table.occupancy() == [None, None]


def test_sweeping_asks_for_the_named_adapters_only_when_something_could_be_freed(rig):
    asked = []
    acquire_ready(rig, "a@v1")
    rig.table.apply(Retire("a@v1"))
    rig.table.sweep_retired(lambda: asked.append(1) or set())
    assert asked == []  # held by a request: nothing to free, no question
    rig.table.release("a@v1")
    rig.table.sweep_retired(lambda: asked.append(1) or {"a@v1"})
    assert asked == [1] and rig.table.tier("a@v1") == "device"  # asked once, and kept for the request naming it
    rig.table.sweep_retired(lambda: asked.append(1) or set())
    assert asked == [1, 1] and rig.table.tier("a@v1") == "disk"
    rig.table.sweep_retired(lambda: asked.append(1) or set())
    assert asked == [1, 1]  # nothing retired is resident any more: no question


def test_a_retired_version_is_never_prefetched_but_still_loads_for_a_request_that_names_it(rig):
    table = rig.table
    table.apply(Retire("a@old"))
    table.prefetch("a@old")
    assert rig.asked == [] and table.tier("a@old") == "disk"
    slot = acquire_ready(rig, "a@old")  # an explicit "a@old" request, or one admitted before the replace
    assert rig.slots.content[slot] == "a@old@v0"
    table.release("a@old")
    table.sweep_retired(lambda: set())
    assert table.tier("a@old") == "disk"


def test_restore_undoes_a_retirement_and_a_rolled_back_version_stays_resident(rig):
    table = rig.table
    acquire_ready(rig, "a@v1")
    table.release("a@v1")
    table.apply(Retire("a@v1"))
    table.apply(Restore("a@v1"))  # a rollback made it current again
    table.sweep_retired(lambda: set())
    assert table.tier("a@v1") == "device"


def test_a_merge_built_from_a_retired_version_is_freed_with_it():
    from loraplex.adapters.merge import MergeRecipe, remember

    rig = Rig(num_slots=3)
    virtual = remember(MergeRecipe((("a@v1", 0.5), ("b@v1", 0.5)), "ties", density=0.5))
    slot = acquire_ready(rig, virtual)
    rig.table.release(virtual)
    rig.table.apply(Retire("a@v1"))
    rig.table.sweep_retired(lambda: {virtual})
    assert rig.table.tier(virtual) == "device"  # a queued request names the merge
    rig.table.sweep_retired(lambda: set())
    assert rig.table.tier(virtual) == "disk" and rig.slots.content[slot] is None


def test_forget_clears_a_retirement(rig):
    table = rig.table
    table.apply(Retire("a@v1"))
    table.apply(Forget("a@v1"))  # the version left the history; registered again later, it is a live one
    table.prefetch("a@v1")
    assert rig.asked and rig.asked[0][0] == "a@v1"


@pytest.mark.parametrize("tier", ["host", "device"])
def test_prefetch_loads_without_a_request(rig, tier):
    table = rig.table
    table.apply(Prefetch("a", tier))
    assert rig.asked and rig.asked[0][2] is (tier == "device")  # a device load is urgent: a slot waits for it
    rig.step_start()
    assert table.tier("a") == tier and table.refcount("a") == 0
    table.apply(Prefetch("a", tier))  # already there: nothing more
    assert rig.asked == []


def test_a_device_prefetch_evicts_the_least_recently_used_idle_adapter():
    rig = Rig(num_slots=1)
    acquire_ready(rig, "a")
    rig.table.release("a")
    rig.table.apply(Prefetch("b", "device"))
    rig.step_start()
    assert rig.table.tier("b") == "device" and rig.table.tier("a") == "host"
