"""Plain-torch LoRA backend: the CPU backend and the fallback elsewhere; every op is a batched tensor op.

Per wrapped linear, whatever the adapter mix: gather the grid rows of x, zero the padding rows, take the
groups' A and B at the step's rank bound, one bmm for shrink and one for expand, one index_add_ into y.
That is 7 compute ops when A/B are gathered (grouped and gather forms) and 5 when the groups are a dense
slot range read in place (window form); never more, for 1 or 16 adapters and any number of segments
(bench_dispatch.py counts them), and no host sync: the grid layout arrives in device buffers (batch.py).
Every group is computed at the step's rank bound: the slots' zeros past their own rank add exact zeros, so
`slot_ranks` is not read (a per-slot bound would need per-group shapes, i.e. a loop or a host sync).
A pass with row weights (merged tokens) scales the delta rows by them in fp32: one more op.
"""

from __future__ import annotations

import torch

from loraplex.adapters.ops.base import LoRABackend
from loraplex.adapters.ops.batch import LoRABatch


class TorchLoRABackend(LoRABackend):
    name = "torch"

    def apply(self, y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
              batch: LoRABatch, rank: int, slot_ranks: torch.Tensor) -> None:
        g, d = batch.num_groups, batch.depth
        # [G*D, in]; a fill, not a multiply: a padding row must be exact zeros even when its token's x is inf.
        xs = x.index_select(0, batch.rows).masked_fill_(batch.padding, 0.0).to(a_stack.dtype)
        a, b = _group_stacks(a_stack[:, :rank], b_stack[:, :rank], batch)  # [G, rank, in], [G, rank, out]
        h = torch.bmm(xs.view(g, d, -1), a.transpose(1, 2))  # [G, D, rank]
        delta = torch.bmm(h, b).view(g * d, -1)  # [G*D, out]
        if batch.row_weights is not None:  # [G*D] fp32: promotes a half-precision delta to fp32 before scaling
            delta = delta * batch.row_weights[:, None]
        y.index_add_(0, batch.rows, delta.to(y.dtype))


def _group_stacks(a: torch.Tensor, b: torch.Tensor, batch: LoRABatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's A and B: a view of the stack range in the window form, else gathered (a copy)."""
    if batch.window_lo is not None:
        return a.narrow(0, batch.window_lo, batch.num_groups), b.narrow(0, batch.window_lo, batch.num_groups)
    return a.index_select(0, batch.group_slots), b.index_select(0, batch.group_slots)
