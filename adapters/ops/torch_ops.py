"""Plain-torch LoRA backend: the CPU backend and the fallback elsewhere; every op is a batched tensor op.

Per wrapped linear, whatever the adapter mix: gather the grid rows of x, zero the padding rows, take the
groups' A and B at the step's rank bound, one bmm for shrink and one for expand, one index_add_ into y.
That is 7 compute ops when A/B are gathered (grouped and gather forms) and 5 when the groups are a dense
slot range read in place (window form); never more, for 1 or 16 adapters and any number of segments
(bench_dispatch.py counts them), and no host sync: the grid layout arrives in device buffers (batch.py).
Every group is computed at the step's rank bound: the slots' zeros past their own rank add exact zeros, so
`slot_ranks` is not read (a per-slot bound would need per-group shapes, i.e. a loop or a host sync).
A pass with row weights (merged tokens) scales the delta rows by them in fp32: one more op.
A step with a DoRA row adds, in the layers a DoRA slot targets, a gather of every token's factors and a
multiply (and an add for a layer with a bias): 2 ops (3), and nothing in any other step.

The embedding's LoRA (`embedding_lora_apply`) reuses the expand: its shrink is a gather of A's columns at the
token ids (PEFT's `F.embedding(ids, lora_embedding_A.T)`), not a product. It always runs on these ops, on every
device: one call per forward, not per layer.
"""

from __future__ import annotations

import torch

from loraplex.adapters.ops.base import DoraFactors, LoRABackend
from loraplex.adapters.ops.batch import LoRABatch


class TorchLoRABackend(LoRABackend):
    name = "torch"

    def apply(self, y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
              batch: LoRABatch, rank: int, slot_ranks: torch.Tensor, dora: DoraFactors | None = None) -> None:
        g, d = batch.num_groups, batch.depth
        # [G*D, in]; a fill, not a multiply: a padding row must be exact zeros even when its token's x is inf.
        xs = x.index_select(0, batch.rows).masked_fill_(batch.padding, 0.0).to(a_stack.dtype)
        a, b = _groups_of(a_stack[:, :rank], batch), _groups_of(b_stack[:, :rank], batch)  # [G, rank, in|out]
        h = torch.bmm(xs.view(g, d, -1), a.transpose(1, 2))  # [G, D, rank]
        expand(y, h, b, batch)
        if dora is not None:
            apply_dora(y, dora, batch)


def expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, batch: LoRABatch) -> None:
    """y[rows] += (h @ B) per group, weighted per row when the pass has row weights. h: [G, D, rank];
    b: [G, rank, out]; y: [T, out]."""
    delta = torch.bmm(h, b).view(batch.num_groups * batch.depth, -1)  # [G*D, out]
    if batch.row_weights is not None:  # [G*D] fp32: promotes a half-precision delta to fp32 before scaling
        delta = delta * batch.row_weights[:, None]
    y.index_add_(0, batch.rows, delta.to(y.dtype))


def apply_dora(y: torch.Tensor, dora: DoraFactors, batch: LoRABatch) -> None:
    """y[t] = g[s] * y[t] (+ c[s]) for every token t, s its slot (the null slot for base-only tokens, whose
    factors are exactly 1 and 0). y: [T, out]; dora.stack: [S + 1, 2, out] fp32 (y * fp32 rounds once into
    y's dtype)."""
    if batch.scale_slots is None:
        raise ValueError("a batch without DoRA slots cannot apply DoRA factors")
    factors = dora.stack.index_select(0, batch.scale_slots)  # [T, 2, out]
    y.mul_(factors[:, 0])
    if dora.shift:
        y.add_(factors[:, 1])


def embedding_lora_apply(y: torch.Tensor, ids: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                         batch: LoRABatch, rank: int, dora: DoraFactors | None = None) -> None:
    """The embedding's LoRA delta for every token, in place. Semantics, as a loop:

        for t in range(T):
            s = batch.token_slots[t]
            if s >= 0:
                y[t] += B[s, :rank].T @ A[s, :rank, ids[t]]
    with a linear merge's passes (weights) and DoRA's factors as in `lora_apply` (ops/__init__.py).
    ids: [T] int64 token ids; y: [T, dim]; a_stack: [S + 1, R_max, vocab] (PEFT's lora_embedding_A per slot);
    b_stack: [S + 1, R_max, dim] (B transposed, scale folded in). Only host-side shape checks (no sync).
    """
    t = batch.num_tokens
    if ids.dim() != 1 or y.dim() != 2 or ids.shape[0] != t or y.shape[0] != t:
        raise ValueError(f"expected ids [{t}] and y [{t}, dim], got {tuple(ids.shape)} and {tuple(y.shape)}")
    if a_stack.shape[:2] != b_stack.shape[:2] or not 0 < rank <= a_stack.shape[1]:
        raise ValueError(f"stacks A{tuple(a_stack.shape)} B{tuple(b_stack.shape)} do not fit rank {rank}")
    for k, part in enumerate((batch, *batch.passes)):
        _embedding_pass(y, ids, a_stack[:, :rank], b_stack[:, :rank], part, dora if k == 0 else None)


def _embedding_pass(y: torch.Tensor, ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch,
                    dora: DoraFactors | None) -> None:
    g, d = batch.num_groups, batch.depth
    # Each grid row's slot ([G*D]: its group's, repeated) and token id; h = A[slot, :, id], padding rows zeroed.
    row_slots = batch.group_slots[:, None].expand(g, d).reshape(-1)
    h = a[row_slots, :, ids.index_select(0, batch.rows)]  # [G*D, rank]: a gather, never a copy of A
    h = h.masked_fill_(batch.padding, 0.0).view(g, d, -1)
    expand(y, h, _groups_of(b, batch), batch)
    if dora is not None:
        apply_dora(y, dora, batch)


def _groups_of(stack: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """Each group's slice of a slot stack: a view of the stack range in the window form, else gathered (a copy)."""
    if batch.window_lo is not None:
        return stack.narrow(0, batch.window_lo, batch.num_groups)
    return stack.index_select(0, batch.group_slots)
