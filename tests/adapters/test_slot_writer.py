"""SlotWriter's ordering on CUDA, checked on the CPU with a fake torch.cuda that logs every stream, event and
copy: the side stream waits for the compute stream before its first copy (a slot being rewritten may still be
read by a queued forward), copies run on the side stream, the compute stream waits on an event recorded after
them before the next forward, host weights live until their event completed, and a slot is cleared on the
compute stream after pending copies."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from loraplex.adapters.slot_writer import SlotWriter


class FakeStream:
    def __init__(self, log: list[str], name: str, device: torch.device | None = None) -> None:
        self.log, self.name, self.device = log, name, device

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(f"{self.name} waits {other.name}")

    def wait_event(self, event: FakeEvent) -> None:
        self.log.append(f"{self.name} waits event {event.id}")


class FakeEvent:
    count = 0

    def __init__(self, cuda: FakeCuda) -> None:
        FakeEvent.count += 1
        self.id, self.cuda, self.done = FakeEvent.count, cuda, False

    def record(self, stream: FakeStream) -> None:
        self.cuda.log.append(f"event {self.id} recorded on {stream.name}")
        self.cuda.events.append(self)

    def query(self) -> bool:
        return self.done


class FakeCuda:
    """The parts of torch.cuda SlotWriter uses; `current` is the stream ops run on now."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.events: list[FakeEvent] = []
        self.compute = FakeStream(self.log, "compute")
        self.current = self.compute

    def Stream(self, device: torch.device) -> FakeStream:  # noqa: N802 - torch.cuda's name
        return FakeStream(self.log, "side", device)

    def current_stream(self, device: torch.device | None = None) -> FakeStream:
        return self.compute

    @contextlib.contextmanager
    def stream(self, stream: FakeStream) -> Iterator[None]:
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def Event(self) -> FakeEvent:  # noqa: N802
        return FakeEvent(self)


class FakeLoRA:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda

    def load_slot(self, slot: int, weights: object) -> None:
        self.cuda.log.append(f"copy slot {slot} on {self.cuda.current.name}")

    def clear_slot(self, slot: int) -> None:
        self.cuda.log.append(f"clear slot {slot} on {self.cuda.current.name}")


def _writer() -> tuple[SlotWriter, FakeCuda]:
    cuda = FakeCuda()
    return SlotWriter(FakeLoRA(cuda), torch.device("cuda"), cuda=cuda), cuda


def test_copies_wait_for_the_compute_stream_run_on_the_side_and_fence_the_next_forward():
    writer, cuda = _writer()
    writer.write(0, "w0")
    writer.write(1, "w1")
    writer.fence()
    assert cuda.log == ["side waits compute", "copy slot 0 on side", "copy slot 1 on side",
                        f"event {cuda.events[0].id} recorded on side",
                        f"compute waits event {cuda.events[0].id}"]


def test_host_weights_live_until_their_copy_landed():
    writer, cuda = _writer()
    writer.write(0, "w0")
    writer.fence()
    assert writer.held() == 1  # the event has not completed: the pinned source must stay alive
    writer.write(1, "w1")
    writer.fence()
    assert writer.held() == 2
    cuda.events[0].done = True
    writer.write(2, "w2")
    writer.fence()  # drops the first set (its event completed), keeps the two still in flight
    assert writer.held() == 2
    for event in cuda.events:
        event.done = True
    writer.write(3, "w3")
    writer.fence()
    assert writer.held() == 1


def test_each_batch_of_copies_waits_for_the_compute_stream_once():
    writer, cuda = _writer()
    for _ in range(2):
        writer.write(0, "a")
        writer.write(1, "b")
        writer.fence()
    assert cuda.log.count("side waits compute") == 2  # once per batch between fences


def test_clear_fences_pending_copies_and_runs_on_the_compute_stream():
    writer, cuda = _writer()
    writer.write(0, "w0")
    writer.clear(0)
    assert cuda.log[-3:] == [f"event {cuda.events[0].id} recorded on side", f"compute waits event {cuda.events[0].id}",
                             "clear slot 0 on compute"]


def test_a_fence_without_copies_does_nothing_and_the_cpu_copies_directly():
    writer, cuda = _writer()
    writer.fence()
    assert cuda.log == []
    fake = FakeCuda()
    cpu = SlotWriter(FakeLoRA(fake), torch.device("cpu"), cuda=fake)
    cpu.write(3, "w")
    cpu.fence()
    assert fake.log == ["copy slot 3 on compute"] and cpu.held() == 0
