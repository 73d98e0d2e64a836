"""SlotWriter: the engine thread's copies of adapter weights into device slots (LoRAInjection.load_slot).

On CUDA the copies run on a side stream, so they overlap whatever the compute stream still runs, and
`fence()` makes the compute stream wait on an event recorded after them: the next forward, which may read
those slots, runs only once they landed. The side stream first waits for the compute stream, since a slot
being rewritten may still be read by an earlier forward queued there (an evicted adapter's last use). Host
tensors a copy reads (pinned by the host loader) are kept alive until its event has completed.
On CPU the copies are plain and `fence()` does nothing. `cuda` is the torch.cuda module (tests pass a fake one
that records the order of streams, events and copies).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from loraplex.adapters.inject import LoRAInjection
from loraplex.adapters.weights import AdapterWeights


class SlotWriter:
    def __init__(self, lora: LoRAInjection, device: torch.device, cuda: ModuleType | Any = None) -> None:
        self._lora = lora
        self._cuda = cuda if cuda is not None else torch.cuda
        self._stream = self._cuda.Stream(device=device) if device.type == "cuda" else None
        self._unfenced: list[AdapterWeights] = []  # written since the last fence
        self._in_flight: list[tuple[Any, list[AdapterWeights]]] = []  # (event, host weights it still reads)

    def write(self, slot: int, weights: AdapterWeights) -> None:
        if self._stream is None:
            self._lora.load_slot(slot, weights)
            return
        if not self._unfenced:  # the first copy since the last fence: order it after the compute stream
            self._stream.wait_stream(self._cuda.current_stream(self._stream.device))
        self._unfenced.append(weights)
        with self._cuda.stream(self._stream):
            self._lora.load_slot(slot, weights)

    def clear(self, slot: int) -> None:
        """Zero a slot, on the compute stream (after the forwards that read it), after any pending copy."""
        self.fence()
        self._lora.clear_slot(slot)

    def fence(self) -> None:
        """The compute stream's next work (the forward) waits for every copy issued so far."""
        if self._stream is None or not self._unfenced:
            return
        event = self._cuda.Event()
        event.record(self._stream)
        self._cuda.current_stream(self._stream.device).wait_event(event)
        self._in_flight = [(e, w) for e, w in self._in_flight if not e.query()]  # their copies landed
        self._in_flight.append((event, self._unfenced))
        self._unfenced = []

    def held(self) -> int:
        """Host weight sets kept alive for copies not yet known to have landed (fenced or not)."""
        return len(self._unfenced) + sum(len(w) for _, w in self._in_flight)
