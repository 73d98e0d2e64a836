"""The kernel-backend seam: the one fused LoRA op every backend (torch, triton, ...) provides.

Shapes, for T flattened tokens, S adapter slots (plus the null slot S, all zeros), R_max = --max-lora-rank
and a step's grid of G groups x D rows (see batch.py):
    x: [T, in]   y: [T, out]   a_stack: [S + 1, R_max, in]   b_stack: [S + 1, R_max, out] (scale folded in)
Slot s holds its adapter's A [r, in] and B^T [r, out] in rows [0, r) and zeros past r, so computing at any
rank bound >= r gives the same result. The public function in `loraplex.adapters.ops` validates shapes;
backends only compute.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from loraplex.adapters.ops.batch import LoRABatch


class LoRABackend(ABC):
    """One implementation of the fused shrink + expand over a step's grid."""

    name: str = "abstract"

    @abstractmethod
    def apply(self, y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
              batch: LoRABatch, rank: int) -> None:
        """y[t] += (x[t] @ A[s, :rank].T) @ B[s, :rank] for every grid row (token t, slot s), in place.

        The op sequence must not depend on which slots or how many segments the batch holds, and nothing
        may synchronise with the host (the decode step is captured by CUDA graphs).
        """
