"""HostLoader: background reads post typed results and wake the engine; failures fail only that read;
device-bound reads never queue behind prefetches; repeated asks are merged; pinned memory where asked.
Every wait is on a condition (a gate or a posted message), bounded only to fail a broken loader."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import pytest

from loraplex.adapters.host_loader import HostLoader
from loraplex.adapters.messages import HostLoaded, HostLoadFailed
from loraplex.adapters.peft_config import LoraSpec
from loraplex.adapters.weights import AdapterWeights

TIMEOUT = 30.0


def weights(tag: str) -> AdapterWeights:
    return AdapterWeights(LoraSpec(r=1, lora_alpha=1.0, target_modules=(tag,)), {}, size_bytes=64)


class Inbox:
    """The engine's side: what was posted, how often it was woken, and the posts seen at each wake."""

    def __init__(self) -> None:
        self.posted: list[HostLoaded | HostLoadFailed] = []
        self.seen_at_wake: list[int] = []
        self._cv = threading.Condition()

    def post(self, msg: HostLoaded | HostLoadFailed) -> None:
        with self._cv:
            self.posted.append(msg)

    def wake(self) -> None:
        with self._cv:
            self.seen_at_wake.append(len(self.posted))
            self._cv.notify_all()

    def wait_for(self, cond: Callable[[], bool]) -> None:
        with self._cv:
            assert self._cv.wait_for(cond, TIMEOUT), "the host loader never posted"

    def names(self) -> list[str]:
        return [m.name for m in self.posted]


class Disk:
    """The loader callable: counts reads and the pool thread each ran on; gated or failing per name."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.threads: dict[str, str] = {}
        self.gates: dict[str, threading.Event] = {}
        self.entered: dict[str, threading.Event] = {}
        self.fail: dict[str, Exception] = {}

    def gate(self, name: str) -> threading.Event:
        self.gates[name], self.entered[name] = threading.Event(), threading.Event()
        return self.gates[name]

    def __call__(self, name: str) -> AdapterWeights:
        self.calls[name] += 1
        self.threads[name] = threading.current_thread().name
        if name in self.gates:
            self.entered[name].set()
            assert self.gates[name].wait(TIMEOUT)
        if name in self.fail:
            raise self.fail[name]
        return weights(name)


@pytest.fixture
def rig():
    disk, inbox = Disk(), Inbox()
    loader = HostLoader(disk, inbox.post, inbox.wake, pin_memory=False)
    yield loader, disk, inbox
    for gate in disk.gates.values():
        gate.set()
    loader.close()


def test_a_read_posts_its_weights_then_wakes_the_engine(rig):
    loader, disk, inbox = rig
    loader.submit("a", 7, urgent=True)
    inbox.wait_for(lambda: inbox.seen_at_wake)
    (msg,) = inbox.posted
    assert isinstance(msg, HostLoaded) and (msg.name, msg.epoch, msg.weights.spec.target_modules) == ("a", 7, ("a",))
    assert msg.seconds >= 0 and inbox.seen_at_wake == [1]  # the message was there when the engine woke


def test_a_failing_read_posts_why_and_the_loader_keeps_serving(rig):
    loader, disk, inbox = rig
    disk.fail["bad"] = FileNotFoundError("adapter_model.safetensors vanished")
    disk.fail["empty"] = KeyError()
    for name in ("bad", "empty", "good"):
        loader.submit(name, 1, urgent=True)
    inbox.wait_for(lambda: len(inbox.posted) == 3)
    by_name = {m.name: m for m in inbox.posted}
    assert isinstance(by_name["bad"], HostLoadFailed) and "vanished" in by_name["bad"].reason
    assert by_name["empty"].reason == "KeyError"  # an exception without a message still says something
    assert isinstance(by_name["good"], HostLoaded)


def test_device_bound_reads_never_queue_behind_a_burst_of_prefetches(rig):
    loader, disk, inbox = rig
    gate = disk.gate("p0")
    for i in range(5):
        loader.submit(f"p{i}", 1, urgent=False)
    assert disk.entered["p0"].wait(TIMEOUT)  # the prefetch lane is busy, four more queued behind it
    loader.submit("u", 1, urgent=True)
    inbox.wait_for(lambda: "u" in inbox.names())
    assert inbox.names() == ["u"] and disk.threads["u"].startswith("lora-load")
    gate.set()
    inbox.wait_for(lambda: len(inbox.posted) == 6)
    assert disk.threads["p4"].startswith("lora-prefetch")


def test_repeated_asks_are_merged_and_a_queued_prefetch_moves_to_the_urgent_lane(rig):
    loader, disk, inbox = rig
    gate, c_gate = disk.gate("blocker"), disk.gate("c")
    loader.submit("blocker", 1, urgent=False)
    assert disk.entered["blocker"].wait(TIMEOUT)
    loader.submit("c", 1, urgent=False)  # queued behind the blocker
    loader.submit("c", 1, urgent=False)  # merged
    loader.submit("c", 1, urgent=True)  # a slot now waits for it: read in the urgent lane
    assert disk.entered["c"].wait(TIMEOUT)
    loader.submit("c", 1, urgent=True)  # merged: that read is running
    assert disk.threads["c"].startswith("lora-load")
    c_gate.set()
    inbox.wait_for(lambda: "c" in inbox.names())
    gate.set()  # the blocker ends; the superseded prefetch of c then reads nothing
    inbox.wait_for(lambda: len(inbox.posted) == 2)
    del disk.gates["c"]
    loader.submit("z", 1, urgent=False)  # the prefetch lane is FIFO: once z is read, c's old job has run
    loader.submit("c", 2, urgent=True)  # another registration of the name: its own read
    inbox.wait_for(lambda: len(inbox.posted) == 4)
    assert disk.calls == Counter({"blocker": 1, "c": 2, "z": 1})
    assert [m.epoch for m in inbox.posted if m.name == "c"] == [1, 2]


def test_an_ask_while_the_read_runs_is_merged_and_one_after_it_reads_again(rig):
    loader, disk, inbox = rig
    gate = disk.gate("a")
    loader.submit("a", 1, urgent=True)
    assert disk.entered["a"].wait(TIMEOUT)
    loader.submit("a", 1, urgent=True)  # its result is on the way
    gate.set()
    inbox.wait_for(lambda: len(inbox.posted) == 1)
    loader.submit("a", 1, urgent=True)  # e.g. its host copy was evicted since: read again
    inbox.wait_for(lambda: len(inbox.posted) == 2)
    assert disk.calls["a"] == 2


def test_weights_are_pinned_when_asked(monkeypatch):
    pinned: list[str] = []

    def fake_prepared(self: AdapterWeights, *, pin: bool = False) -> AdapterWeights:
        if pin:
            pinned.append(self.spec.target_modules[0])
        return self

    monkeypatch.setattr(AdapterWeights, "prepared", fake_prepared)
    inbox = Inbox()
    loader = HostLoader(lambda name: weights(name), inbox.post, inbox.wake, pin_memory=True)
    try:
        loader.submit("a", 1, urgent=True)
        inbox.wait_for(lambda: inbox.posted)
    finally:
        loader.close()
    assert pinned == ["a"] and isinstance(inbox.posted[0], HostLoaded)


@pytest.mark.gpu
def test_pinned_weights_are_page_locked():
    import torch

    from loraplex.adapters.weights import LoraModuleWeights

    w = AdapterWeights(weights("a").spec, {"m": LoraModuleWeights(torch.ones(2, 4), torch.ones(4, 2), 2.0)}, 64)
    p = w.prepared(pin=True)
    assert p.modules["m"].a.is_pinned() and p.modules["m"].b.is_pinned() and p.modules["m"].scale == 1.0
    assert torch.equal(p.modules["m"].a, w.modules["m"].a) and p.size_bytes == 64


def test_after_close_asks_are_dropped_quietly(rig):
    loader, disk, inbox = rig
    loader.close()
    loader.submit("a", 1, urgent=True)
    loader.submit("b", 1, urgent=False)
    assert disk.calls == Counter() and inbox.posted == []
