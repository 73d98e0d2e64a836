"""ties / dare merges on the host loader's merge worker (issue 20 item 7): one at a time, queued, cancellable, and
never on the threads that serve cold loads (the battery's test_item7 shows the latter with blocked merges)."""

from __future__ import annotations

import threading
import time

import torch

from loraplex.adapters.host_loader import HostLoader
from loraplex.adapters.merge import MergeRecipe, remember
from loraplex.adapters.messages import HostLoaded
from loraplex.adapters.peft_config import LoraSpec
from loraplex.adapters.weights import AdapterWeights, LoraModuleWeights


def weights(seed: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {f"l{i}.q_proj": LoraModuleWeights(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 1.0)
               for i in range(4)}
    return AdapterWeights(LoraSpec(2, 2.0, ("q_proj",)), modules, 4 * 128)


class Harness:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.reading = threading.Event()
        self.posted: list[object] = []
        self.loader = HostLoader(self.read, self.posted.append, lambda: None, workers=2, pin_memory=False)

    def read(self, name: str) -> AdapterWeights:
        if name == "slow":
            self.reading.set()
            assert self.gate.wait(30)
        return weights(len(name))


def test_a_queued_merge_is_cancelled_and_a_running_one_stops_at_its_next_step():
    h = Harness()
    running = remember(MergeRecipe((("slow", 0.3), ("b", 0.7)), "ties", density=0.5))
    queued = remember(MergeRecipe((("slow", 0.6), ("b", 0.4)), "ties", density=0.5))
    try:
        h.loader.submit(running, 1, True)
        h.loader.submit(queued, 1, True)
        assert h.reading.wait(10)  # the first merge is reading its first component; the second waits its turn
        assert h.loader.cancel(queued, 1) and h.loader.cancel(running, 1)
        assert not h.loader.cancel(running, 1)  # nothing left to cancel
        h.gate.set()
        h.loader.submit("plain", 1, True)
        deadline = time.monotonic() + 10
        while not h.posted and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # anything the cancelled merges would have posted has had time to arrive
        assert [getattr(m, "name", None) for m in h.posted] == ["plain"]
    finally:
        h.gate.set()
        h.loader.close()


def test_a_merge_asked_for_again_is_computed_once():
    """Asked for again (urgently, too) while it runs: no second merge. The merge is held inside its first read, so
    the asks arrive while it runs by construction, whatever the machine's speed."""
    h = Harness()
    name = remember(MergeRecipe((("slow", 0.5), ("b", 0.5)), "dare_linear", density=0.5, seed=3))
    try:
        h.loader.submit(name, 7, False)
        assert h.reading.wait(120)  # the first merge of a process imports peft (seconds on a busy machine)
        for urgent in (False, True, True):
            h.loader.submit(name, 7, urgent)
        h.gate.set()
        h.loader._merges.shutdown(wait=True)  # every merge queued so far has run and posted
        assert len(h.posted) == 1 and isinstance(h.posted[0], HostLoaded) and h.posted[0].name == name
    finally:
        h.gate.set()
        h.loader.close()
