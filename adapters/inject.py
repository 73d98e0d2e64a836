"""Wrap every targetable layer of a transformers model (no forked model code): the decoder projections and the
output projection in MultiLoRALinear, the token embedding in MultiLoRAEmbedding; and describe each forward's
adapter use to those layers once (`set_token_slots`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from loraplex.adapters.base_modules import BaseModules
from loraplex.adapters.context import LoRABatchContext
from loraplex.adapters.embedding import MultiLoRAEmbedding
from loraplex.adapters.layer import LoRASlots, MultiLoRALinear
from loraplex.adapters.ops import LoRABatch, LoRABatchBuffers, TokenMerges, plan_groups, split_passes
from loraplex.adapters.targets import TARGET_MODULES
from loraplex.adapters.weights import AdapterWeights

# What a padded decode step needs of a captured graph (cuda_graphs.py): no LoRA, LoRA, or LoRA with DoRA factors.
LORA, DORA = "lora", "dora"


class _PassBuffers:
    """One set of preallocated buffers per pass of the op: every pass's views stay valid through the forward."""

    def __init__(self, first: LoRABatchBuffers) -> None:
        self.first = first
        self.more: list[LoRABatchBuffers] = []  # passes 1, 2, ... of merged steps, grown on use

    def take(self, n_passes: int) -> list[LoRABatchBuffers]:
        while len(self.more) < n_passes - 1:  # every pass stages through the engine's one host buffer
            self.more.append(LoRABatchBuffers(self.first.device, capacity=self.first.capacity,
                                              staging=self.first.staging))
        return [self.first, *self.more[: n_passes - 1]]


@dataclass
class LoRAInjection:
    """The wrapped layers of one model (by full module name), the context they all read, and per slot the
    rank it holds for each module kind (what a step's rank bounds are computed from) and the kinds where it
    holds DoRA factors. `embedding` / `head`: the token embedding's and the output projection's names (None:
    not wrapped); `tied`: they share one weight."""

    layers: dict[str, LoRASlots]
    context: LoRABatchContext
    num_slots: int
    max_rank: int
    buffers: LoRABatchBuffers
    embedding: str | None = None
    head: str | None = None
    tied: bool = False
    slot_ranks: list[dict[str, int]] = field(init=False)
    slot_dora: list[frozenset[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.slot_ranks = [{} for _ in range(self.num_slots)]
        self.slot_dora = [frozenset() for _ in range(self.num_slots)]
        self._tokens = _PassBuffers(self.buffers)
        # the output projection's rows (logits_rows), staged through the same host buffer as the tokens'
        self._logits = _PassBuffers(LoRABatchBuffers(self.buffers.device, staging=self.buffers.staging))

    def module_shapes(self) -> BaseModules:
        """Full module name -> (in_features, out_features) of every wrapped layer (the embedding: vocabulary size,
        embedding dim), with the base weights DoRA's norm reads, for adapter validation."""
        return BaseModules({name: (m.in_features, m.out_features) for name, m in self.layers.items()},
                           embedding=self.embedding, head=self.head, tied=self.tied, weights=self.base_weight)

    def base_weight(self, name: str) -> torch.Tensor:
        """The base weight of module `name` as a linear layer's [out, in], dequantized as PEFT's DoRA does
        (bitsandbytes nf4 / int8 included), on the model's device; an embedding's E^T [dim, vocab]."""
        weight = _dequantized(self.layers[name].base_layer).detach()
        return weight.t() if name == self.embedding else weight

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
        self.slot_ranks[slot], self.slot_dora[slot] = {}, frozenset()  # a failed copy leaves no stale state behind
        ranks: dict[str, int] = {}
        dora: set[str] = set()
        for name, layer in self.layers.items():
            mod = weights.modules.get(name)
            if mod is None:
                layer.clear_slot(slot)
                continue
            layer.set_slot(slot, mod.a, mod.b, mod.scale, mod.dora)
            ranks[layer.kind] = max(ranks.get(layer.kind, 0), mod.a.shape[0])
            if mod.dora is not None:
                dora.add(layer.kind)
        self.slot_ranks[slot], self.slot_dora[slot] = ranks, frozenset(dora)

    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        self.slot_ranks[slot], self.slot_dora[slot] = {}, frozenset()
        for layer in self.layers.values():
            layer.clear_slot(slot)

    def step_mode(self, token_slots: Iterable[int]) -> str | None:
        """What a step with these token slots needs (a captured decode graph per answer): None (base only),
        LORA, or DORA (a token of a DoRA adapter: its layers apply DoRA's factors)."""
        used = {s for s in token_slots if s >= 0}
        if not used:
            return None
        return DORA if any(self.slot_dora[s] for s in used if s < self.num_slots) else LORA

    def set_token_slots(self, token_slots: Sequence[int], *, gather: bool = False,
                        merges: TokenMerges | None = None, logits_rows: Sequence[int] | None = None) -> None:
        """Describe the next forward: the slot of each flattened token (-1 = base only), laid out once into
        the preallocated buffers every layer reads. `gather`: the static gather form (batch.py) for a
        capturable decode step, at rank bounds of the resident adapters so its shapes never depend on which
        of them the step uses; else the window / grouped form at the step's own rank bounds. A step in which
        no token uses an adapter runs no LoRA at all.

        `merges`: token -> its adapters' (slot, weight) for tokens of linear merges (adapters/merge.py); they
        add passes (batch.py `split_passes`; passes after the first take the grouped / window form even in a
        gather step, which is then not capturable: the runner runs it eagerly). Rank bounds cover every pass.
        `logits_rows`: the flattened tokens the output projection sees (the model's `logits_to_keep`), in its
        order; None: every token. They get their own description when an adapter of the step targets lm_head."""
        merges = merges or {}
        batch = self._describe(token_slots, merges, gather, self._tokens)
        logits = batch
        if batch is not None and logits_rows is not None and self.head is not None \
                and batch.ranks.get(self.layers[self.head].kind):
            rows = list(logits_rows)
            logits = self._describe([token_slots[r] for r in rows],
                                    {i: merges[r] for i, r in enumerate(rows) if r in merges}, False, self._logits)
        self.context.set(batch, logits)

    def _describe(self, token_slots: Sequence[int], merges: TokenMerges, gather: bool,
                  buffers: _PassBuffers) -> LoRABatch | None:
        """One description (its passes) of `token_slots`, into `buffers`; None when no token uses an adapter."""
        passes = split_passes(token_slots, merges)
        highest = max((s for slots, _ in passes for s in slots), default=-1)
        if highest >= self.num_slots:
            raise IndexError(f"token slot {highest} outside [-1, {self.num_slots})")
        plans = [plan_groups(slots, gather=gather and k == 0, null_slot=self.null_slot)
                 for k, (slots, _) in enumerate(passes)]
        if plans[0] is None:  # no token uses an adapter (merged tokens always do)
            return None
        used = {s for plan in plans for s in plan.group_slots if s != self.null_slot}
        dora = self._dora_kinds(plans[0].group_slots, merges)
        ranks = self._rank_bounds(used, gather)
        batches = [buf.fill(slots, plan, ranks, weights, dora_kinds=dora if k == 0 else frozenset(),
                            null_slot=self.null_slot)
                   for k, (buf, (slots, weights), plan) in enumerate(zip(buffers.take(len(passes)), passes, plans,
                                                                         strict=True))]
        return batches[0] if len(batches) == 1 else dataclasses.replace(batches[0], passes=tuple(batches[1:]))

    def _dora_kinds(self, first_pass: Iterable[int], merges: TokenMerges) -> frozenset[str]:
        """The kinds a DoRA slot of the first pass targets. DoRA adapters are never merged (refused before:
        merges keep no magnitude vectors), and a later pass could not apply their factors: refuse it here too."""
        kinds = frozenset(k for s in set(first_pass) if s != self.null_slot for k in self.slot_dora[s])
        if kinds and any(self.slot_dora[s] for pairs in merges.values() for s, _ in pairs):
            raise ValueError("a DoRA adapter cannot be part of a merge")
        return kinds

    def static_batch(self, token_slots: torch.Tensor, group_slots: torch.Tensor, *, dora: bool = False) -> LoRABatch:
        """The gather form over caller-owned device buffers, at rank bound --max-lora-rank for every kind:
        what a captured decode graph reads (each replay reads the buffers' new values, whatever adapters the
        slots hold by then). token_slots: [B] (-1 = base only); group_slots: [B] (the slot, or the null slot).
        Triton kernels stop at each slot's own rank, so the bound costs them nothing; the torch ops compute
        the zero rows past it. `dora`: every layer applies its DoRA factors (a graph for steps with a DoRA row;
        the factors of other slots are 1 and 0), each token's factors read at its group's slot."""
        n, device = token_slots.shape[0], token_slots.device
        rows = torch.arange(n, device=device)
        padding = torch.zeros(n, 1, dtype=torch.bool, device=device)
        kinds = frozenset(layer.kind for layer in self.layers.values())
        ranks = dict.fromkeys(kinds, self.max_rank)
        return LoRABatch(token_slots, rows, padding, group_slots, n, 1, ranks,
                         dora_kinds=kinds if dora else frozenset(), scale_slots=group_slots if dora else None)

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
    embeddings: bool = True,
) -> LoRAInjection:
    """Replace each targetable linear (matched by its last name component) with a MultiLoRALinear; with
    `embeddings`, also the model's input embedding (MultiLoRAEmbedding) and output projection (lm_head)."""
    context = context or LoRABatchContext()
    wanted = set(targets)
    found = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in wanted and _is_linear(m)]
    roles = _embedding_roles(model) if embeddings else {}
    found += [(n, m) for n, m in model.named_modules() if n in roles]
    layers: dict[str, LoRASlots] = {}
    for name, module in found:
        kind = name.rsplit(".", 1)[-1]
        common = {"kind": kind, "num_slots": num_slots, "max_rank": max_rank, "context": context, "dtype": dtype}
        wrapped: LoRASlots = (MultiLoRAEmbedding(module, **common) if roles.get(name) == "embedding"
                              else MultiLoRALinear(module, logits=roles.get(name) == "head", **common))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
        layers[name] = wrapped
    if not layers:
        raise ValueError(f"no targetable linear layers ({sorted(wanted)}) found in the model")
    device = next(iter(layers.values())).lora_a.device
    names = {role: name for name, role in roles.items()}
    return LoRAInjection(layers, context, num_slots, max_rank, LoRABatchBuffers(device),
                         embedding=names.get("embedding"), head=names.get("head"), tied=_tied(roles, layers))


def _embedding_roles(model: nn.Module) -> Mapping[str, str]:
    """{module name: "embedding" | "head"} for the model's input embedding (an nn.Embedding) and output
    projection (an nn.Linear), found by role as transformers reports them."""
    getters = {"embedding": getattr(model, "get_input_embeddings", None),
               "head": getattr(model, "get_output_embeddings", None)}
    wanted = {"embedding": nn.Embedding, "head": nn.Linear}
    by_id = {id(m): n for n, m in model.named_modules()}
    roles: dict[str, str] = {}
    for role, getter in getters.items():
        module = getter() if callable(getter) else None
        if isinstance(module, wanted[role]) and id(module) in by_id:
            roles[by_id[id(module)]] = role
    return roles


def _tied(roles: Mapping[str, str], layers: Mapping[str, LoRASlots]) -> bool:
    """The output projection's weight is the embedding's (tie_word_embeddings: one Parameter)."""
    names = {role: name for name, role in roles.items()}
    if len(names) != 2:
        return False
    return layers[names["embedding"]].base_layer.weight is layers[names["head"]].base_layer.weight


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as PEFT's `dequantize_bnb_weight` computes it (nf4: dequantize_4bit; int8: the rows'
    int8 values times their scales), without its side effect: PEFT stores the int8 scales into the layer's
    matmul state, which a later plain forward of that layer then trips over (seen with bitsandbytes 0.50 on the
    CPU); this runs on the loader's thread beside the engine's forwards, so it only reads."""
    weight = layer.weight
    kind = type(weight).__name__
    if kind not in ("Params4bit", "Int8Params"):
        return weight
    import bitsandbytes as bnb  # only a quantized base gets here

    if kind == "Params4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear, so this covers quantized bases too.
    return isinstance(module, nn.Linear)
