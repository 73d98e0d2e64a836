"""SlotWriter: the engine thread's copies of adapter weights into device slots (LoRAInjection.load_slot).

On CUDA the copies run on a side stream, so they overlap whatever the compute stream still runs, and
`fence()` makes the compute stream wait on an event recorded after them: the next forward, which may read
those slots, runs only once they landed. The side stream first waits for the compute stream, since a slot
being rewritten may still be read by an earlier forward queued there (an evicted adapter's last use). Host
tensors a copy reads (pinned by the host loader) are kept alive until its event has completed.
On CPU the copies are plain and `fence()` does nothing.
"""

from __future__ import annotations

import torch

from loraplex.adapters.inject import LoRAInjection
from loraplex.adapters.weights import AdapterWeights


class SlotWriter:
    def __init__(self, lora: LoRAInjection, device: torch.device) -> None:
        self._lora = lora
        self._stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self._unfenced: list[AdapterWeights] = []  # written since the last fence
        self._in_flight: list[tuple[torch.cuda.Event, list[AdapterWeights]]] = []

    def write(self, slot: int, weights: AdapterWeights) -> None:
        if self._stream is None:
            self._lora.load_slot(slot, weights)
            return
        if not self._unfenced:  # the first copy since the last fence: order it after the compute stream
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        self._unfenced.append(weights)
        with torch.cuda.stream(self._stream):
            self._lora.load_slot(slot, weights)

    def clear(self, slot: int) -> None:
        """Zero a slot, on the compute stream (after the forwards that read it), after any pending copy."""
        self.fence()
        self._lora.clear_slot(slot)

    def fence(self) -> None:
        """The compute stream's next work (the forward) waits for every copy issued so far."""
        if self._stream is None or not self._unfenced:
            return
        event = torch.cuda.Event()
        event.record(self._stream)
        torch.cuda.current_stream(self._stream.device).wait_event(event)
        self._in_flight = [(e, w) for e, w in self._in_flight if not e.query()]  # their copies landed
        self._in_flight.append((event, self._unfenced))
        self._unfenced = []
