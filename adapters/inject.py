"""Wrap every targetable linear layer of a transformers model in MultiLoRALinear (no forked model code)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from loraplex.adapters.context import LoRABatchContext
from loraplex.adapters.layer import MultiLoRALinear
from loraplex.adapters.weights import AdapterWeights

# Projection names of the Llama / Mistral / Qwen2 / Qwen3 decoder layers.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAInjection:
    """The wrapped layers of one model (by full module name) and the context they all read."""

    layers: dict[str, MultiLoRALinear]
    context: LoRABatchContext
    num_slots: int
    max_rank: int

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """Full module name -> (in_features, out_features), for adapter validation."""
        return {name: (m.in_features, m.out_features) for name, m in self.layers.items()}

    def load_slot(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter into `slot` of every layer; layers it does not target get rank 0."""
        self._check_slot(slot)
        unknown = set(weights.modules) - set(self.layers)
        if unknown:
            raise ValueError(f"adapter targets modules the model lacks: {sorted(unknown)[:3]}")
        for name, layer in self.layers.items():
            mod = weights.modules.get(name)
            if mod is None:
                layer.clear_slot(slot)
            else:
                layer.set_slot(slot, mod.a.to(layer.lora_a.dtype), mod.b.to(layer.lora_b.dtype), mod.scale)

    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        for layer in self.layers.values():
            layer.clear_slot(slot)

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
        wrapped = MultiLoRALinear(module, num_slots=num_slots, max_rank=max_rank, context=context, dtype=dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
        layers[name] = wrapped
    if not layers:
        raise ValueError(f"no targetable linear layers ({sorted(wanted)}) found in the model")
    return LoRAInjection(layers, context, num_slots, max_rank)


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear, so this covers quantized bases too.
    return isinstance(module, nn.Linear)
