"""The kernel-backend seam: the one fused LoRA op every backend (torch, triton, ...) provides.

Shapes, for T flattened tokens, S adapter slots (plus the null slot S, all zeros), R_max = --max-lora-rank
and a step's grid of G groups x D rows (see batch.py):
    x: [T, in]   y: [T, out]   a_stack: [S + 1, R_max, in]   b_stack: [S + 1, R_max, out] (scale folded in)
    slot_ranks: [S + 1] int32, slot s's own rank r_s for this layer (0: empty, the null slot, not targeted)
    dora: DoraFactors, stack [S + 1, 2, out] fp32 (only in steps with a DoRA row, for layers a DoRA slot targets)
Slot s holds its adapter's A [r_s, in] and B^T [r_s, out] in rows [0, r_s) and zeros past r_s, so computing
at any rank bound >= r_s gives the same result: a backend may stop at r_s (triton: no work on the rank
padding) or compute the zeros up to the step's bound (torch: static shapes, slot_ranks unused). The public
function in `loraplex.adapters.ops` validates shapes; backends only compute.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from loraplex.adapters.ops.batch import LoRABatch


@dataclass(frozen=True)
class DoraFactors:
    """DoRA's per-slot output factors of one layer (adapters/dora.py computes them once per load).

    stack: [S + 1, 2, out] fp32. stack[s, 0] = g_s = m_s / ||W + scale_s B_s A_s|| per output channel (DoRA's
    magnitude over the norm of the adapted weight's rows, PEFT's `mag_norm_scale`); stack[s, 1] = (1 - g_s) * bias
    (zeros without a bias). A slot that is not DoRA here (plain LoRA, not targeted, empty, the null slot) holds
    exactly g = 1, c = 0, so applying the factors to its tokens changes no bit: y * 1 + 0 == y.
    shift: the layer has a bias, so stack[:, 1] may be non-zero (a backend may skip adding it otherwise).
    """

    stack: torch.Tensor
    shift: bool


class LoRABackend(ABC):
    """One implementation of the fused shrink + expand over a step's grid."""

    name: str = "abstract"

    @abstractmethod
    def apply(self, y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
              batch: LoRABatch, rank: int, slot_ranks: torch.Tensor, dora: DoraFactors | None = None) -> None:
        """y[t] += w * (x[t] @ A[s, :r].T) @ B[s, :r] for every grid row (token t, slot s, weight w: the row's
        batch.row_weights entry, or 1 without them), in place, where r is any bound with
        slot_ranks[s] <= r <= rank (the rows in between are zeros). One pass: `batch.passes` are not read.
        With `dora`, every token t of the batch (slot s, the null slot for base-only tokens) then becomes
        y[t] = g[s] * y[t] + c[s] (DoraFactors): DoRA's y = g * (W x + s B A x) + (1 - g) * bias.

        The op sequence must not depend on which slots or how many segments the batch holds, and nothing
        may synchronise with the host (the decode step is captured by CUDA graphs).
        """
