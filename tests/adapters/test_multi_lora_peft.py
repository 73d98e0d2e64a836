"""MultiLoRALinear in a mixed batch == PeftModel with each row's adapter (logits and greedy tokens)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from loraplex.adapters.inject import inject_multi_lora
from loraplex.adapters.targets import TARGET_MODULES
from loraplex.adapters.weights import load_adapter_dir
from loraplex.server.config import ModelConfig
from loraplex.server.model_loader import load_model

ALL7 = TARGET_MODULES
# (rank, targets, seed): different ranks AND different target sets in one batch.
ADAPTERS = [
    (4, ("q_proj", "v_proj"), 1),
    (8, ("q_proj", "k_proj", "v_proj", "o_proj"), 2),
    (16, ALL7, 3),
    (32, ("o_proj", "gate_proj", "up_proj", "down_proj"), 4),
]
ROW_SLOTS = [0, 1, -1, 2, 3, -1, 2, 0]  # -1 = base only
MAX_RANK = 32
STEPS = 16
# The same equivalence on CUDA (fp32, so logits still agree to 1e-4) where a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _load(model_dir, quantize, device="cpu"):
    return load_model(ModelConfig(path=model_dir, quantize=quantize, device=device, dtype="float32"))


def _ours(model_dir, dirs, quantize, device="cpu"):
    loaded = _load(model_dir, quantize, device)
    inj = inject_multi_lora(loaded.model, num_slots=len(dirs), max_rank=MAX_RANK, dtype=torch.float32)
    for slot, d in enumerate(dirs):
        inj.load_slot(slot, load_adapter_dir(d, inj.module_shapes(), max_rank=MAX_RANK))
    _bind_rows(loaded.model, inj, ROW_SLOTS)
    return loaded.model


def _bind_rows(model, inj, row_slots):
    """Before each forward of an HF-style [B, L] batch (generate calls forward with L = prompt, then 1),
    describe it to the LoRA layers once: row b's slot for each of its L tokens, as the runner does per step."""

    def describe(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        length = ids.shape[1]
        inj.set_token_slots([s for s in row_slots for _ in range(length)])

    model._lora_injection = inj
    model._lora_rows_hook = model.register_forward_pre_hook(describe, with_kwargs=True)


def _reference(model_dir, dirs, quantize, device="cpu"):
    base = _load(model_dir, quantize, device).model
    peft = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        peft.load_adapter(str(d), adapter_name=f"a{i}")
    return peft.eval()


def _adapter_names():
    """PEFT's own mixed-batch inference: one adapter name per row, "__base__" for base-only rows.

    Reference rows must run in the same batch as ours: bitsandbytes int8 picks outlier columns from the
    whole batch, so a row's base output depends on its batch-mates (for ours and PEFT alike).
    """
    return [f"a{s}" if s >= 0 else "__base__" for s in ROW_SLOTS]


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return torch.randint(5, 500, (len(ROW_SLOTS), 12), generator=g)


def _compare(model_dir, dirs, prompts, quantize, atol, device="cpu"):
    ours = _ours(model_dir, dirs, quantize, device)
    ref = _reference(model_dir, dirs, quantize, device)
    prompts = prompts.to(device)
    with torch.no_grad():
        got = ours(prompts).logits
        want = ref(prompts, adapter_names=_adapter_names()).logits
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)
        kw = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0)
        got_tokens = ours.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
        want_tokens = ref.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                   adapter_names=_adapter_names(), **kw)
    assert torch.equal(got_tokens, want_tokens)
    # The adapters must matter: adapter rows differ from base rows given the same prompt.
    assert not torch.allclose(got[0], _base_logits(model_dir, prompts[:1], quantize, device)[0], atol=1e-3)


def _base_logits(model_dir, ids, quantize, device="cpu"):
    with torch.no_grad():
        return _load(model_dir, quantize, device).model(ids).logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_mixed_batch_matches_peft(family, device, tiny_model_dir, adapter_dir, prompts):
    dirs = [adapter_dir(family, r, t, s) for r, t, s in ADAPTERS]
    _compare(tiny_model_dir(family), dirs, prompts, "none", atol=1e-4, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_mixed_batch_matches_peft_on_quantized_base(quantize, device, tiny_model_dir, adapter_dir, prompts):
    if device == "cuda":
        pytest.importorskip("bitsandbytes")
    dirs = [adapter_dir("llama", r, t, s) for r, t, s in ADAPTERS]
    _compare(tiny_model_dir("llama"), dirs, prompts, quantize, atol=1e-4, device=device)


def test_empty_context_is_base_model(tiny_model_dir, adapter_dir, prompts):
    model_dir = tiny_model_dir("llama")
    dirs = [adapter_dir("llama", r, t, s) for r, t, s in ADAPTERS]
    ours = _ours(model_dir, dirs, "none")
    ours._lora_rows_hook.remove()
    _bind_rows(ours, ours._lora_injection, [-1] * len(ROW_SLOTS))
    with torch.no_grad():
        torch.testing.assert_close(ours(prompts).logits, _base_logits(model_dir, prompts, "none"))
