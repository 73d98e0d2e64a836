"""Plain-torch LoRA backend: one matmul per segment (SGMV) or per slot (BGMV), at each adapter's own rank.

Works on any device torch runs on; it is the CPU backend and the fallback elsewhere. No host syncs:
the loops walk meta's host-side segments / slot_tokens and the host-side `ranks` list only.
Shapes as in `base.py`: x [T, in], h [T, R], y [T, out], a_stack [S, R, in], b_stack [S, out, R].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraplex.adapters.ops.base import LoRABackend
from loraplex.adapters.ops.meta import LoRAMeta


def _shrink_rows(x_rows: torch.Tensor, a_stack: torch.Tensor, slot: int, rank: int) -> torch.Tensor:
    """[n, in] @ A[slot, :rank].T -> [n, rank]; slicing to the rank is what spares small adapters r_max."""
    return x_rows @ a_stack[slot, :rank].t()


def _scatter_add_rows(
    y: torch.Tensor, idx: torch.Tensor, h_rows: torch.Tensor, b_stack: torch.Tensor, slot: int, rank: int
) -> None:
    """y[idx] += h_rows [N_s, rank] @ B[slot, :, :rank].T, computed in b_stack's dtype, added in y's."""
    delta = h_rows.to(b_stack.dtype) @ b_stack[slot, :, :rank].t()  # [N_s, out]
    y.index_add_(0, idx, delta.to(y.dtype))


def _accumulate_rows(y_rows: torch.Tensor, h_rows: torch.Tensor, b_stack: torch.Tensor, slot: int, rank: int) -> None:
    """y_rows [n, out] += h_rows [n, rank] @ B[slot, :, :rank].T, in place in y's dtype.

    addmm_ writes straight into y (no [n, out] temporary) when the dtypes agree; otherwise the delta is
    computed in b_stack's dtype and add_ casts it into y's.
    """
    b_t = b_stack[slot, :, :rank].t()  # [rank, out]
    if y_rows.dtype == b_stack.dtype:
        y_rows.addmm_(h_rows.to(b_stack.dtype), b_t)
    else:
        y_rows.add_(h_rows.to(b_stack.dtype) @ b_t)


class TorchLoRABackend(LoRABackend):
    """Reference-grade and CPU-fast: torch.mm on slices, index_select / index_add_ for the gathers."""

    name = "torch"

    def shrink_sgmv(
        self, h: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, ranks: Sequence[int], meta: LoRAMeta
    ) -> None:
        xs = x.to(a_stack.dtype)
        for start, end, slot in meta.segments:
            if rank := ranks[slot]:
                h[start:end, :rank] = _shrink_rows(xs[start:end], a_stack, slot, rank)

    def shrink_bgmv(
        self, h: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, ranks: Sequence[int], meta: LoRAMeta
    ) -> None:
        xs = x.to(a_stack.dtype)
        for slot, idx in meta.slot_tokens.items():
            if rank := ranks[slot]:
                # h[:, :rank] is a strided view of h; index_copy_ scatters the [N_s, rank] rows into it.
                h[:, :rank].index_copy_(0, idx, _shrink_rows(xs.index_select(0, idx), a_stack, slot, rank))

    def expand_sgmv(
        self, y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor, ranks: Sequence[int], meta: LoRAMeta
    ) -> None:
        for start, end, slot in meta.segments:
            if rank := ranks[slot]:
                _accumulate_rows(y[start:end], h[start:end, :rank], b_stack, slot, rank)

    def expand_bgmv(
        self, y: torch.Tensor, h: torch.Tensor, b_stack: torch.Tensor, ranks: Sequence[int], meta: LoRAMeta
    ) -> None:
        for slot, idx in meta.slot_tokens.items():
            if rank := ranks[slot]:
                _scatter_add_rows(y, idx, h.index_select(0, idx)[:, :rank], b_stack, slot, rank)

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
        """Fused per segment / per slot: the [n, rank] intermediate never lands in a [T, R] buffer."""
        xs = x.to(a_stack.dtype)
        if gather:
            for slot, idx in meta.slot_tokens.items():
                if rank := ranks[slot]:
                    h_rows = _shrink_rows(xs.index_select(0, idx), a_stack, slot, rank)  # [N_s, rank]
                    _scatter_add_rows(y, idx, h_rows, b_stack, slot, rank)
            return
        for start, end, slot in meta.segments:
            if rank := ranks[slot]:
                h_rows = _shrink_rows(xs[start:end], a_stack, slot, rank)  # [end - start, rank]
                _accumulate_rows(y[start:end], h_rows, b_stack, slot, rank)
