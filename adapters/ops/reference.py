"""Per-token loop twin of `lora_apply`: the plainest correct code, used only as the test oracle.

Slow on purpose (one Python iteration per token) and computed in float64, then cast to y's dtype, so it
holds the exact answer the batched op approximates. It reads only the per-token slots, never the grid.
"""

from __future__ import annotations

import torch


def ref_lora_apply(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                   token_slots: list[int], rank: int) -> None:
    """In place: y[t] += B[s, :rank].T @ (A[s, :rank] @ x[t]) for every token t with slot s >= 0."""
    for t, s in enumerate(token_slots):
        if s >= 0:
            h = a_stack[s, :rank].double().cpu() @ x[t].double().cpu()  # [rank]
            delta = b_stack[s, :rank].double().cpu().t() @ h  # [out]
            y[t] = (y[t].double().cpu() + delta).to(device=y.device, dtype=y.dtype)
