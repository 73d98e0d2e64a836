"""Zero tensors whose memory is committed as it is written: large preallocated pools on the CPU.

On the CPU a tensor is placed in an anonymous memory map: the OS hands each page out zeroed on its first write
(reads of untouched pages see the shared zero page), so resident memory follows what is used, not the size
asked for. The KV pool (every sequence at full length) and the LoRA slot stacks (every slot at --max-lora-rank)
are sized for the worst case and mostly untouched. Elsewhere (CUDA) a plain `torch.zeros`.
"""

from __future__ import annotations

import math
import mmap

import torch


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    buffer = mmap.mmap(-1, max(1, count * torch.empty((), dtype=dtype).element_size()))
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)  # the tensor keeps the map alive
