"""Batched multi-adapter LoRA: one fused `lora_apply` per wrapped linear (Punica/vLLM's shrink + expand).

The semantics are stated as a per-token loop in `lora_apply`'s docstring; `reference.py` holds exactly that
loop as the test oracle. The work is done by a `LoRABackend` picked once per device type by `get_backend`
(torch for every device for now) and logged. The layout of the step's tokens (which tokens share one
gathered adapter) is planned once per forward by the runner (`batch.py`), never inside a layer.
"""

from __future__ import annotations

import functools
import logging

import torch

from loraplex.adapters.ops.base import LoRABackend
from loraplex.adapters.ops.batch import GroupPlan, LoRABatch, LoRABatchBuffers, plan_groups
from loraplex.adapters.ops.torch_ops import TorchLoRABackend

__all__ = ["GroupPlan", "LoRABackend", "LoRABatch", "LoRABatchBuffers", "get_backend", "lora_apply", "plan_groups"]

logger = logging.getLogger(__name__)


@functools.cache
def _backend_for(device_type: str) -> LoRABackend:
    backend = TorchLoRABackend()
    logger.info("LoRA ops backend for device type %r: %s", device_type, backend.name)
    return backend


def get_backend(device: torch.device | str) -> LoRABackend:
    """The LoRA kernel backend for `device`; chosen (and logged) once per device type."""
    return _backend_for(torch.device(device).type)


def lora_apply(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
               batch: LoRABatch, rank: int) -> None:
    """y += the LoRA delta of one layer for every token, in place. Semantics, as a loop:

        for t in range(T):
            s = batch.token_slots[t]
            if s >= 0:
                y[t] += B[s, :rank].T @ (A[s, :rank] @ x[t])
    x: [T, in]; y: [T, out]; a_stack: [S + 1, R_max, in]; b_stack: [S + 1, R_max, out] (B transposed, the
    adapter's scale folded in, zeros past each slot's own rank); rank: the step's bound for this layer.
    Only host-side shape checks here (no device sync).
    """
    t = batch.num_tokens
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != t or y.shape[0] != t:
        raise ValueError(f"expected x [{t}, in] and y [{t}, out], got {tuple(x.shape)} and {tuple(y.shape)}")
    if a_stack.shape[:2] != b_stack.shape[:2] or not 0 < rank <= a_stack.shape[1]:
        raise ValueError(f"stacks A{tuple(a_stack.shape)} B{tuple(b_stack.shape)} do not fit rank {rank}")
    get_backend(x.device).apply(y, x, a_stack, b_stack, batch, rank)
