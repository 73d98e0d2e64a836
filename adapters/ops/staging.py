"""One page-locked host buffer for a step's small host -> device inputs (token ids, positions, slot maps, the
LoRA layout): on CUDA a copy from pageable memory is synchronous, from page-locked memory it is not.

Each input is written at the next free offset and copied from there asynchronously; `reset()` at the next step
start reuses the buffer from offset 0, which is safe because the engine reads every step's sampled tokens on
the host before it starts another (so that step's copies have landed). On the CPU the inputs are plain tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_ALIGN = 16  # bytes: each input starts aligned for any dtype


class HostStaging:
    def __init__(self, device: torch.device, capacity: int = 1 << 16) -> None:
        self.device = device
        self._pinned = device.type == "cuda"
        self._host = self._buffer(capacity) if self._pinned else None
        self._retired: list[torch.Tensor] = []  # outgrown buffers this step's copies may still read
        self._offset = 0

    def reset(self) -> None:
        """A new step: the previous step's copies have landed."""
        self._offset = 0
        self._retired.clear()

    def to_device(self, values: Sequence[int | float | bool], dtype: torch.dtype) -> torch.Tensor:
        """A device tensor holding `values` (asynchronous on CUDA)."""
        if self._host is None:
            return torch.tensor(values, dtype=dtype, device=self.device)
        return self._stage(values, dtype).to(self.device, non_blocking=True)

    def copy_into(self, dst: torch.Tensor, values: Sequence[int | float | bool]) -> None:
        """dst[:len(values)] = values (asynchronous on CUDA)."""
        if self._host is None:
            dst[: len(values)].copy_(torch.tensor(values, dtype=dst.dtype))
            return
        dst[: len(values)].copy_(self._stage(values, dst.dtype), non_blocking=True)

    def _stage(self, values: Sequence[int | float | bool], dtype: torch.dtype) -> torch.Tensor:
        size = torch.tensor([], dtype=dtype).element_size() * len(values)
        start = -(-self._offset // _ALIGN) * _ALIGN
        if start + size > self._host.numel():
            self._retired.append(self._host)
            self._host, start = self._buffer(max(2 * self._host.numel(), size + _ALIGN)), 0
        self._offset = start + size
        view = self._host[start:start + size].view(dtype)
        view.copy_(torch.tensor(values, dtype=dtype))
        return view

    @staticmethod
    def _buffer(capacity: int) -> torch.Tensor:
        return torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
