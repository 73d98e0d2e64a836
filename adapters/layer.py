"""MultiLoRALinear: wraps one base linear layer and adds per-token multi-adapter LoRA beside it.

    y_t = base(x_t) + scale_s * B_s (A_s x_t)      s = slot of token t (-1: base only)
    y_t = base(x_t) + sum_k w_k scale_k B_k (A_k x_t)   a token of a linear merge: several slots, weighted
                                                        (adapters/merge.py; the op runs them as passes)

The base may be nn.Linear or a bitsandbytes Linear4bit / Linear8bitLt: LoRA runs beside it in the compute
dtype (QLoRA style). Slot stacks are preallocated with one extra null slot (index num_slots, always zero)
that base-only tokens of a padded decode step point at; the scale is folded into B when a slot is loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.adapters.context import LoRABatchContext
from loraplex.adapters.lazy_zeros import lazy_zeros
from loraplex.adapters.ops import lora_apply


class MultiLoRALinear(nn.Module):
    """A base linear layer plus `num_slots` LoRA slots of rank <= `max_rank`.

    lora_a: [S + 1, R_max, in]; lora_b: [S + 1, R_max, out] (B transposed, already multiplied by the
    adapter's scale). Rows past a slot's own rank are zero, and so is a slot whose adapter does not
    target this layer: any rank bound computes the exact delta. lora_ranks: [S + 1] int32, each slot's own
    rank for this layer (0: empty, the null slot, or not targeted), so kernels that tile the rank (triton)
    stop there instead of multiplying the zeros up to the step's bound.
    """

    def __init__(self, base_layer: nn.Module, *, kind: str, num_slots: int, max_rank: int,
                 context: LoRABatchContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind  # the leaf name ("q_proj", ...): the step's rank bound is per kind
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.max_rank = max_rank
        self.num_slots = num_slots
        self.context = context
        device = _device_of(base_layer)
        # Lazily committed on the CPU: only the rows adapters were written to take memory (8 slots x rank 64
        # are ~0.7 GB for the demo model in fp32, its three rank-8 adapters a few MB).
        a = lazy_zeros((num_slots + 1, max_rank, self.in_features), dtype, device)
        b = lazy_zeros((num_slots + 1, max_rank, self.out_features), dtype, device)
        self._written = [0] * (num_slots + 1)  # per slot: rows [0, n) may be non-zero, the rest are zeros
        self.register_buffer("lora_a", a, persistent=False)
        self.register_buffer("lora_b", b, persistent=False)
        self.register_buffer("lora_ranks", torch.zeros(num_slots + 1, dtype=torch.int32, device=device),
                             persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        # Some model code reads `proj.weight.dtype` / `.device`; answer for the base layer.
        return self.base_layer.weight

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Load A [r, in] and B [out, r] (scaled by `scale`) into `slot`; r <= max_rank; zeros past r."""
        r = a.shape[0]
        if r > self.max_rank:
            raise ValueError(f"rank {r} exceeds --max-lora-rank {self.max_rank}")
        if tuple(a.shape) != (r, self.in_features) or tuple(b.shape) != (self.out_features, r):
            raise ValueError(f"LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit this layer")
        # copy_ converts dtype and device itself. Prepared weights (AdapterWeights.prepared: b is the view of a
        # contiguous scale * B^T, scale 1.0) make both copies plain memcpys.
        self.lora_a[slot, :r].copy_(a, non_blocking=True)
        b_dst = self.lora_b[slot, :r]  # [r, out] view: scale in place, no temporary of B's size
        b_dst.copy_(b.t(), non_blocking=True)
        if scale != 1.0:
            b_dst.mul_(scale)
        if r < self._written[slot]:  # zeros past the rank (the previous adapter's rows): any rank bound is exact
            self.lora_a[slot, r : self._written[slot]].zero_()
            self.lora_b[slot, r : self._written[slot]].zero_()
        self._written[slot] = r
        self.lora_ranks[slot] = r  # a fill on the device, in stream order with the copies above

    def clear_slot(self, slot: int) -> None:
        """Zero the slot: an adapter that does not target this layer adds nothing through it. Only the rows ever
        written are zeroed (the rest are zeros already, and on the CPU untouched pages stay uncommitted)."""
        self.lora_a[slot, : self._written[slot]].zero_()
        self.lora_b[slot, : self._written[slot]].zero_()
        self._written[slot] = 0
        self.lora_ranks[slot] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        rank = self.context.rank_for(self.kind)
        if not rank:  # no adapter of this step targets this kind of layer (a per-step fact, not per token)
            return y
        y = y.contiguous()  # a no-op for nn.Linear; bnb layers may hand back a strided view
        # x: [..., in] -> [T, in]; y: [..., out] -> [T, out] (a view: the add lands in y)
        y2d = y.view(-1, self.out_features)
        lora_apply(y2d, x.reshape(-1, self.in_features), self.lora_a, self.lora_b, self.context.batch, rank,
                   self.lora_ranks)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={self.num_slots}, r_max={self.max_rank}"


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
