"""Wrap every targetable linear layer of a transformers model in MultiLoRALinear (no forked model code),
and describe each forward's adapter use to those layers once (`set_token_slots`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from loraplex.adapters.context import LoRABatchContext
from loraplex.adapters.layer import MultiLoRALinear
from loraplex.adapters.ops import LoRABatch, LoRABatchBuffers, TokenMerges, plan_groups, split_passes
from loraplex.adapters.targets import TARGET_MODULES
from loraplex.adapters.weights import AdapterWeights


@dataclass
class LoRAInjection:
    """The wrapped layers of one model (by full module name), the context they all read, and per slot the
    rank it holds for each module kind (what a step's rank bounds are computed from)."""

    layers: dict[str, MultiLoRALinear]
    context: LoRABatchContext
    num_slots: int
    max_rank: int
    buffers: LoRABatchBuffers
    slot_ranks: list[dict[str, int]] = field(init=False)
    pass_buffers: list[LoRABatchBuffers] = field(init=False)  # passes 1, 2, ... of merged steps, grown on use

    def __post_init__(self) -> None:
        self.slot_ranks = [{} for _ in range(self.num_slots)]
        self.pass_buffers = []

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """Full module name -> (in_features, out_features), for adapter validation."""
        return {name: (m.in_features, m.out_features) for name, m in self.layers.items()}

    @property
    def null_slot(self) -> int:
        """The always-zero slot that base-only tokens of a gather-form (padded decode) step point at."""
        return self.num_slots

    def load_slot(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter into `slot` of every layer; layers it does not target get zeros."""
        self._check_slot(slot)
        unknown = set(weights.modules) - set(self.layers)
        if unknown:
            raise ValueError(f"adapter targets modules the model lacks: {sorted(unknown)[:3]}")
        self.slot_ranks[slot] = {}  # a failed copy below leaves no stale ranks behind
        ranks: dict[str, int] = {}
        for name, layer in self.layers.items():
            mod = weights.modules.get(name)
            if mod is None:
                layer.clear_slot(slot)
                continue
            layer.set_slot(slot, mod.a, mod.b, mod.scale)
            ranks[layer.kind] = max(ranks.get(layer.kind, 0), mod.a.shape[0])
        self.slot_ranks[slot] = ranks

    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        self.slot_ranks[slot] = {}
        for layer in self.layers.values():
            layer.clear_slot(slot)

    def set_token_slots(self, token_slots: Sequence[int], *, gather: bool = False,
                        merges: TokenMerges | None = None) -> None:
        """Describe the next forward: the slot of each flattened token (-1 = base only), laid out once into
        the preallocated buffers every layer reads. `gather`: the static gather form (batch.py) for a
        capturable decode step, at rank bounds of the resident adapters so its shapes never depend on which
        of them the step uses; else the window / grouped form at the step's own rank bounds. A step in which
        no token uses an adapter runs no LoRA at all.

        `merges`: token -> its adapters' (slot, weight) for tokens of linear merges (adapters/merge.py); they
        add passes (batch.py `split_passes`; passes after the first take the grouped / window form even in a
        gather step, which is then not capturable: the runner runs it eagerly). Rank bounds cover every pass."""
        passes = split_passes(token_slots, merges or {})
        highest = max((s for slots, _ in passes for s in slots), default=-1)
        if highest >= self.num_slots:
            raise IndexError(f"token slot {highest} outside [-1, {self.num_slots})")
        plans = [plan_groups(slots, gather=gather and k == 0, null_slot=self.null_slot)
                 for k, (slots, _) in enumerate(passes)]
        if plans[0] is None:  # no token uses an adapter (merged tokens always do)
            self.context.set(None)
            return
        used = {s for plan in plans for s in plan.group_slots if s != self.null_slot}
        ranks = self._rank_bounds(used, gather)
        batches = [buffers.fill(slots, plan, ranks, weights)
                   for buffers, (slots, weights), plan in zip(self._buffers_for(len(passes)), passes, plans,
                                                              strict=True)]
        first = batches[0] if len(batches) == 1 else dataclasses.replace(batches[0], passes=tuple(batches[1:]))
        self.context.set(first)

    def _buffers_for(self, n_passes: int) -> list[LoRABatchBuffers]:
        """One set of buffers per pass: every pass's views stay valid through the forward."""
        while len(self.pass_buffers) < n_passes - 1:
            self.pass_buffers.append(LoRABatchBuffers(self.buffers.device, capacity=self.buffers.capacity,
                                                      staging=self.buffers.staging))
        return [self.buffers, *self.pass_buffers[: n_passes - 1]]

    def static_batch(self, token_slots: torch.Tensor, group_slots: torch.Tensor) -> LoRABatch:
        """The gather form over caller-owned device buffers, at rank bound --max-lora-rank for every kind:
        what a captured decode graph reads (each replay reads the buffers' new values, whatever adapters the
        slots hold by then). token_slots: [B] (-1 = base only); group_slots: [B] (the slot, or the null slot).
        Triton kernels stop at each slot's own rank, so the bound costs them nothing; the torch ops compute
        the zero rows past it."""
        n, device = token_slots.shape[0], token_slots.device
        rows = torch.arange(n, device=device)
        padding = torch.zeros(n, 1, dtype=torch.bool, device=device)
        ranks = {layer.kind: self.max_rank for layer in self.layers.values()}
        return LoRABatch(token_slots, rows, padding, group_slots, n, 1, ranks)

    def _rank_bounds(self, slots: set[int], gather: bool) -> dict[str, int]:
        """Per module kind, the largest rank among the step's slots; in the gather form among every loaded
        slot, rounded up to a power of two, so the shapes change only when the resident adapters do (a
        captured graph per bucket and bound, never per mix)."""
        bounds: dict[str, int] = {}
        for s in range(self.num_slots) if gather else slots:  # the step's slots (never the null slot here)
            for kind, rank in self.slot_ranks[s].items():
                bounds[kind] = max(bounds.get(kind, 0), rank)
        if gather:
            bounds = {kind: min(self.max_rank, 1 << (rank - 1).bit_length()) for kind, rank in bounds.items()}
        return bounds

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} outside [0, {self.num_slots})")


def inject_multi_lora(
    model: nn.Module,
    *,
    num_slots: int,
    max_rank: int,
    dtype: torch.dtype,
    targets: Iterable[str] = TARGET_MODULES,
    context: LoRABatchContext | None = None,
) -> LoRAInjection:
    """Replace each targetable linear (matched by its last name component) with a MultiLoRALinear."""
    context = context or LoRABatchContext()
    wanted = set(targets)
    found = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in wanted and _is_linear(m)]
    layers: dict[str, MultiLoRALinear] = {}
    for name, module in found:
        kind = name.rsplit(".", 1)[-1]
        wrapped = MultiLoRALinear(module, kind=kind, num_slots=num_slots, max_rank=max_rank, context=context,
                                  dtype=dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
        layers[name] = wrapped
    if not layers:
        raise ValueError(f"no targetable linear layers ({sorted(wanted)}) found in the model")
    device = next(iter(layers.values())).lora_a.device
    return LoRAInjection(layers, context, num_slots, max_rank, LoRABatchBuffers(device))


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear, so this covers quantized bases too.
    return isinstance(module, nn.Linear)
