"""Plain-torch LoRA backend: one matmul per segment (SGMV) or per slot (BGMV), at each adapter's own rank.

Works on any device torch runs on; it is the CPU backend and the fallback elsewhere. No host syncs:
the loops walk meta's host-side segments / slot_tokens and the host-side `ranks` list only.
Shapes as in `base.py`: x [T, in], h [T, R], y [T, out], a_stack [S, R, in], b_stack [S, out, R].

The fused `apply` has a third path for thin batches (several slots, few tokens each: a decode step of
distinct adapters has one token per slot), where a loop of small per-slot matmuls costs mostly op overhead.
Per distinct rank it runs one `bmm` pair instead, in one of two ways:
  window: the tokens' slots lie densely in one range [lo, lo + W): place each token in a zero-padded
          [W, depth, in] buffer by slot and bmm against the stack slices A[lo:lo+W], B[lo:lo+W] as they lie
          in memory (no copy of A/B). Rows of other slots in the range are computed but never added.
  gather: otherwise, copy each token's own A[s, :r] and B[s, :, :r] (index_select) and bmm those.
Measured on bench-small shapes (in 576, out 192..1536, rank 16, 16 tokens on 16 slots, 1 CPU thread), per
decoder layer of all 7 projections: per-slot loop 2.76 ms, gather 1.22 ms, window 0.83 ms (base 2.03 ms).
With 1 slot x 16 tokens the plain per-slot path (two matmuls) is far cheaper, hence the thinness test.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loraplex.adapters.ops.base import LoRABackend
from loraplex.adapters.ops.meta import LoRAMeta

# `apply` takes the thin path when the batch has more than one slot and at most this many tokens per slot.
THIN_TOKENS_PER_SLOT = 4
# Buffer rows a thin layout may compute per real token (empty slots in a range / padding to the deepest
# slot are waste): reading a dense stack range in place, or gathering the distinct slots once each.
WINDOW_SLACK = 2
COMPACT_SLACK = 4


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


def _add_rows(y: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor) -> None:
    """y[rows] += delta [N, out] (rows None: all T rows in order), in y's dtype."""
    if rows is None:
        y.add_(delta.to(y.dtype))
    else:
        y.index_add_(0, rows, delta.to(y.dtype))


@dataclass(frozen=True)
class _Gather:
    """Adapted tokens of one rank: rows [N] token indices (None: all T, in order), slots [N] their slots."""

    rank: int
    rows: torch.Tensor | None
    slots: torch.Tensor

    def apply(self, y: torch.Tensor, xs: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor) -> None:
        """y[rows] += B[slot_t, :, :r] @ (A[slot_t, :r] @ xs[t]); copies only A[s, :r] / B[s, :, :r]."""
        x_rows = xs if self.rows is None else xs.index_select(0, self.rows)  # [N, in]
        a = a_stack[:, : self.rank].index_select(0, self.slots)  # [N, r, in]
        b = b_stack[:, :, : self.rank].index_select(0, self.slots)  # [N, out, r]
        h = torch.bmm(x_rows.unsqueeze(1), a.transpose(1, 2))  # [N, 1, r]
        _add_rows(y, self.rows, torch.bmm(h, b.transpose(1, 2)).squeeze(1))


@dataclass(frozen=True)
class _Window:
    """Adapted tokens of one rank laid out by slot: `width` slots, at most `depth` tokens each.

    slots None: the slots are the stack range [lo, lo + width), read in place (no copy of A/B); rows of
    other slots in that range are computed from zero inputs and never added. Otherwise `slots` [width]
    lists the distinct slots and their A[s, :r] / B[s, :, :r] are gathered once each (not once per token).
    place [N]: each token's row in the [width * depth] buffer: (index of its slot) * depth + k, k-th token.
    """

    rank: int
    rows: torch.Tensor | None
    lo: int
    width: int
    depth: int
    place: torch.Tensor
    slots: torch.Tensor | None = None

    def stacks(self, a_stack: torch.Tensor, b_stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A [width, r, in] and B [width, out, r] of the window's slots."""
        a, b = a_stack[:, : self.rank], b_stack[:, :, : self.rank]
        if self.slots is None:
            return a[self.lo : self.lo + self.width], b[self.lo : self.lo + self.width]
        return a.index_select(0, self.slots), b.index_select(0, self.slots)

    def apply(self, y: torch.Tensor, xs: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor) -> None:
        """One bmm pair over [width, depth] token rows; only the real tokens' rows are added into y."""
        a, b = self.stacks(a_stack, b_stack)
        x_rows = xs if self.rows is None else xs.index_select(0, self.rows)  # [N, in]
        buf = xs.new_zeros(self.width * self.depth, xs.shape[1]).index_copy_(0, self.place, x_rows)
        h = torch.bmm(buf.view(self.width, self.depth, -1), a.transpose(1, 2))  # [width, depth, r]
        out = torch.bmm(h, b.transpose(1, 2))  # [width, depth, out]
        _add_rows(y, self.rows, out.view(self.width * self.depth, -1).index_select(0, self.place))


def _is_thin(meta: LoRAMeta) -> bool:
    """Many slots, few tokens each (decode-like): the thin path beats the per-slot loop."""
    n_slots = len(meta.slot_tokens)
    return n_slots > 1 and meta.num_tokens <= THIN_TOKENS_PER_SLOT * n_slots


def _thin_plan(meta: LoRAMeta, ranks: Sequence[int]) -> list[_Gather | _Window]:
    """One group per distinct rank > 0, from meta's host-side segments (token order kept)."""
    per_rank: dict[int, tuple[list[int], list[int]]] = {}  # rank -> (token rows, their slots)
    for start, end, slot in meta.segments:
        if rank := ranks[slot]:
            rows, slots = per_rank.setdefault(rank, ([], []))
            rows.extend(range(start, end))
            slots.extend([slot] * (end - start))
    return [_thin_group(meta, rank, rows, slots) for rank, (rows, slots) in per_rank.items()]


def _thin_group(meta: LoRAMeta, rank: int, rows: list[int], slots: list[int]) -> _Gather | _Window:
    """Cheapest layout for one rank's tokens: the stack range in place, the distinct slots gathered once
    each, or (when one slot holds most tokens and padding to its depth would dominate) per-token gathers."""
    device = meta.token_slots.device
    rows_t = None if len(rows) == meta.num_tokens else torch.tensor(rows, dtype=torch.long, device=device)
    counts = Counter(slots)
    distinct, depth = sorted(counts), max(counts.values())
    lo, width = distinct[0], distinct[-1] + 1 - distinct[0]
    if width * depth <= WINDOW_SLACK * len(rows):  # dense range: read the stacks in place
        return _Window(rank, rows_t, lo, width, depth, _places(slots, lambda s: s - lo, depth, device))
    if len(distinct) * depth <= COMPACT_SLACK * len(rows):
        index = {s: i for i, s in enumerate(distinct)}
        slots_t = torch.tensor(distinct, dtype=torch.long, device=device)
        return _Window(rank, rows_t, lo, len(distinct), depth, _places(slots, index.__getitem__, depth, device),
                       slots_t)
    return _Gather(rank, rows_t, torch.tensor(slots, dtype=torch.long, device=device))


def _places(slots: list[int], column: Callable[[int], int], depth: int, device: torch.device) -> torch.Tensor:
    """[N] buffer row of each token: column(slot) * depth + (how many earlier tokens had that slot)."""
    seen: Counter[int] = Counter()
    place = []
    for slot in slots:
        place.append(column(slot) * depth + seen[slot])
        seen[slot] += 1
    return torch.tensor(place, dtype=torch.long, device=device)


class TorchLoRABackend(LoRABackend):
    """Reference-grade and CPU-fast: torch.mm on slices, index_select / index_add_ for the gathers."""

    name = "torch"

    def __init__(self) -> None:
        # Thin plans of the current forward's meta, per rank pattern (the layers of one forward share the
        # meta; target sets give a few patterns). Keyed by id(meta); an entry keeps its meta so a recycled id
        # never matches, and a new meta drops the old entries.
        self._plans: dict[tuple[int, tuple[int, ...]], tuple[LoRAMeta, list[_Gather | _Window]]] = {}

    def thin_plan(self, meta: LoRAMeta, ranks: Sequence[int]) -> list[_Gather | _Window]:
        """The thin path's groups for this meta and these ranks, built once per forward."""
        key = (id(meta), tuple(ranks[s] for s in meta.slot_tokens))
        hit = self._plans.get(key)
        if hit is not None and hit[0] is meta:
            return hit[1]
        plan = _thin_plan(meta, ranks)
        if len(self._plans) > 16 or any(m is not meta for m, _ in self._plans.values()):
            self._plans = {}
        self._plans[key] = (meta, plan)
        return plan

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
        """Fused per segment / per slot: the [n, rank] intermediate never lands in a [T, R] buffer.

        Thin batches (several slots, <= THIN_TOKENS_PER_SLOT tokens each) take the window / gather bmm
        under either variant: a decode step of distinct adapters has one segment per slot, so `gather` is
        False there, yet a loop over 16 one-token segments is what costs the most.
        """
        xs = x.to(a_stack.dtype)
        if _is_thin(meta):
            for group in self.thin_plan(meta, ranks):
                group.apply(y, xs, a_stack, b_stack)
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

