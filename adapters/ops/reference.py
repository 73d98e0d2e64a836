"""Per-token loop twins of the LoRA ops: the plainest correct code, used only as test oracles.

Slow on purpose (one Python iteration per token) and computed in float64, then cast to the op's
output dtype, so they hold the exact answer the fast ops approximate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraplex.adapters.ops.meta import LoRAMeta


def ref_lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, ranks: Sequence[int], meta: LoRAMeta) -> torch.Tensor:
    """h [T, R_max]: h[t, :r] = A[s, :r] @ x[t] for tokens with slot s >= 0 and r = ranks[s] > 0; else 0."""
    h = torch.zeros(x.shape[0], a_stack.shape[1], dtype=torch.float64)
    for t, s in enumerate(meta.token_slots.tolist()):
        if s >= 0 and ranks[s] > 0:
            r = ranks[s]
            h[t, :r] = a_stack[s, :r, :].double().cpu() @ x[t].double().cpu()
    return h.to(device=x.device, dtype=a_stack.dtype)


def ref_lora_expand(
    y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor, ranks: Sequence[int], meta: LoRAMeta
) -> None:
    """In place: y[t] += B[s, :, :r] @ h[t, :r] for tokens with slot s >= 0 and r = ranks[s] > 0."""
    for t, s in enumerate(meta.token_slots.tolist()):
        if s >= 0 and ranks[s] > 0:
            r = ranks[s]
            delta = b_stack[s, :, :r].double().cpu() @ h[t, :r].double().cpu()
            y[t] = (y[t].double().cpu() + delta).to(device=y.device, dtype=y.dtype)
