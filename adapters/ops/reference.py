"""Per-token loop twin of `lora_apply`: the plainest correct code, used only as the test oracle.

Slow on purpose (one Python iteration per token) and computed in float64, then cast to y's dtype, so it
holds the exact answer the batched op approximates. It reads only the per-token slots (and merges), never
the grid or the passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def ref_lora_apply(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                   token_slots: Sequence[int], rank: int,
                   merges: Mapping[int, Sequence[tuple[int, float]]] | None = None) -> None:
    """In place: y[t] += B[s, :rank].T @ (A[s, :rank] @ x[t]) for every token t with slot s >= 0; a merged
    token t (in `merges`) adds sum_k w_k * B[s_k, :rank].T @ (A[s_k, :rank] @ x[t]) over its (s_k, w_k)
    instead (its token_slots entry is not read)."""
    merges = merges or {}
    for t, s in enumerate(token_slots):
        pairs = merges.get(t, [(s, 1.0)] if s >= 0 else [])
        if not pairs:
            continue
        total = y[t].double().cpu()
        for slot, weight in pairs:
            h = a_stack[slot, :rank].double().cpu() @ x[t].double().cpu()  # [rank]
            total = total + weight * (b_stack[slot, :rank].double().cpu().t() @ h)  # [out]
        y[t] = total.to(device=y.device, dtype=y.dtype)
