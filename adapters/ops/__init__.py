"""Batched multi-adapter LoRA ops (Punica/vLLM naming): lora_shrink, lora_expand and lora_apply.

Each public function states its semantics as a per-token loop; `reference.py` holds exactly that loop
as the test oracle. The work itself is done by a `LoRABackend` picked once per device type by
`get_backend` (torch for every device for now) and logged.

Variants: SGMV walks `meta.segments` (one matmul per contiguous run of one adapter's tokens, good for
prefill); BGMV gathers each slot's tokens (`meta.slot_tokens`, one matmul per slot, good for decode
batches where slots interleave). `mode="auto"` takes BGMV when `meta.is_fragmented`, else SGMV.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Literal

import torch

from loraplex.adapters.ops.base import LoRABackend
from loraplex.adapters.ops.meta import LoRAMeta
from loraplex.adapters.ops.torch_ops import TorchLoRABackend

__all__ = ["LoRABackend", "LoRAMeta", "Mode", "get_backend", "lora_apply", "lora_expand", "lora_shrink"]

logger = logging.getLogger(__name__)

Mode = Literal["auto", "sgmv", "bgmv"]
_MODES: tuple[str, ...] = ("auto", "sgmv", "bgmv")


@functools.cache
def _backend_for(device_type: str) -> LoRABackend:
    backend = TorchLoRABackend()
    logger.info("LoRA ops backend for device type %r: %s", device_type, backend.name)
    return backend


def get_backend(device: torch.device | str) -> LoRABackend:
    """The LoRA kernel backend for `device`; chosen (and logged) once per device type."""
    return _backend_for(torch.device(device).type)


def _use_gather(meta: LoRAMeta, mode: str) -> bool:
    """True for the BGMV (gather) variant: explicitly, or under auto for fragmented (decode-like) batches."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return mode == "bgmv" or (mode == "auto" and meta.is_fragmented)


def _check(rows: torch.Tensor, stack: torch.Tensor, ranks: Sequence[int], meta: LoRAMeta, stack_name: str) -> None:
    """Host-side shape checks only (no device sync): token count, slot count, ranks within r_max."""
    r_max = stack.shape[1] if stack_name == "a_stack" else stack.shape[2]
    if rows.dim() != 2 or rows.shape[0] != meta.num_tokens:
        raise ValueError(f"expected [{meta.num_tokens}, features] rows, got {tuple(rows.shape)}")
    if stack.dim() != 3 or len(ranks) != stack.shape[0]:
        raise ValueError(f"{stack_name} {tuple(stack.shape)} needs one rank per slot; got {len(ranks)} ranks")
    if ranks and (min(ranks) < 0 or max(ranks) > r_max):
        raise ValueError(f"ranks must lie in [0, {r_max}] (r_max of {stack_name}); got {list(ranks)}")
    if meta.active_slots and meta.active_slots[-1] >= len(ranks):
        raise ValueError(f"meta uses slot {meta.active_slots[-1]} but there are only {len(ranks)} slots")


def lora_shrink(
    x: torch.Tensor, a_stack: torch.Tensor, ranks: Sequence[int], meta: LoRAMeta, *, mode: Mode = "auto"
) -> torch.Tensor:
    """h = per-token x @ A[slot].T at each adapter's own rank; returns h: [T, R_max] in a_stack's dtype.

    x: [T, in]; a_stack: [S, R_max, in]; ranks: S host ints. Semantics, as a loop:

        h = zeros(T, R_max)
        for t in range(T):
            s = meta.token_slots[t]
            if s >= 0 and ranks[s] > 0:
                r = ranks[s]
                h[t, :r] = a_stack[s, :r, :] @ x[t]
        return h
    """
    gather = _use_gather(meta, mode)
    _check(x, a_stack, ranks, meta, "a_stack")
    h = torch.zeros((x.shape[0], a_stack.shape[1]), dtype=a_stack.dtype, device=x.device)
    backend = get_backend(x.device)
    (backend.shrink_bgmv if gather else backend.shrink_sgmv)(h, x, a_stack, ranks, meta)
    return h


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    b_stack: torch.Tensor,
    ranks: Sequence[int],
    meta: LoRAMeta,
    *,
    mode: Mode = "auto",
) -> None:
    """y += per-token h @ B[slot].T at each adapter's own rank, in place, in y's dtype.

    y: [T, out]; h: [T, R_max] (from lora_shrink); b_stack: [S, out, R_max] (scale folded in).
    Semantics, as a loop:

        for t in range(T):
            s = meta.token_slots[t]
            if s >= 0 and ranks[s] > 0:
                r = ranks[s]
                y[t] += b_stack[s, :, :r] @ h[t, :r]
    Rows of base-only tokens (slot -1) and of rank-0 slots are left untouched.
    """
    gather = _use_gather(meta, mode)
    _check(y, b_stack, ranks, meta, "b_stack")
    if tuple(h.shape) != (meta.num_tokens, b_stack.shape[2]):
        raise ValueError(f"h must be [{meta.num_tokens}, {b_stack.shape[2]}], got {tuple(h.shape)}")
    backend = get_backend(y.device)
    (backend.expand_bgmv if gather else backend.expand_sgmv)(y, h, b_stack, ranks, meta)


def lora_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    ranks: Sequence[int],
    meta: LoRAMeta,
    *,
    mode: Mode = "auto",
) -> None:
    """y += expand(shrink(x)), in place: the whole LoRA delta of one layer. Semantics, as a loop:

        for t in range(T):
            s = meta.token_slots[t]
            if s >= 0 and ranks[s] > 0:
                r = ranks[s]
                y[t] += b_stack[s, :, :r] @ (a_stack[s, :r, :] @ x[t])
    The backend may fuse the two steps per segment / slot instead of filling a [T, R_max] buffer.
    """
    gather = _use_gather(meta, mode)
    _check(x, a_stack, ranks, meta, "a_stack")
    _check(y, b_stack, ranks, meta, "b_stack")
    get_backend(x.device).apply(y, x, a_stack, b_stack, ranks, meta, gather)
