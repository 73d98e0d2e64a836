"""Plain-torch LoRA backend: one matmul per segment (SGMV) or per slot (BGMV), at each adapter's own rank.

Works on any device torch runs on; it is the CPU backend and the fallback elsewhere. No host syncs:
the loops walk meta's host-side segments / slot_tokens and the host-side `ranks` list only.
Shapes as in `base.py`: x [T, in], h [T, R], y [T, out], a_stack [S, R, in], b_stack [S, out, R].

The fused `apply` has a third path for batches spread thin over many slots (a decode step of distinct
adapters: one token per slot): it gathers each token's own A and B and runs one `bmm` pair per distinct
rank, instead of four small ops per slot. Measured on bench-small shapes (in 576, out 576/1536, rank 8/16,
16 tokens, 2 CPU cores): 16 slots x 1 token ~5x faster than the per-slot loop; at 4 tokens per slot
about even; 1 slot x 16 tokens: the loop (two matmuls) wins by far.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraplex.adapters.ops.base import LoRABackend
from loraplex.adapters.ops.meta import LoRAMeta

# `apply` gathers per token when the batch has more than one slot and at most this many tokens per slot.
TOKENS_PER_SLOT_FOR_TOKEN_GATHER = 4

# (rank, token rows or None for "every row, in order", token slots [N]) for one distinct rank.
RankGroup = tuple[int, torch.Tensor | None, torch.Tensor]


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


def _gather_rows(
    y: torch.Tensor, xs: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, group: RankGroup
) -> None:
    """y[rows] += B[slot_t, :, :r] @ (A[slot_t, :r] @ xs[t]) for each token t of one rank group, as bmm.

    Only A[s, :r] / B[s, :, :r] are gathered (each slot's own rank), so nothing past a rank is read.
    """
    rank, rows, slots = group
    x_rows = xs if rows is None else xs.index_select(0, rows)  # [N, in]
    a = a_stack[:, :rank].index_select(0, slots)  # [N, r, in]
    b = b_stack[:, :, :rank].index_select(0, slots)  # [N, out, r]
    h = torch.bmm(x_rows.unsqueeze(1), a.transpose(1, 2))  # [N, 1, r]
    if rows is None and y.dtype == b.dtype:
        y.unsqueeze(1).baddbmm_(h, b.transpose(1, 2))  # straight into y [T, 1, out]: no temporary
        return
    delta = torch.bmm(h, b.transpose(1, 2)).squeeze(1).to(y.dtype)  # [N, out]
    if rows is None:
        y.add_(delta)
    else:
        y.index_add_(0, rows, delta)


def _thin_batch(meta: LoRAMeta) -> bool:
    """Many slots, few tokens each (decode-like): per-token gathering beats the per-slot loop."""
    n_slots = len(meta.slot_tokens)
    return n_slots > 1 and meta.num_tokens <= TOKENS_PER_SLOT_FOR_TOKEN_GATHER * n_slots


class TorchLoRABackend(LoRABackend):
    """Reference-grade and CPU-fast: torch.mm on slices, index_select / index_add_ for the gathers."""

    name = "torch"

    def __init__(self) -> None:
        # Rank groups of the current forward's meta, per distinct rank pattern (layers of one forward share
        # the meta; different target sets give a few patterns). Keyed by id(meta); the entry keeps the meta
        # itself so a recycled id can never match, and a new meta drops the old entries.
        self._groups: dict[tuple[int, tuple[int, ...]], tuple[LoRAMeta, list[RankGroup]]] = {}

    def rank_groups(self, meta: LoRAMeta, ranks: Sequence[int]) -> list[RankGroup]:
        """The batch's adapted tokens (slot >= 0, rank > 0) split by their slot's rank, built once per meta."""
        pattern = tuple(ranks[s] for s in meta.slot_tokens)
        key = (id(meta), pattern)
        hit = self._groups.get(key)
        if hit is not None and hit[0] is meta:
            return hit[1]
        groups = _rank_groups(meta, pattern)
        if len(self._groups) > 16 or any(m is not meta for m, _ in self._groups.values()):
            self._groups = {}
        self._groups[key] = (meta, groups)
        return groups

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
        if gather and _thin_batch(meta):
            for group in self.rank_groups(meta, ranks):
                _gather_rows(y, xs, a_stack, b_stack, group)
            return
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


def _rank_groups(meta: LoRAMeta, pattern: tuple[int, ...]) -> list[RankGroup]:
    """pattern[i] = rank of the i-th slot of meta.slot_tokens. One group per distinct rank > 0."""
    by_rank: dict[int, list[int]] = {}
    for slot, rank in zip(meta.slot_tokens, pattern, strict=True):
        if rank:
            by_rank.setdefault(rank, []).append(slot)
    adapted = sum(len(idx) for idx in meta.slot_tokens.values())
    if len(by_rank) == 1 and len(pattern) == len(next(iter(by_rank.values()))) and adapted == meta.num_tokens:
        return [(pattern[0], None, meta.token_slots)]  # every token, one rank: no row gather at all
    groups: list[RankGroup] = []
    for rank, slots in by_rank.items():
        rows = torch.cat([meta.slot_tokens[s] for s in slots])  # [N_r] token indices
        groups.append((rank, rows, meta.token_slots.index_select(0, rows)))
    return groups
