"""The kernel-backend seam: the four batched LoRA ops every backend (torch, triton, ...) provides.

Shapes, for T flattened tokens, S adapter slots and R = r_max:
    x: [T, in]   h: [T, R]   y: [T, out]   a_stack: [S, R, in]   b_stack: [S, out, R]
`ranks[s]` is slot s's own rank (0 = empty slot or module not targeted); only A[s, :ranks[s]] and
B[s, :, :ranks[s]] are meaningful. The public functions in `loraplex.adapters.ops` validate inputs,
allocate h and pick the variant; backends only compute.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from loraplex.adapters.ops.meta import LoRAMeta


class LoRABackend(ABC):
    """One implementation of the SGMV (per segment) and BGMV (per slot gather) shrink/expand ops."""

    name: str = "abstract"

    @abstractmethod
    def shrink_sgmv(
        self, h: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, ranks: Sequence[int], meta: LoRAMeta
    ) -> None:
        """Per segment (start, end, s) of meta.segments: h[start:end, :r] = x[start:end] @ A[s, :r].T.

        h arrives zero-filled in a_stack's dtype; entries outside adapted tokens' ranks stay zero.
        """

    @abstractmethod
    def shrink_bgmv(
        self, h: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, ranks: Sequence[int], meta: LoRAMeta
    ) -> None:
        """Per slot s with tokens idx in meta.slot_tokens: h[idx, :r] = x[idx] @ A[s, :r].T."""

    @abstractmethod
    def expand_sgmv(
        self, y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor, ranks: Sequence[int], meta: LoRAMeta
    ) -> None:
        """Per segment (start, end, s): y[start:end] += h[start:end, :r] @ B[s, :, :r].T (in place)."""

    @abstractmethod
    def expand_bgmv(
        self, y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor, ranks: Sequence[int], meta: LoRAMeta
    ) -> None:
        """Per slot s with tokens idx: y[idx] += h[idx, :r] @ B[s, :, :r].T (in place)."""

    def apply(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        ranks: Sequence[int],
        meta: LoRAMeta,
        gather: bool,
    ) -> None:
        """y += expand(shrink(x)) with the BGMV variant when `gather`, else SGMV.

        Default: the two ops through a zero-filled [T, R] buffer. Backends override this where a fused
        path (no buffer) measures faster.
        """
        h = x.new_zeros((x.shape[0], a_stack.shape[1]), dtype=a_stack.dtype)
        if gather:
            self.shrink_bgmv(h, x, a_stack, ranks, meta)
            self.expand_bgmv(y, h, b_stack, ranks, meta)
        else:
            self.shrink_sgmv(h, x, a_stack, ranks, meta)
            self.expand_sgmv(y, h, b_stack, ranks, meta)
