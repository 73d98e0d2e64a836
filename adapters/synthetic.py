"""Seeded random PEFT LoRA adapters, written with PEFT's own `save_pretrained` (tests and benchmarks).

The adapter is built by `peft.get_peft_model(..., LoraConfig(init_lora_weights=False))` on a *meta-device
skeleton* of the base model: only the LoRA A/B weights are materialised. That leaves the caller's model
untouched and costs no copy of the base weights (a deep copy of bench-small plus PEFT injection takes ~4 s
per adapter on 2 cores; the skeleton ~0.5 s), which matters when a benchmark writes 1000 adapters.

Init: exactly what `init_lora_weights=False` leaves in place, nn.Linear's default (kaiming-uniform,
a=sqrt(5)): A ~ U(±1/sqrt(in)), B ~ U(±1/sqrt(r)). With alpha = 2r the update's per-output std is about
2|x| / (3 sqrt(in)), e.g. ~0.08|x| for in=64 against ~0.2|x| from the tiny models' base weights
(initializer_range 0.2): adapters change greedy outputs visibly, stay finite, and no rescale is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from loraplex.adapters.targets import ATTENTION_TARGETS, TARGET_MODULES


@dataclass(frozen=True)
class AdapterPreset:
    """One benchmark adapter shape (BENCHMARK.md)."""

    rank: int
    target_modules: tuple[str, ...]


PRESETS: dict[str, AdapterPreset] = {
    "S1": AdapterPreset(rank=8, target_modules=ATTENTION_TARGETS),
    "P": AdapterPreset(rank=16, target_modules=TARGET_MODULES),  # Punica's setting
}
# S2 draws each adapter's rank uniformly from these, on ATTENTION_TARGETS.
S2_RANKS = (8, 16, 32, 64)


def make_peft_adapter(
    base: Path | PreTrainedModel,
    out_dir: Path,
    *,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = ATTENTION_TARGETS,
    seed: int = 0,
    use_rslora: bool = False,
) -> Path:
    """Write a seeded random LoRA adapter for `base` (a model dir or a model) into `out_dir`.

    `alpha` defaults to 2 * rank. Same arguments → byte-identical tensors.
    """
    config = _base_config(base)
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        use_rslora=use_rslora,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    peft_model = get_peft_model(skeleton, lora_config)
    _materialise_lora_weights(peft_model, seed)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _base_config(base: Path | PreTrainedModel) -> PretrainedConfig:
    if isinstance(base, PreTrainedModel):
        return base.config
    # local_files_only, no remote code: the same rules as the server's loader.
    return AutoConfig.from_pretrained(Path(base), local_files_only=True, trust_remote_code=False)


def _materialise_lora_weights(peft_model: PeftModel, seed: int) -> None:
    """Allocate A [r, in] and B [out, r] on CPU with nn.Linear's default init, seeded, in module order."""
    # fork_rng: seed without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter in module.lora_A:
                for linear in (module.lora_A[adapter], module.lora_B[adapter]):
                    linear.to_empty(device="cpu")
                    linear.reset_parameters()
