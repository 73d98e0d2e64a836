"""Per-token loop twins of `lora_apply` and `embedding_lora_apply`: the plainest correct code, used only as the
test oracle.

Slow on purpose (one Python iteration per token) and computed in float64, then cast to y's dtype, so they hold
the exact answer the batched ops approximate. They read only the per-token slots (and merges), never the grid
or the passes. DoRA: the base output row y[t] and the delta are combined as PEFT's DoRA layer states it,
g * (base + delta) + (1 - g) * bias, from the factors g and c = (1 - g) * bias that slots hold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

Merges = Mapping[int, Sequence[tuple[int, float]]]


def ref_lora_apply(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                   token_slots: Sequence[int], rank: int, merges: Merges | None = None,
                   dora_stack: torch.Tensor | None = None) -> None:
    """In place: y[t] += B[s, :rank].T @ (A[s, :rank] @ x[t]) for every token t with slot s >= 0; a merged
    token t (in `merges`) adds sum_k w_k * B[s_k, :rank].T @ (A[s_k, :rank] @ x[t]) over its (s_k, w_k)
    instead (its token_slots entry is not read). dora_stack [S + 1, 2, out]: then y[t] = g * y[t] + c with
    (g, c) = dora_stack[s] of the token's slot (a merged token: its first adapter's; the last, null, slot for
    base-only tokens)."""
    _ref(y, lambda t, slot: a_stack[slot, :rank].double().cpu() @ x[t].double().cpu(), b_stack, token_slots, rank,
         merges, dora_stack)


def ref_embedding_lora_apply(y: torch.Tensor, ids: Sequence[int], a_stack: torch.Tensor, b_stack: torch.Tensor,
                             token_slots: Sequence[int], rank: int, merges: Merges | None = None,
                             dora_stack: torch.Tensor | None = None) -> None:
    """As `ref_lora_apply` with the shrink of an embedding: h = A[s, :rank, ids[t]] (column ids[t] of PEFT's
    lora_embedding_A [r, vocab]) instead of A[s, :rank] @ x[t]."""
    _ref(y, lambda t, slot: a_stack[slot, :rank, int(ids[t])].double().cpu(), b_stack, token_slots, rank, merges,
         dora_stack)


def _ref(y: torch.Tensor, shrink: Callable[[int, int], torch.Tensor], b_stack: torch.Tensor,
         token_slots: Sequence[int], rank: int, merges: Merges | None, dora_stack: torch.Tensor | None) -> None:
    merges = merges or {}
    null = b_stack.shape[0] - 1
    for t, s in enumerate(token_slots):
        pairs = merges.get(t, [(s, 1.0)] if s >= 0 else [])
        total = y[t].double().cpu()
        for slot, weight in pairs:
            total = total + weight * (b_stack[slot, :rank].double().cpu().t() @ shrink(t, slot))  # [out]
        if dora_stack is not None:  # the token's slot in the first pass (a merged token: its first adapter's)
            g, c = dora_stack[pairs[0][0] if pairs else null].double().cpu()
            total = g * total + c
        y[t] = total.to(device=y.device, dtype=y.dtype)
