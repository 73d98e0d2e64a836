"""Tiny model / tokenizer builders and synthetic PEFT adapters: determinism, shapes, non-degenerate output."""

from __future__ import annotations

import json

import pytest
import tiny_models
import torch
from peft import PeftModel
from safetensors.torch import load_file
from synthetic_adapters import PRESETS, make_peft_adapter
from tiny_models import (
    FAMILIES,
    bench_small_config,
    build_model_dir,
    tiny_config,
    train_tokenizer,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.adapters.targets import ATTENTION_TARGETS, TARGET_MODULES

TEXTS = [
    "Le café est très bon, naïve façade.",
    "你好，世界！こんにちは 안녕하세요",
    "emoji 😀🚀🦊 and ❤️ — “quotes” …",
    "  leading spaces\tand\ttabs\nnew lines  ",
    "Привет, мир! Καλημέρα κόσμε. 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # 𝔘…: 4-byte chars never seen in the corpus
]
PROMPTS = ["The quick brown fox", "Le café est", "User: What is the capital", "def add(a, b):"]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def greedy(model: torch.nn.Module, ids: list[int], steps: int = 16) -> list[int]:
    """Plain greedy loop (no cache, no eos stop): the reference the engine is compared against."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def load_fp32(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


# --- tokenizer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_roundtrips_non_ascii(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_tokenizer_byte_level_merges_multibyte_text(tokenizer):
    # Merges learned on the corpus pack multi-byte characters: fewer tokens than UTF-8 bytes.
    for text in ("café naïve", "你好，世界", "Привет, мир"):
        assert len(tokenizer.encode(text)) < len(text.encode("utf-8"))
    # A token can end mid-character: some single id decodes to the replacement char (the detokenizer's job).
    cjk_ids = tokenizer.encode("天気ですね")
    assert any("\ufffd" in tokenizer.decode([i]) for i in cjk_ids)


def test_tokenizer_special_tokens_and_chat_template(tokenizer):
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 0)
    assert tokenizer.bos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tokenizer.encode("<|im_start|>user")[0] == 1
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_is_deterministic_and_saves(tmp_path):
    train = tiny_models._trained_tokenizer_json.__wrapped__  # bypass the per-process cache
    assert train(512) == train(512)
    saved = train_tokenizer(tmp_path, vocab_size=512)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert len(loaded) == len(saved) == 512
    assert loaded.encode(TEXTS[0]) == saved.encode(TEXTS[0])
    assert loaded.chat_template == saved.chat_template


def test_tokenizer_small_corpus_stays_within_vocab():
    assert len(train_tokenizer(vocab_size=4096)) <= 4096
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(vocab_size=100)


# --- configs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_config_shape(family):
    cfg = tiny_config(family, 512)
    assert cfg.model_type == family
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.max_position_embeddings == 512
    assert cfg.tie_word_embeddings == family.startswith("qwen")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 0, 0)
    # Full attention everywhere: the paged-KV engine does not implement sliding windows.
    assert getattr(cfg, "sliding_window", None) is None or not cfg.use_sliding_window
    assert tiny_config(family, 512, num_hidden_layers=3).num_hidden_layers == 3


def test_tiny_config_rejects_unknown_family():
    with pytest.raises(ValueError, match="gpt2"):
        tiny_config("gpt2", 512)


def test_bench_small_config_is_smollm2_135m_shape():
    cfg = bench_small_config()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (576, 1536, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings


# --- model dirs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_build_model_dir_writes_fp32_safetensors(tiny_model_dir, family):
    path = tiny_model_dir(family)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    tensors = load_file(path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert json.loads((path / "config.json").read_text())["architectures"][0].lower().startswith(family)


def test_build_model_dir_is_seeded(tmp_path, tiny_model_dir):
    again = load_file(build_model_dir(tmp_path / "a", "llama", seed=0) / "model.safetensors")
    other = load_file(build_model_dir(tmp_path / "b", "llama", seed=1) / "model.safetensors")
    first = load_file(tiny_model_dir("llama") / "model.safetensors")  # conftest: llama uses seed 0
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(
        first["model.layers.0.self_attn.q_proj.weight"], other["model.layers.0.self_attn.q_proj.weight"]
    )


def test_build_model_dir_with_larger_config_vocab(tmp_path):
    cfg = tiny_config("llama", 1024)
    path = build_model_dir(tmp_path / "m", config=cfg, vocab_size=512)
    model = load_fp32(path)
    assert model.config.vocab_size == 1024
    assert len(AutoTokenizer.from_pretrained(path, local_files_only=True)) == 512


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_is_not_degenerate(tiny_model_dir, tokenizer, family):
    model = load_fp32(tiny_model_dir(family))
    outputs = [greedy(model, tokenizer.encode(p)) for p in PROMPTS]
    # A collapsed model repeats one token; ours must vary within a sequence and across prompts.
    assert all(len(set(out)) >= 6 for out in outputs), outputs
    assert len({tuple(out) for out in outputs}) == len(PROMPTS)


def test_families_with_same_shape_get_different_weights(tiny_model_dir, tokenizer):
    ids = tokenizer.encode(PROMPTS[0])
    llama, mistral = (load_fp32(tiny_model_dir(f)) for f in ("llama", "mistral"))
    assert greedy(llama, ids) != greedy(mistral, ids)


# --- synthetic adapters --------------------------------------------------------------------------------


def test_presets_match_benchmark_protocol():
    assert PRESETS["S1"].rank == 8
    assert PRESETS["S1"].target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert PRESETS["P"].rank == 16 and len(PRESETS["P"].target_modules) == 7
    assert set(PRESETS["P"].target_modules) >= {"gate_proj", "up_proj", "down_proj"}


def test_adapter_files_and_config(adapter_dir):
    path = adapter_dir("qwen2", 16, PRESETS["P"].target_modules, 3)
    assert {p.name for p in path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not list(path.glob("*.bin"))
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == ("LORA", 16, 32, False)
    assert sorted(cfg["target_modules"]) == sorted(PRESETS["P"].target_modules)
    tensors = load_file(path / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 7  # layers x projections x (A, B)
    a = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert (a.shape, b.shape, a.dtype) == ((16, 128), (64, 16), torch.float32)
    assert b.abs().sum() > 0  # init_lora_weights=False: B is random, not zero


def test_adapter_is_seeded_and_same_from_dir_or_model(tmp_path, tiny_model_dir):
    base_dir = tiny_model_dir("llama")
    model = load_fp32(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def tensors(base, name, seed):
        return load_file(make_peft_adapter(base, tmp_path / name, rank=4, seed=seed) / "adapter_model.safetensors")

    from_dir, from_model, other = tensors(base_dir, "a", 7), tensors(model, "b", 7), tensors(model, "c", 8)
    assert all(torch.equal(from_dir[k], from_model[k]) for k in from_dir)
    assert not all(torch.equal(from_dir[k], other[k]) for k in from_dir)
    # The caller's model is neither wrapped nor changed.
    assert not any("lora" in name for name, _ in model.named_modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adapter_alpha_and_rslora_are_written(adapter_dir):
    path = adapter_dir("llama", 8, ("q_proj",), 0, alpha=4.0, use_rslora=True)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (8, 4.0, True)
    assert cfg["target_modules"] == ["q_proj"]


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_load_in_peft_and_change_outputs(tiny_model_dir, adapter_dir, tokenizer, family):
    ids = tokenizer.encode(PROMPTS[2])
    base = load_fp32(tiny_model_dir(family))
    with torch.no_grad():
        base_logits = base(torch.tensor([ids])).logits
    outputs = {"base": tuple(greedy(base, ids))}
    adapters = {
        "s1": (8, ATTENTION_TARGETS, 1),
        "s1b": (8, ATTENTION_TARGETS, 2),
        "p": (16, TARGET_MODULES, 3),
    }
    for name, (rank, targets, seed) in adapters.items():
        adapter = adapter_dir(family, rank, targets, seed)
        peft = PeftModel.from_pretrained(load_fp32(tiny_model_dir(family)), adapter)
        with torch.no_grad():
            logits = peft(torch.tensor([ids])).logits
        assert torch.isfinite(logits).all()
        assert (logits - base_logits).abs().max() > 0.1, name
        outputs[name] = tuple(greedy(peft, ids))
    assert len(set(outputs.values())) == len(outputs), outputs  # base and every adapter differ pairwise
