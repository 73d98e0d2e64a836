"""Seeded random PEFT LoRA adapters, written with PEFT's own `save_pretrained` (tests and benchmarks).

The adapter is built by `peft.get_peft_model(..., LoraConfig(init_lora_weights=False))` on a *meta-device
skeleton* of the base model: only the LoRA A/B weights are materialised. That leaves the caller's model
untouched and costs no copy of the base weights (a deep copy of bench-small plus PEFT injection takes ~4 s
per adapter on 2 cores; the skeleton ~0.5 s), which matters when a benchmark writes 1000 adapters.

Init: exactly what `init_lora_weights=False` leaves in place, nn.Linear's default (kaiming-uniform,
a=sqrt(5)): A ~ U(±1/sqrt(in)), B ~ U(±1/sqrt(r)). With alpha = 2r the update's per-output std is about
2|x| / (3 sqrt(in)), e.g. ~0.08|x| for in=64 against ~0.2|x| from the tiny models' base weights
(initializer_range 0.2): adapters change greedy outputs visibly, stay finite, and no rescale is needed.

DoRA (`use_dora`) and LoRA on the embedding or lm_head need the real base weights: DoRA's magnitude is
||W + s B A|| of the real W (then scaled per channel by a seeded U(0.7, 1.3), as training would move it: a
factor g = m / ||W + s B A|| of 1 would hide DoRA's effect), and PEFT saves copies of the embedding layers'
base weights beside an embedding adapter. Those adapters are built on a copy of the real model instead of the
skeleton. The embedding's A ~ N(0, 0.1^2) [r, vocab] and B ~ U(±1/sqrt(r)) [dim, r] (PEFT's own random init
is N(0, 1), far larger than the tiny models' embeddings).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from loraplex.adapters.targets import ATTENTION_TARGETS, EMBEDDING_TARGET, HEAD_TARGET, TARGET_MODULES


@dataclass(frozen=True)
class AdapterPreset:
    """One benchmark adapter shape (BENCHMARK.md)."""

    rank: int
    target_modules: tuple[str, ...]
    use_dora: bool = False


PRESETS: dict[str, AdapterPreset] = {
    "S1": AdapterPreset(rank=8, target_modules=ATTENTION_TARGETS),
    "P": AdapterPreset(rank=16, target_modules=TARGET_MODULES),  # Punica's setting
    "D": AdapterPreset(rank=16, target_modules=TARGET_MODULES, use_dora=True),  # P as DoRA (issue 26)
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
    use_dora: bool = False,
    ensure_weight_tying: bool = False,
) -> Path:
    """Write a seeded random LoRA adapter for `base` (a model dir or a model) into `out_dir`.

    `alpha` defaults to 2 * rank. Same arguments → byte-identical tensors. `target_modules` may name
    "embed_tokens" and "lm_head"; `use_dora` writes a DoRA adapter (module docstring).
    """
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        use_rslora=use_rslora,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        use_dora=use_dora,
        ensure_weight_tying=ensure_weight_tying,
    )
    real = use_dora or bool({EMBEDDING_TARGET, HEAD_TARGET} & set(target_modules))
    peft_model = get_peft_model(_real_copy(base) if real else _skeleton(base), lora_config)
    _materialise_lora_weights(peft_model, seed, allocate=not real)
    if use_dora:
        _materialise_magnitudes(peft_model, seed)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _skeleton(base: Path | PreTrainedModel) -> PreTrainedModel:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_base_config(base), dtype=torch.float32)


def _real_copy(base: Path | PreTrainedModel) -> PreTrainedModel:
    """The base model with its weights (fp32), never the caller's own object (PEFT injects into it)."""
    if isinstance(base, PreTrainedModel):
        return copy.deepcopy(base)
    return AutoModelForCausalLM.from_pretrained(Path(base), dtype=torch.float32, local_files_only=True,
                                                trust_remote_code=False)


def _base_config(base: Path | PreTrainedModel) -> PretrainedConfig:
    if isinstance(base, PreTrainedModel):
        return base.config
    # local_files_only, no remote code: the same rules as the server's loader.
    return AutoConfig.from_pretrained(Path(base), local_files_only=True, trust_remote_code=False)


def _materialise_lora_weights(peft_model: PeftModel, seed: int, *, allocate: bool = True) -> None:
    """Allocate (on a skeleton) A [r, in] and B [out, r] on CPU with nn.Linear's default init, seeded, in module
    order; then the embeddings' A [r, vocab] and B [dim, r], in place (a lm_head tied to the embedding by
    ensure_weight_tying shares their storage, so it follows)."""
    # fork_rng: seed without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        for module in layers:
            for adapter in module.lora_A:
                for linear in (module.lora_A[adapter], module.lora_B[adapter]):
                    if allocate:
                        linear.to_empty(device="cpu")
                    linear.reset_parameters()
        for module in layers:
            for adapter in module.lora_embedding_A:
                a, b = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
                a.copy_(torch.randn(a.shape) * 0.1)
                b.copy_((torch.rand(b.shape) * 2 - 1) / b.shape[1] ** 0.5)


def _materialise_magnitudes(peft_model: PeftModel, seed: int) -> None:
    """DoRA's magnitude m = ||W + s B A|| per channel (PEFT's own DoRA init, over the final A and B) times a
    seeded U(0.7, 1.3): a trained-looking magnitude whose factor g = m / ||W + s B A|| is not 1."""
    gen = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer) or module.lora_magnitude_vector is None:
                continue
            for adapter, dora in module.lora_magnitude_vector.items():
                if adapter in module.lora_embedding_A:
                    a, b = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
                else:
                    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                dora.update_layer(base_layer=module.get_base_layer(), lora_A=a, lora_B=b,
                                  scaling=module.scaling[adapter])
                dora.weight.mul_(torch.empty(dora.weight.shape).uniform_(0.7, 1.3, generator=gen))
