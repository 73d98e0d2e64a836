"""Registration-time validation of DoRA, embedding and lm_head adapters: every bad tensor is a 400 naming it.

Good adapters are written by PEFT itself (tests/fixtures/synthetic_adapters.py); each bad one is a copy with one
tensor or config field broken. The base is a tiny seeded Llama (separate lm_head) or Qwen2 (lm_head tied to the
embedding), seen through `LoRAInjection.module_shapes()`, which knows the embedding, lm_head and the base weights.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.adapters.errors import AdapterValidationError
from loraplex.adapters.inject import inject_multi_lora
from loraplex.adapters.merge import MergeRecipe, merge_adapters
from loraplex.adapters.weights import WEIGHTS_NAME, load_adapter_dir
from loraplex.server.config import ModelConfig
from loraplex.server.model_loader import load_model

MAX_RANK = 16
P = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
EMB, HEAD = "model.embed_tokens", "lm_head"


@pytest.fixture(scope="module")
def bases(tiny_model_dir):
    """family -> the BaseModules an engine's validation sees."""
    out = {}
    for family in ("llama", "qwen2"):
        model = load_model(ModelConfig(path=tiny_model_dir(family), device="cpu", dtype="float32")).model
        out[family] = inject_multi_lora(model, num_slots=1, max_rank=MAX_RANK, dtype=torch.float32).module_shapes()
    return out


@pytest.fixture(scope="module")
def good(adapter_dir):
    return {
        "dora": adapter_dir("llama", 4, ("q_proj", "v_proj"), 71, use_dora=True),
        "embed": adapter_dir("llama", 4, ("embed_tokens", "q_proj"), 72),
        "head": adapter_dir("llama", 4, ("lm_head",), 73),
        "tied": adapter_dir("qwen2", 4, ("embed_tokens",), 74, ensure_weight_tying=True),
    }


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _edit(path: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    file = path / WEIGHTS_NAME
    save_file(edit(load_file(file)), file)
    return path


def _config(path: Path, **changes: object) -> Path:
    file = path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return path


def _refused(path: Path, base, *words: str, field: str = WEIGHTS_NAME) -> None:
    with pytest.raises(AdapterValidationError) as info:
        load_adapter_dir(path, base, max_rank=MAX_RANK)
    assert info.value.status == 400 and info.value.field == field, info.value
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_good_adapters_load(good, bases):
    dora = load_adapter_dir(good["dora"], bases["llama"], max_rank=MAX_RANK)
    assert dora.uses_dora and dora.modules[Q0].dora.shape == (64,)
    assert dora.size_bytes == sum(4 * (m.a.numel() + m.b.numel() + m.dora.numel()) for m in dora.modules.values())
    embed = load_adapter_dir(good["embed"], bases["llama"], max_rank=MAX_RANK)
    assert embed.modules[EMB].a.shape == (4, 512) and embed.modules[EMB].b.shape == (64, 4)
    assert not embed.uses_dora and HEAD not in embed.modules  # untied: the embedding's adapter is its own
    # PEFT saved the embedding's base weight beside it (save_embedding_layers): checked, then dropped.
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in load_file(good["embed"] / WEIGHTS_NAME))
    assert embed.size_bytes == sum(4 * (m.a.numel() + m.b.numel()) for m in embed.modules.values())
    head = load_adapter_dir(good["head"], bases["llama"], max_rank=MAX_RANK)
    assert head.modules[HEAD].b.shape == (512, 4)


def test_magnitude_of_the_wrong_shape(good, bases, tmp_path):
    key = f"{P}{Q0}.lora_magnitude_vector"
    bad = _edit(_copy(good["dora"], tmp_path / "a"), lambda t: {**t, key: torch.ones(32)})
    _refused(bad, bases["llama"], key, "[32]", "expected [64]")


def test_magnitude_without_use_dora(good, bases, tmp_path):
    bad = _config(_copy(good["dora"], tmp_path / "a"), use_dora=False)
    _refused(bad, bases["llama"], "lora_magnitude_vector", "use_dora")


def test_use_dora_with_a_module_missing_its_magnitude(good, bases, tmp_path):
    key = f"{P}{Q0}.lora_magnitude_vector"
    bad = _edit(_copy(good["dora"], tmp_path / "a"), lambda t: {k: v for k, v in t.items() if k != key})
    _refused(bad, bases["llama"], Q0, "lora_magnitude_vector", "use_dora is true")


def test_dora_needs_the_base_weights(good, bases):
    shapes = dict(bases["llama"])  # a plain mapping: shapes only
    _refused(good["dora"], shapes, "DoRA", "base model's weights", field="adapter_config.json")


def test_a_zero_norm_makes_a_non_finite_factor(good, bases, tmp_path, tiny_model_dir):
    """Row 0 of q_proj: W + s B A = 0 exactly (A's first row = W's row 0, B[0] = -1/s there, s = 2)."""
    weight = load_file(tiny_model_dir("llama") / "model.safetensors")[f"{Q0}.weight"]

    def zero_row(t: dict) -> dict:
        a, b = t[f"{P}{Q0}.lora_A.weight"].clone(), t[f"{P}{Q0}.lora_B.weight"].clone()
        a[0], b[0], b[0, 0] = weight[0], 0.0, -0.5
        return {**t, f"{P}{Q0}.lora_A.weight": a, f"{P}{Q0}.lora_B.weight": b}

    bad = _edit(_copy(good["dora"], tmp_path / "a"), zero_row)
    _refused(bad, bases["llama"], f"{Q0}.lora_magnitude_vector", "not finite in 1 output channels", Q0)


@pytest.mark.parametrize(("key", "shape", "words"), [
    (f"{EMB}.lora_embedding_A", (3, 512), ["[3, 512]", "expected [4, 512]", "r=4"]),  # the embedding's rank
    (f"{EMB}.lora_embedding_A", (4, 600), ["[4, 600]", "expected [4, 512]", "vocabulary has 512 tokens"]),
    (f"{EMB}.lora_embedding_B", (32, 4), ["[32, 4]", "expected [64, 4]"]),
])
def test_embedding_tensor_shapes(good, bases, tmp_path, key, shape, words):
    bad = _edit(_copy(good["embed"], tmp_path / "a"), lambda t: {**t, P + key: torch.zeros(shape)})
    _refused(bad, bases["llama"], P + key, *words)


def test_lm_head_of_another_vocabulary(good, bases, tmp_path):
    key = f"{P}{HEAD}.lora_B.weight"
    bad = _edit(_copy(good["head"], tmp_path / "a"), lambda t: {**t, key: torch.zeros(600, 4)})
    _refused(bad, bases["llama"], key, "[600, 4]", "vocabulary has 512 tokens")


def test_linear_keys_on_the_embedding_and_embedding_keys_on_a_linear(good, bases, tmp_path):
    def rename(old: str, new: str) -> Callable[[dict], dict]:
        return lambda t: {(new if k == old else k): v for k, v in t.items()}

    bad = _edit(_copy(good["embed"], tmp_path / "a"), rename(f"{P}{EMB}.lora_embedding_A", f"{P}{EMB}.lora_A.weight"))
    _refused(bad, bases["llama"], f"{EMB}.lora_A.weight", "is an embedding", "lora_embedding_A")
    bad = _edit(_copy(good["head"], tmp_path / "b"), rename(f"{P}{HEAD}.lora_A.weight", f"{P}{HEAD}.lora_embedding_A"))
    _refused(bad, bases["llama"], f"{HEAD}.lora_embedding_A", "is a linear layer", "lora_A.weight")


def test_a_saved_embedding_copy_must_be_the_served_base_weight(good, bases, tmp_path):
    key = f"{P}{EMB}.base_layer.weight"

    def nudge(t: dict) -> dict:
        changed = t[key].clone()
        changed[7, 3] += 1e-3
        return {**t, key: changed}

    bad = _edit(_copy(good["embed"], tmp_path / "a"), nudge)
    _refused(bad, bases["llama"], key, "differs from the served base model's", "save_embedding_layers=False")
    bad = _edit(_copy(good["embed"], tmp_path / "b"), lambda t: {**t, key: torch.zeros(600, 64)})
    _refused(bad, bases["llama"], key, "[600, 64]", "resized vocabulary")


def test_full_module_copies_are_refused_with_what_to_do(good, bases, tmp_path):
    """modules_to_save (or a resized vocabulary) saves the whole module: `<module>.weight`."""
    key = f"{P}{HEAD}.weight"
    bad = _edit(_copy(good["head"], tmp_path / "a"), lambda t: {**t, key: torch.zeros(512, 64)})
    _refused(bad, bases["llama"], key, "full copy", "retrain with LoRA on that module")


def test_all_linear_leaves_lm_head_out_as_peft_does(good, bases, tmp_path):
    bad = _config(_copy(good["head"], tmp_path / "a"), target_modules="all-linear")
    _refused(bad, bases["llama"], f"{HEAD}.lora_A.weight", "target_modules does not select", field="target_modules")


def test_tied_lm_head_tensors_must_be_the_embeddings_transposed(good, bases, tmp_path):
    key = f"{P}{HEAD}.lora_A.weight"
    assert key in load_file(good["tied"] / WEIGHTS_NAME)  # PEFT saves the tied copy too
    bad = _edit(_copy(good["tied"], tmp_path / "a"), lambda t: {**t, key: t[key] + 1.0})
    _refused(bad, bases["qwen2"], key, "ensure_weight_tying")
    assert HEAD in load_adapter_dir(good["tied"], bases["qwen2"], max_rank=MAX_RANK).modules


def test_a_merge_of_a_dora_adapter_is_refused(good, bases):
    dora = load_adapter_dir(good["dora"], bases["llama"], max_rank=MAX_RANK)
    plain = load_adapter_dir(good["embed"], bases["llama"], max_rank=MAX_RANK)
    with pytest.raises(ValueError, match="'d' is a DoRA adapter: merging DoRA adapters is not supported"):
        merge_adapters(MergeRecipe((("p", 0.5), ("d", 0.5)), "ties"), [plain, dora])


def test_the_new_names_are_read_and_training_only_tensors_still_are_not(good, bases, tmp_path):
    """Main's 'memory is charged for what is kept' holds for DoRA and embedding adapters: a VeLoRA tensor beside
    them is never read (8 MiB of NaN: reading it would also refuse the adapter), every kept tensor owns its
    buffer, and the magnitude vector is read only to become the factor (size_bytes: A, B and g)."""
    from tests.adapters.test_weights_memory import CountingFiles

    velora = f"{P}{Q0}.lora_velora_embed"
    for name in ("dora", "embed"):
        big = _edit(_copy(good[name], tmp_path / name), lambda t: {**t, velora: torch.full((2**21,), float("nan"))})
        files = CountingFiles(big)
        weights = load_adapter_dir(files, bases["llama"], max_rank=MAX_RANK)
        kept = [t for m in weights.modules.values() for t in (m.a, m.b, m.dora) if t is not None]
        assert weights.size_bytes == sum(t.numel() * 4 for t in kept)
        assert files.read < 2**23, files.read  # the A/B/m (and the embedding copy) read, not the 8 MiB
        assert all(t.untyped_storage().nbytes() <= t.numel() * 4 for t in kept)


@pytest.mark.parametrize("key", [f"{Q0}.lora_magnitude_vectors", f"{EMB}.lora_embedding_C", f"{Q0}.lora_E.weight",
                                 f"{EMB}.lora_embedding_A.default.extra", f"{Q0}.base_layer.weight"])
def test_names_beside_the_new_ones_are_still_refused(good, bases, tmp_path, key):
    bad = _edit(_copy(good["dora"], tmp_path / "a"), lambda t: {**t, P + key: torch.zeros(4)})
    _refused(bad, bases["llama"], P + key, "unsupported tensor")
