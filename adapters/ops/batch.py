"""The per-step LoRA batch description: which adapter slot each token uses, laid out for one batched call.

The runner describes each forward once (`plan_groups`, host side) and writes the description into
preallocated device buffers (`LoRABatchBuffers`); every wrapped linear of that forward reads the same
`LoRABatch` and plans nothing.

Layout: the tokens that use an adapter are placed in a grid of G groups x D rows. Each group holds tokens of
one slot, so a wrapped linear gathers G adapters' A/B once and runs one bmm pair over the grid, whatever the
mix (the op sequence never depends on how many adapters or segments the step holds):
  gather form  (G = T tokens, D = 1): every token is its own group, base-only tokens use the null slot (all
               zeros). Shapes depend on T alone (and the resident adapters' rank bounds), so a decode step
               padded to a batch bucket has the same shapes and ops for any of them: what a CUDA graph needs.
  window form  (eager steps whose U slots form a dense range [lo, lo + U)): one group per slot, D = its most
               tokens; layers bmm against the stack range in place, no gather of A/B (the gathers are most of
               the op's memory traffic on a CPU).
  grouped form (other eager steps): one group per slot too (each adapter gathered once) while U*D stays
               within COMPACT_SLACK x the N adapted tokens; else D = ceil(N / U) and a slot with n tokens takes
               ceil(n / D) groups, so G <= 2U and G*D <= 2N + U (a long prefill beside short decodes).
  Either way G*D <= max(COMPACT_SLACK * N, 2N + U) and G <= 2U.
Padding rows (a group shorter than D) repeat their group's first token marked as padding: the op zeroes
their input, so they add exactly zero into that token (even a NaN adapter pollutes only its own token).

Merged tokens (adapters/merge.py, a linear merge: one token, several slots, weighted) run as extra passes of
the same op (`split_passes`): pass 0 is the step as above, a merged token in it taking its first adapter's
slot; pass k >= 1 covers only the tokens merging more than k adapters, with their (k+1)-th slot, in the
grouped / window form. A pass with merged tokens carries per-row weights that scale each row's delta (1.0 on
the other rows of pass 0: an exact product). Each pass holds a token at most once, so the triton kernels
keep their one-writer-per-token rule; the passes of a step run one after the other. A step without merged
tokens has one pass and no weights: exactly the op it had before merging existed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from loraplex.adapters.ops.staging import HostStaging

# One group per slot while that pads the grid to at most this many rows per adapted token: a padding row
# costs a few MACs per rank, gathering an adapter's A/B again costs copying them (the dearer, measured by
# bench_lora_ops.py), so splitting a deep slot pays only when the padding would be large (a long prefill).
COMPACT_SLACK = 4

# A linear merge per flattened token: token -> its adapters' (slot, weight), in recipe order.
TokenMerges = Mapping[int, Sequence[tuple[int, float]]]
# One pass of the op: per token its slot (-1: not in this pass) and weight (None: all 1, no merged token).
PassSlots = tuple[list[int], list[float] | None]


@dataclass(frozen=True)
class GroupPlan:
    """Host-side grid layout: row r computes token rows[r] (valid[r] False: padding) with slot
    group_slots[r // depth]. window_lo: the groups are exactly the stack slots [lo, lo + G) in order, one
    group per slot, so layers read A/B in place (a view) instead of gathering them (None: gather)."""

    rows: list[int]
    valid: list[bool]
    group_slots: list[int]
    depth: int
    window_lo: int | None = None


def plan_groups(token_slots: Sequence[int], *, gather: bool, null_slot: int) -> GroupPlan | None:
    """The grid for one forward's per-token slots (-1 = base only); None when no token uses an adapter."""
    if all(s < 0 for s in token_slots):
        return None
    if gather:
        n = len(token_slots)
        return GroupPlan(list(range(n)), [True] * n, [s if s >= 0 else null_slot for s in token_slots], 1)
    per_slot: dict[int, list[int]] = {}
    for t, s in enumerate(token_slots):
        if s >= 0:
            per_slot.setdefault(s, []).append(t)
    per_slot = dict(sorted(per_slot.items()))
    adapted = sum(map(len, per_slot.values()))
    deepest = max(map(len, per_slot.values()))
    lo, hi = next(iter(per_slot)), next(reversed(per_slot))
    if len(per_slot) * deepest <= COMPACT_SLACK * adapted:  # one group per slot: each adapter taken once
        return _grid(per_slot, deepest, lo if hi - lo + 1 == len(per_slot) else None)
    return _grid(per_slot, math.ceil(adapted / len(per_slot)), None)


def split_passes(token_slots: Sequence[int], merges: TokenMerges) -> list[PassSlots]:
    """The passes of a step (module docstring): pass 0 is `token_slots` with each merged token on its first
    adapter's slot and weight (its `token_slots` entry is not read), pass k >= 1 the (k+1)-th adapters."""
    if not merges:
        return [(list(token_slots), None)]
    if not all(merges.values()):
        raise ValueError("a merged token needs at least one (slot, weight)")
    n, depth = len(token_slots), max(map(len, merges.values()))
    slots = [list(token_slots)] + [[-1] * n for _ in range(depth - 1)]
    weights = [[1.0] * n] + [[0.0] * n for _ in range(depth - 1)]  # 0.0: tokens a pass skips (never read)
    for t, pairs in merges.items():
        for k, (slot, weight) in enumerate(pairs):
            slots[k][t], weights[k][t] = slot, float(weight)
    return list(zip(slots, weights, strict=True))


def _grid(per_slot: dict[int, list[int]], depth: int, window_lo: int | None) -> GroupPlan:
    """Each slot's tokens in groups of `depth` rows, padding rows repeating the group's first token."""
    rows: list[int] = []
    valid: list[bool] = []
    groups: list[int] = []
    for slot, tokens in per_slot.items():
        for start in range(0, len(tokens), depth):
            chunk = tokens[start : start + depth]
            pad = depth - len(chunk)
            rows += chunk + [chunk[0]] * pad
            valid += [True] * len(chunk) + [False] * pad
            groups.append(slot)
    return GroupPlan(rows, valid, groups, depth, window_lo)


@dataclass(frozen=True)
class LoRABatch:
    """One forward's LoRA description, read by every wrapped linear (views of preallocated buffers).

    token_slots: [T] int64, the slot of each flattened token (-1 = base only); the reference loop reads it.
    rows:        [G*D] int64, the token each grid row computes.
    padding:     [G*D, 1] bool, True on padding rows.
    group_slots: [G] int64, the slot of each group.
    ranks:       rank bound per module kind ("q_proj", ...) for this step: the largest rank any slot of the
                 step holds for that kind (0: no adapter of the step targets it, so those layers skip LoRA).
                 A slot's A/B are zero past its own rank, so computing at a larger bound adds exact zeros.
    row_weights: [G*D] fp32, each grid row's delta is multiplied by it (merged tokens); None: no scaling.
    passes:      the step's further passes (linear merges), run after this one over the same x and y; they
                 share `ranks` (the bound over every pass's slots).
    """

    token_slots: torch.Tensor
    rows: torch.Tensor
    padding: torch.Tensor
    group_slots: torch.Tensor
    num_groups: int
    depth: int
    ranks: Mapping[str, int]
    window_lo: int | None = None  # the groups are the stack slots [lo, lo + G): read in place
    row_weights: torch.Tensor | None = None
    passes: tuple[LoRABatch, ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]


class LoRABatchBuffers:
    """Preallocated device buffers the runner fills each step; a LoRABatch is views of them, so a captured
    graph that read them reads the next step's values from the same addresses. They grow (reallocate) only
    when a step needs more rows than any step before it."""

    def __init__(self, device: torch.device, capacity: int = 256, staging: HostStaging | None = None) -> None:
        self.device = device
        self.staging = staging or HostStaging(device)  # the step's page-locked host buffer (shared per engine)
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self._token_slots = torch.full((capacity,), -1, dtype=torch.long, device=self.device)
        self._rows = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self._padding = torch.zeros(capacity, 1, dtype=torch.bool, device=self.device)
        self._groups = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self._weights = torch.ones(capacity, dtype=torch.float32, device=self.device)

    def fill(self, token_slots: Sequence[int], plan: GroupPlan, ranks: Mapping[str, int],
             token_weights: Sequence[float] | None = None) -> LoRABatch:
        """Copy one pass's description into the buffers (host -> device, no sync) and return views of it.
        token_weights: [T] per token (merged steps), laid out per grid row; None: no row weights."""
        need = max(len(token_slots), len(plan.rows))
        if need > self.capacity:
            self._alloc(max(need, 2 * self.capacity))
        n, g = len(plan.rows), len(plan.group_slots)
        write = self.staging.copy_into  # host -> device, no sync (asynchronous on CUDA)
        write(self._token_slots, list(token_slots))
        write(self._rows, plan.rows)
        write(self._padding[:, 0], [not v for v in plan.valid])
        write(self._groups, plan.group_slots)
        weights = None
        if token_weights is not None:
            write(self._weights, [token_weights[t] for t in plan.rows])
            weights = self._weights[:n]
        return LoRABatch(self._token_slots[: len(token_slots)], self._rows[:n], self._padding[:n],
                         self._groups[:g], g, plan.depth, dict(ranks), plan.window_lo, weights)
