"""DoRA, LoRA on the embedding and LoRA on lm_head in one mixed batch == PeftModel with each row's adapter.

Rows of one batch use: a DoRA adapter on all 7 projections, an embedding adapter (embed_tokens + q_proj), a
lm_head adapter (lm_head + v_proj), DoRA on embed_tokens + lm_head + k_proj, a plain LoRA adapter, and the
base model; on Llama and Mistral (separate lm_head) and Qwen2 and Qwen3 (lm_head tied to the embedding, with
PEFT's ensure_weight_tying adapter too), and on nf4 / int8 bases. PEFT refuses mixed batches with DoRA
(`adapter_names` "when DoRA is enabled"), so its rows run per adapter (`set_adapter`, the base under
`disable_adapter`): logits agree to fp32 atol 1e-4, and greedy tokens (HF generate, whose prefill projects only
the last row to logits: the lm_head rows get their own description) are identical.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from loraplex.adapters.inject import inject_multi_lora
from loraplex.adapters.targets import TARGET_MODULES
from loraplex.adapters.weights import load_adapter_dir
from loraplex.server.config import ModelConfig
from loraplex.server.model_loader import load_model

MAX_RANK = 16
STEPS = 12
GENERATE = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0)
# name -> (rank, targets, seed, use_dora, ensure_weight_tying)
ADAPTERS = {
    "dora": (8, TARGET_MODULES, 61, True, False),
    "embed": (4, ("embed_tokens", "q_proj"), 62, False, False),
    "head": (8, ("lm_head", "v_proj"), 63, False, False),
    "dora_emb_head": (4, ("embed_tokens", "lm_head", "k_proj"), 64, True, False),
    "lora": (16, ("q_proj", "o_proj", "down_proj"), 65, False, False),
}
TIED = {"tied_embed": (8, ("embed_tokens", "up_proj"), 66, False, True)}  # qwen: lm_head tied by ensure_weight_tying
ROWS = ["dora", "embed", None, "head", "dora_emb_head", "lora", "dora", None]
TIED_ROWS = ["tied_embed", "dora", None, "embed", "tied_embed", "head"]


def _adapter_dirs(adapter_dir, family: str, names: dict) -> dict:
    return {name: adapter_dir(family, r, t, s, use_dora=d, ensure_weight_tying=e)
            for name, (r, t, s, d, e) in names.items()}


def _load(model_dir, quantize: str):
    return load_model(ModelConfig(path=model_dir, quantize=quantize, device="cpu", dtype="float32"))


class Ours:
    """The base model with every adapter in a slot; `rows` (one adapter name or None per batch row) says which
    slot each row's tokens use in the next forwards."""

    def __init__(self, model_dir, dirs: dict, rows: list, quantize: str = "none") -> None:
        loaded = _load(model_dir, quantize)
        self.model = loaded.model
        self.inj = inject_multi_lora(self.model, num_slots=max(1, len(dirs)), max_rank=MAX_RANK, dtype=torch.float32)
        self.slot_of = {name: slot for slot, name in enumerate(dirs)}
        for name, d in dirs.items():
            self.inj.load_slot(self.slot_of[name], load_adapter_dir(d, self.inj.module_shapes(), max_rank=MAX_RANK))
        self.rows = rows
        self.model.register_forward_pre_hook(self._describe, with_kwargs=True)

    def _describe(self, module, args, kwargs) -> None:
        """As the runner does per step: every token's slot, and the rows lm_head sees (HF's logits_to_keep)."""
        length = kwargs.get("input_ids", args[0] if args else None).shape[1]
        slots = [self.slot_of[r] if r is not None else -1 for r in self.rows]
        keep = kwargs.get("logits_to_keep", 0)
        keep = keep if isinstance(keep, int) else int(keep.numel())
        logits_rows = None if keep == 0 else [b * length + p for b in range(len(slots))
                                              for p in range(length - keep, length)]
        self.inj.set_token_slots([s for s in slots for _ in range(length)], logits_rows=logits_rows)


def references(model_dir, dirs: dict, quantize: str = "none") -> dict:
    """One PeftModel per adapter, each over its own base (None: the base model alone). One model holding them all
    does not do: PEFT refuses mixed batches with DoRA, its ensure_weight_tying ties lm_head only for the adapter
    the model was created with, and on an int8 base a DoRA forward leaves bitsandbytes' matmul state such that
    the next plain-LoRA forward of the layer raises (peft 0.21, bitsandbytes 0.50)."""
    refs = {name: PeftModel.from_pretrained(_load(model_dir, quantize).model, str(d)).eval()
            for name, d in dirs.items()}
    return {**refs, None: _load(model_dir, quantize).model}


def per_adapter(refs: dict, rows: list, run) -> torch.Tensor:
    """`run(model, row indices)` for each adapter's rows on its reference, reassembled in row order."""
    parts = {}
    for name in dict.fromkeys(rows):
        idx = [i for i, r in enumerate(rows) if r == name]
        parts[tuple(idx)] = run(refs[name], idx)
    first = next(iter(parts.values()))
    out = torch.empty(len(rows), *first.shape[1:], dtype=first.dtype)
    for idx, value in parts.items():
        out[list(idx)] = value
    return out


def compare(model_dir, dirs: dict, rows: list, quantize: str = "none") -> None:
    """Ours runs every row in one batch: logits (fp32 atol 1e-4) and greedy tokens against PEFT's, row by row."""
    ours = Ours(model_dir, dirs, rows, quantize)
    refs = references(model_dir, dirs, quantize)
    prompts = _prompts(len(rows))
    with torch.no_grad():
        got = ours.model(prompts).logits
        torch.testing.assert_close(got, per_adapter(refs, rows, lambda ref, idx: ref(prompts[idx]).logits),
                                   atol=1e-4, rtol=1e-4)
        got_tokens = ours.model.generate(prompts, attention_mask=torch.ones_like(prompts), **GENERATE)
        want_tokens = per_adapter(refs, rows, lambda ref, idx: ref.generate(
            input_ids=prompts[idx], attention_mask=torch.ones_like(prompts[idx]), **GENERATE))
    assert torch.equal(got_tokens, want_tokens)
    base = rows.index(None)
    for i, r in enumerate(rows):  # every adapter matters: its rows differ from the base row's logits
        if r is not None:
            assert not torch.allclose(got[i], got[base], atol=1e-3), r


def compare_teacher_forced(model_dir, dirs: dict, rows: list, quantize: str) -> None:
    """Each adapter's rows as a batch of their own: ours generates greedily; then PEFT, in one forward over the
    prompt and our tokens, must give the logits ours gives in one forward there (atol 1e-4), so the same greedy
    choices."""
    ours = Ours(model_dir, dirs, rows, quantize)
    refs = references(model_dir, dirs, quantize)
    prompts = _prompts(len(rows))
    n = prompts.shape[1]

    def ours_run(idx: list[int]) -> torch.Tensor:  # [rows, n + STEPS - 1, V]: the logits along our tokens
        ours.rows = [rows[i] for i in idx]
        out = ours.model.generate(input_ids=prompts[idx], attention_mask=torch.ones_like(prompts[idx]), **GENERATE)
        return torch.cat([out[:, :-1, None].float(), ours.model(out[:, :-1]).logits], dim=-1)

    with torch.no_grad():
        got = per_adapter(refs, rows, lambda _, idx: ours_run(idx))  # [rows, L, 1 + V]: token, then logits
        sequences = got[:, :, 0].long()
        want = per_adapter(refs, rows, lambda ref, idx: ref(sequences[idx]).logits)  # a fresh model: one forward
    torch.testing.assert_close(got[:, :, 1:], want, atol=1e-4, rtol=1e-4)
    # The same greedy choice at every position of the sequence. (Not necessarily the token generate picked: an
    # int8 decode step's outlier columns come from that step's rows alone, a full forward's from all positions.)
    assert torch.equal(got[:, n - 1 :, 1:].argmax(-1), want[:, n - 1 :].argmax(-1))


def _prompts(n: int) -> torch.Tensor:
    return torch.randint(5, 500, (n, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_mixed_batch_matches_peft(family, tiny_model_dir, adapter_dir):
    names = ADAPTERS | (TIED if family.startswith("qwen") else {})
    rows = ROWS + (TIED_ROWS if family.startswith("qwen") else [])
    compare(tiny_model_dir(family), _adapter_dirs(adapter_dir, family, names), rows)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_mixed_batch_matches_peft_on_quantized_base(quantize, tiny_model_dir, adapter_dir):
    """DoRA's norm uses the dequantized base weight, as PEFT's does; LoRA beside the quantized layer. nf4: one
    mixed batch, as in fp32. int8, teacher-forced: bitsandbytes computes the columns where any row of the batch
    has an outlier apart, so a row's base output depends on its batch-mates (PEFT's too), and PEFT's DoRA on an
    int8 base raises from its second forward on (bitsandbytes 0.50, CPU: its norm's dequantization leaves the
    layer's int8 state unusable), so PEFT runs one forward per adapter, over each adapter's rows and the tokens
    ours generated for them, as a batch of their own on both sides."""
    dirs = _adapter_dirs(adapter_dir, "llama", ADAPTERS)
    if quantize == "nf4":
        compare(tiny_model_dir("llama"), dirs, ROWS, quantize)
    else:
        compare_teacher_forced(tiny_model_dir("llama"), dirs, ROWS, quantize)


def test_tied_lm_head_gets_the_embeddings_adapter_transposed(tiny_model_dir, adapter_dir):
    """ensure_weight_tying on a tied base (qwen2): lm_head's LoRA is the embedding's, B^T and A^T, as PEFT ties it;
    the same adapter on an untied base (llama) leaves lm_head alone, as PEFT does."""
    model_dir = tiny_model_dir("qwen2")
    d = _adapter_dirs(adapter_dir, "qwen2", TIED)["tied_embed"]
    inj = Ours(model_dir, {"t": d}, ["t"]).inj
    w = load_adapter_dir(d, inj.module_shapes(), max_rank=MAX_RANK)
    emb, head = w.modules["model.embed_tokens"], w.modules["lm_head"]
    assert inj.tied and torch.equal(head.a, emb.b.t()) and torch.equal(head.b, emb.a.t())
    untied = Ours(tiny_model_dir("llama"), {}, []).inj
    plain = adapter_dir("llama", 8, ("embed_tokens", "up_proj"), 66, ensure_weight_tying=True)
    assert "lm_head" not in load_adapter_dir(plain, untied.module_shapes(), max_rank=MAX_RANK).modules


def test_dora_factor_is_pefts_magnitude_over_the_weight_norm(tiny_model_dir, adapter_dir):
    """g = m / ||W + s B A|| per output channel, from the served weights (and 1 nowhere near everywhere: the
    synthetic magnitudes are scaled by U(0.7, 1.3))."""
    model_dir = tiny_model_dir("qwen2")  # q/k/v have a bias: its share (1 - g) * bias is the slot's shift
    d = _adapter_dirs(adapter_dir, "qwen2", ADAPTERS)["dora"]
    inj = Ours(model_dir, {"d": d}, ["d"]).inj
    ref = references(model_dir, {"d": d})["d"]
    layer = ref.base_model.model.model.layers[0].self_attn.q_proj
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    norm = torch.linalg.norm(layer.base_layer.weight + s * (b @ a), dim=1)
    g = layer.lora_magnitude_vector["default"].weight / norm
    ours_layer = inj.layers["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(ours_layer.lora_dora[0, 0], g.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_layer.lora_dora[0, 1], ((1 - g) * layer.base_layer.bias).detach(), atol=1e-6,
                               rtol=1e-6)
    assert (g - 1).abs().max() > 0.1
    assert torch.equal(ours_layer.lora_dora[1:], torch.tensor([1.0, 0.0])[None, :, None].expand(1, 2, 64))
