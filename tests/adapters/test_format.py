"""PEFT LoRA adapter dirs → validated fp32 weights: real adapters written by peft, and every bad input.

Covers BAD_INPUTS.md rows 7-14 (config missing / not JSON, peft_type / bias / modules_to_save,
rank > max, absent target, pickle-only weights, truncated / corrupt safetensors, shape mismatch, huge
declared shape). Adapters are built with peft itself on a tiny seeded Llama, so "right" means "what peft saved
and what peft's own LoraLayer.scaling says".
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.config import MontecloraConfig, VeloraConfig
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex.adapters import weights as weights_mod
from loraplex.adapters.errors import AdapterNotFoundError, AdapterValidationError
from loraplex.adapters.peft_config import LoraSpec, parse_adapter_config
from loraplex.adapters.weights import WEIGHTS_NAME, load_adapter_dir, read_safetensors_header

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_RANK = 16
Q0 = "model.layers.0.self_attn.q_proj"
Q0_A = f"base_model.model.{Q0}.lora_A.weight"
# name → LoraConfig kwargs of each real adapter the module fixture writes.
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "rslora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "down_proj"], "use_rslora": True},
    "patterns": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"layers.1.self_attn.q_proj": 4},
        "alpha_pattern": {"v_proj": 4},
    },
    "regex": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": r"model\.layers\.1\.(self_attn\.o_proj|mlp\.up_proj)",
    },
    # VeLoRA only changes training (its saved `lora_velora_embed` buffer must be read past).
    "velora": {"r": 8, "lora_alpha": 16, "target_modules": ["k_proj"], "velora_config": VeloraConfig()},
}


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(cfg)


def _save_peft_adapter(
    out: Path, lora_kwargs: dict[str, Any], *, warm_up: bool = False
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Write a real peft adapter to `out`; -> {module: (A, B, scaling)} as peft holds them."""
    model = get_peft_model(_tiny_llama(), LoraConfig(init_lora_weights=False, **lora_kwargs))
    if warm_up:  # some variants (MonteCLoRA) create their saved state on the first forward
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
    model.save_pretrained(out)
    return {
        name: (
            layer.lora_A["default"].weight.detach().clone(),
            layer.lora_B["default"].weight.detach().clone(),
            layer.scaling["default"],
        )
        for name, layer in model.base_model.model.named_modules()
        if isinstance(layer, LoraLayer)
    }


@pytest.fixture(scope="module")
def module_shapes() -> dict[str, tuple[int, int]]:
    return {
        name: (m.in_features, m.out_features)
        for name, m in _tiny_llama().named_modules()
        if isinstance(m, torch.nn.Linear)
    }


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("peft")
    return {name: (root / name, _save_peft_adapter(root / name, kw)) for name, kw in VARIANTS.items()}


@pytest.fixture()
def bad(adapters: dict, tmp_path: Path) -> Path:
    """A private copy of the plain adapter to break."""
    return Path(shutil.copytree(adapters["plain"][0], tmp_path / "adapter"))


def _edit_config(path: Path, **changes: Any) -> None:
    file = path / "adapter_config.json"
    raw = json.loads(file.read_text())
    raw.update(changes)
    file.write_text(json.dumps(raw))


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    file = path / WEIGHTS_NAME
    save_file(edit(load_file(file)), file)


def _write_raw_safetensors(file: Path, header: dict[str, Any], data: bytes) -> None:
    blob = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _refused(call: Callable[[], Any], field: str | None, *words: str) -> AdapterValidationError:
    with pytest.raises(AdapterValidationError) as info:
        call()
    err = info.value
    assert err.status == 400
    if field is not None:
        assert err.field == field, err
    for word in words:
        assert word in str(err), f"{word!r} not in {str(err)!r}"
    return err


def _load(path: Path, shapes: dict, **kw: Any) -> weights_mod.AdapterWeights:
    return load_adapter_dir(path, shapes, max_rank=kw.pop("max_rank", MAX_RANK), **kw)


# ---------------------------------------------------------------------------------------------------------
# good adapters
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_real_peft_adapter_loads_exactly(variant: str, adapters: dict, module_shapes: dict) -> None:
    path, reference = adapters[variant]
    loaded = _load(path, module_shapes)
    assert set(loaded.modules) == set(reference) and reference
    for name, (a, b, scaling) in reference.items():
        got = loaded.modules[name]
        assert got.a.dtype == got.b.dtype == torch.float32 and got.a.device.type == "cpu"
        assert torch.equal(got.a, a) and torch.equal(got.b, b)
        assert got.scale == pytest.approx(scaling, rel=1e-12)
        assert got.rank == a.shape[0]
    assert loaded.max_rank == max(a.shape[0] for a, _, _ in reference.values())
    assert loaded.size_bytes == sum(4 * (a.numel() + b.numel()) for a, b, _ in reference.values())


def test_scales_follow_alpha_over_r_rslora_and_patterns(adapters: dict, module_shapes: dict) -> None:
    plain = _load(adapters["plain"][0], module_shapes)
    assert plain.modules[Q0].scale == pytest.approx(16 / 8)
    rslora = _load(adapters["rslora"][0], module_shapes)
    assert rslora.modules["model.layers.0.mlp.down_proj"].scale == pytest.approx(16 / math.sqrt(8))
    patterns = _load(adapters["patterns"][0], module_shapes)
    q1 = patterns.modules["model.layers.1.self_attn.q_proj"]
    assert (q1.rank, q1.scale) == (4, pytest.approx(16 / 4))
    v0 = patterns.modules["model.layers.0.self_attn.v_proj"]
    assert (v0.rank, v0.scale) == (8, pytest.approx(4 / 8))
    assert (patterns.modules[Q0].rank, patterns.modules[Q0].scale) == (8, pytest.approx(16 / 8))


def test_regex_target_modules_use_fullmatch(adapters: dict) -> None:
    spec = parse_adapter_config(adapters["regex"][0])
    assert isinstance(spec.target_modules, str)
    assert spec.targets("model.layers.1.self_attn.o_proj")
    assert not spec.targets("model.layers.0.self_attn.o_proj")
    assert not spec.targets("x.model.layers.1.mlp.up_proj")  # fullmatch, not search


def test_spec_from_dict_applies_patterns_as_peft_does() -> None:
    spec = parse_adapter_config(
        {
            "peft_type": "LORA",
            "r": 16,
            "lora_alpha": 32,
            "target_modules": ["q_proj"],
            "rank_pattern": {r"layers\.[01]\.self_attn\.q_proj": 2, "q_proj": 4},
            "alpha_pattern": {"layers.3.self_attn.q_proj": 8},
            "use_rslora": True,
            "base_model_name_or_path": "tiny",
        }
    )
    assert isinstance(spec, LoraSpec) and spec.base_model_name_or_path == "tiny"
    assert spec.max_declared_rank == 16 and spec.alpha_for("layers.3.self_attn.q_proj") == 8
    assert spec.rank_for("model.layers.1.self_attn.q_proj") == 2  # first matching key wins
    assert spec.rank_for("model.layers.2.self_attn.q_proj") == 4
    assert spec.rank_for("model.layers.2.self_attn.k_proj") == 16
    assert spec.scale_for("model.layers.3.self_attn.q_proj") == pytest.approx(8 / math.sqrt(4))
    assert spec.scale_for("model.layers.5.self_attn.k_proj") == pytest.approx(32 / math.sqrt(16))
    assert spec.targets("model.layers.0.self_attn.q_proj") and not spec.targets("model.q_proj_x")


def test_monteclora_sampler_state_is_read_past(tmp_path: Path, module_shapes: dict) -> None:
    kwargs = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "monteclora_config": MontecloraConfig()}
    reference = _save_peft_adapter(tmp_path / "mc", kwargs, warm_up=True)
    assert any("monteclora" in k for k in load_file(tmp_path / "mc" / WEIGHTS_NAME))
    loaded = _load(tmp_path / "mc", module_shapes)
    assert set(loaded.modules) == set(reference)
    assert torch.equal(loaded.modules[Q0].a, reference[Q0][0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_are_cast_to_fp32(dtype: torch.dtype, bad: Path, module_shapes: dict) -> None:
    _edit_tensors(bad, lambda t: {k: v.to(dtype) for k, v in t.items()})
    loaded = _load(bad, module_shapes)
    expect = load_file(bad / WEIGHTS_NAME)[Q0_A].float()
    assert loaded.modules[Q0].a.dtype == torch.float32 and torch.equal(loaded.modules[Q0].a, expect)


@pytest.mark.parametrize(
    "rename",
    [
        lambda k: k.replace(".weight", ".default.weight"),  # lora_A.<adapter>.weight
        lambda k: k.removeprefix("base_model.model."),  # no PEFT prefix
    ],
    ids=["adapter-name-infix", "no-prefix"],
)
def test_tolerated_key_variants(rename: Callable[[str], str], adapters: dict, bad: Path, module_shapes: dict):
    _edit_tensors(bad, lambda t: {rename(k): v for k, v in t.items()})
    loaded, reference = _load(bad, module_shapes), adapters["plain"][1]
    assert set(loaded.modules) == set(reference)
    assert torch.equal(loaded.modules[Q0].b, reference[Q0][1])


# ---------------------------------------------------------------------------------------------------------
# adapter_config.json (rows 7, 8 and the other refused features)
# ---------------------------------------------------------------------------------------------------------


def test_config_missing(bad: Path, module_shapes: dict) -> None:
    (bad / "adapter_config.json").unlink()
    _refused(lambda: _load(bad, module_shapes), "adapter_config.json", "adapter_config.json", "missing")


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe", "[" * 100_000])
def test_config_not_json(text: str, bad: Path, module_shapes: dict) -> None:
    (bad / "adapter_config.json").write_text(text, encoding="latin-1")
    _refused(lambda: _load(bad, module_shapes), "adapter_config.json", "not valid JSON")


def test_config_not_an_object(bad: Path, module_shapes: dict) -> None:
    (bad / "adapter_config.json").write_text("[1, 2]")
    _refused(lambda: _load(bad, module_shapes), "adapter_config.json", "JSON object", "list")


@pytest.mark.parametrize(
    ("changes", "field", "word"),
    [
        ({"peft_type": "LOHA"}, "peft_type", "LOHA"),
        ({"peft_type": None}, "peft_type", "None"),
        ({"use_dora": "yes"}, "use_dora", "'yes'"),
        ({"bias": "all"}, "bias", "'all'"),
        ({"bias": "lora_only"}, "bias", "lora_only"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save", "lm_head"),  # and why, and what instead:
        ({"modules_to_save": ["score"]}, "modules_to_save", "full trained copy"),
        ({"modules_to_save": ["score"]}, "modules_to_save", "retrain with LoRA on those modules"),
        ({"r": 0}, "r", "0"),
        ({"r": "8"}, "r", "'8'"),
        ({"r": True}, "r", "True"),
        ({"lora_alpha": "sixteen"}, "lora_alpha", "sixteen"),
        ({"lora_alpha": None}, "lora_alpha", "None"),
        ({"target_modules": []}, "target_modules", "[]"),
        ({"target_modules": None}, "target_modules", "None"),
        ({"target_modules": "(unclosed"}, "target_modules", "(unclosed"),
        ({"use_rslora": "yes"}, "use_rslora", "yes"),
        ({"rank_pattern": {"q_proj": -1}}, "rank_pattern", "-1"),
        ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern", "'x'"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern", "object"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication", "layer_replication"),
        ({"use_qalora": True}, "use_qalora", "QALoRA"),
        ({"lora_bias": True}, "lora_bias", "bias"),
        ({"megatron_config": {"x": 1}}, "megatron_config", "Megatron"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out", "fan_in_fan_out"),
        ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens", "aLoRA"),
        ({"kasa_config": {"beta": 0.1}}, "kasa_config", "KaSA"),
        ({"use_bdlora": {"nblocks": 2}}, "use_bdlora", "BD-LoRA"),
        ({"arrow_config": {"top_k": 2}}, "arrow_config", "Arrow"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters", "target_parameters"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices", "token"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights", "pissa_niter_4"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights", "residual"),
    ],
)
def test_config_refusals(changes: dict, field: str, word: str, bad: Path, module_shapes: dict) -> None:
    _edit_config(bad, **changes)
    _refused(lambda: _load(bad, module_shapes), field, field, word)


def test_training_only_fields_are_ignored(bad: Path, module_shapes: dict) -> None:
    _edit_config(bad, lora_dropout=0.3, init_lora_weights="gaussian", eva_config=None, inference_mode=False)
    assert _load(bad, module_shapes).modules[Q0].scale == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------------------
# base-model fit (rows 9, 10, 13)
# ---------------------------------------------------------------------------------------------------------


def test_rank_above_max_names_both_numbers(bad: Path, module_shapes: dict) -> None:
    _refused(lambda: _load(bad, module_shapes, max_rank=4), "r", "r=8", "4")


def test_rank_pattern_above_max_is_refused(bad: Path, module_shapes: dict) -> None:
    _edit_config(bad, rank_pattern={"layers.1.self_attn.q_proj": 32})
    _refused(lambda: _load(bad, module_shapes), "r", "32", str(MAX_RANK), "rank_pattern")


def test_target_absent_from_base_names_it(bad: Path, module_shapes: dict) -> None:
    _edit_config(bad, target_modules=["q_proj", "v_proj", "query_key_value"])
    _refused(lambda: _load(bad, module_shapes), "target_modules", "query_key_value")


def test_regex_target_matching_nothing_is_refused(bad: Path, module_shapes: dict) -> None:
    _edit_config(bad, target_modules=r".*\.c_attn")
    _refused(lambda: _load(bad, module_shapes), "target_modules", "c_attn")


def test_tensor_for_module_the_base_lacks_names_it(bad: Path, module_shapes: dict) -> None:
    shapes = {k: v for k, v in module_shapes.items() if k != Q0}
    _refused(lambda: _load(bad, shapes), "target_modules", Q0)


def test_tensor_for_untargeted_module_is_refused(bad: Path, module_shapes: dict) -> None:
    _edit_config(bad, target_modules=["v_proj"])
    _refused(lambda: _load(bad, module_shapes), "target_modules", Q0, "does not select")


@pytest.mark.parametrize(
    ("key", "shape", "expected"),
    [
        (Q0_A, (8, 32), "[8, 64]"),
        (Q0_A.replace("lora_A", "lora_B"), (64, 4), "[64, 8]"),
        (Q0_A, (8, 64, 1), "[8, 64]"),
    ],
)
def test_shape_mismatch_names_tensor_and_shapes(key, shape, expected, bad: Path, module_shapes) -> None:
    _edit_tensors(bad, lambda t: {**t, key: torch.zeros(shape)})
    _refused(lambda: _load(bad, module_shapes), WEIGHTS_NAME, key, str(list(shape)), expected)


def test_rank_pattern_disagreeing_with_tensors_is_a_shape_error(bad: Path, module_shapes: dict) -> None:
    _edit_config(bad, rank_pattern={"layers.0.self_attn.q_proj": 4})
    _refused(lambda: _load(bad, module_shapes), WEIGHTS_NAME, Q0_A, "[8, 64]", "[4, 64]", "r=4")


@pytest.mark.parametrize(
    "extra",
    [
        f"base_model.model.{Q0}.lora_B.bias",
        f"base_model.model.{Q0}.lora_C.weight",
    ],
)
def test_unknown_tensor_is_named(extra: str, bad: Path, module_shapes: dict) -> None:
    _edit_tensors(bad, lambda t: {**t, extra: torch.ones(8)})
    _refused(lambda: _load(bad, module_shapes), WEIGHTS_NAME, extra, "unsupported")


def test_half_pair_and_duplicate_pairs_are_refused(bad: Path, module_shapes: dict) -> None:
    tensors = load_file(bad / WEIGHTS_NAME)
    save_file({k: v for k, v in tensors.items() if k != Q0_A}, bad / WEIGHTS_NAME)
    _refused(lambda: _load(bad, module_shapes), WEIGHTS_NAME, Q0, "lora_A")
    twin = Q0_A.replace(".weight", ".other.weight")
    save_file({**tensors, twin: tensors[Q0_A].clone()}, bad / WEIGHTS_NAME)
    _refused(lambda: _load(bad, module_shapes), WEIGHTS_NAME, Q0_A, "both lora_A")


def test_non_finite_values_are_refused(bad: Path, module_shapes: dict) -> None:
    _edit_tensors(bad, lambda t: {**t, Q0_A: torch.full_like(t[Q0_A], float("nan"))})
    _refused(lambda: _load(bad, module_shapes), WEIGHTS_NAME, Q0_A, "NaN")


def test_missing_directory_is_404(tmp_path: Path, module_shapes: dict) -> None:
    with pytest.raises(AdapterNotFoundError) as info:
        _load(tmp_path / "nope", module_shapes)
    assert info.value.status == 404 and "nope" in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# weights file (rows 11, 12, 14)
# ---------------------------------------------------------------------------------------------------------


class _Tripwire:
    """Unpickling this creates `path`: proof that a file was (or was not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt", "weights.pth"])
def test_pickle_only_is_refused_and_never_unpickled(name: str, bad: Path, tmp_path: Path, module_shapes):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Tripwire(marker))
    pickle.loads(payload)  # the tripwire works ...
    assert marker.exists()
    marker.unlink()
    (bad / WEIGHTS_NAME).unlink()
    (bad / name).write_bytes(payload)
    _refused(lambda: _load(bad, module_shapes), WEIGHTS_NAME, "safetensors only", name)
    assert not marker.exists()  # ... and the loader never tripped it


def test_weights_missing_entirely(bad: Path, module_shapes: dict) -> None:
    (bad / WEIGHTS_NAME).unlink()
    _refused(lambda: _load(bad, module_shapes), WEIGHTS_NAME, WEIGHTS_NAME, "missing")


@pytest.mark.parametrize("keep", [0, 5, 8, 20, "half", "minus1"])
def test_truncated_safetensors(keep: int | str, bad: Path, module_shapes: dict) -> None:
    file = bad / WEIGHTS_NAME
    blob = file.read_bytes()
    cut = {"half": len(blob) // 2, "minus1": len(blob) - 1}.get(keep, keep)
    file.write_bytes(blob[:cut])
    _refused(lambda: _load(bad, module_shapes), WEIGHTS_NAME, "truncated")


def test_corrupt_header_is_refused(bad: Path, module_shapes: dict) -> None:
    file = bad / WEIGHTS_NAME
    blob = bytearray(file.read_bytes())
    header_len = struct.unpack("<Q", blob[:8])[0]
    blob[8 : 8 + header_len] = b"\x00garbage" * (header_len // 8) + b"!" * (header_len % 8)
    file.write_bytes(bytes(blob))
    _refused(lambda: _load(bad, module_shapes), WEIGHTS_NAME, "corrupt header")


def _entry(dtype: str, shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


@pytest.mark.parametrize(
    ("header", "data_len", "words"),
    [
        ({"t": _entry("BOOL", [4], 0, 4)}, 4, ("'t'", "BOOL", "cannot be cast to float")),
        ({"t": _entry("I64", [2], 0, 16)}, 16, ("I64",)),
        ({"t": _entry("F32", [2, 2], 0, 12)}, 12, ("'t'", "[2, 2]", "16 bytes", "span 12")),
        ({"t": _entry("F32", [4], 0, 16)}, 8, ("'t'", "outside", "truncated")),
        ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, 12, ("overlaps",)),
        ({"a": _entry("F32", [2], 8, 16)}, 16, ("gap",)),
        ({"a": _entry("F32", [2], 0, 8)}, 12, ("trailing",)),
        ({"t": _entry("F32", [-2], 0, 8)}, 8, ("shape",)),
        ({"t": _entry("F32", [2], 8, 0)}, 8, ("data_offsets",)),
        ({"t": [1, 2]}, 8, ("'t'", "not an object")),
        ({"__metadata__": {"a": 1}}, 0, ("__metadata__",)),
    ],
)
def test_bad_safetensors_headers(header: dict, data_len: int, words: tuple, tmp_path: Path) -> None:
    file = tmp_path / WEIGHTS_NAME
    _write_raw_safetensors(file, header, b"\x00" * data_len)
    _refused(lambda: read_safetensors_header(file, 2**31), WEIGHTS_NAME, *words)


def test_duplicate_header_keys_are_refused(tmp_path: Path) -> None:
    file = tmp_path / WEIGHTS_NAME
    blob = b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'  # noqa: E501
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\x00" * 4)
    _refused(lambda: read_safetensors_header(file, 2**31), WEIGHTS_NAME, "'t'", "twice")


def test_good_header_is_parsed(adapters: dict) -> None:
    header = read_safetensors_header(adapters["plain"][0] / WEIGHTS_NAME, 2**31)
    assert header[Q0_A].dtype == "F32" and header[Q0_A].shape == (8, 64)
    assert header[Q0_A].end - header[Q0_A].start == 8 * 64 * 4


def test_huge_declared_shape_refused_before_allocation(bad: Path, module_shapes: dict, monkeypatch) -> None:
    def must_not_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tensors were loaded before the header was refused")

    monkeypatch.setattr(weights_mod, "_load_tensors", must_not_load)
    huge = {Q0_A: _entry("F32", [10**9, 10**9], 0, 16)}
    _write_raw_safetensors(bad / WEIGHTS_NAME, huge, b"\x00" * 16)
    _refused(lambda: _load(bad, module_shapes), WEIGHTS_NAME, Q0_A, str(4 * 10**18), "limit")


def test_total_declared_size_above_max_bytes(tmp_path: Path) -> None:
    file = tmp_path / WEIGHTS_NAME
    header = {f"t{i}": _entry("F32", [16], 64 * i, 64 * (i + 1)) for i in range(4)}
    _write_raw_safetensors(file, header, b"\x00" * 256)
    assert len(read_safetensors_header(file, 256)) == 4
    _refused(lambda: read_safetensors_header(file, 255), WEIGHTS_NAME, "256", "255")


def test_prepared_weights_fill_a_slot_exactly_like_the_raw_ones():
    """AdapterWeights.prepared folds the scale into B and stores it transposed (what a slot holds), so the
    engine thread's copy is a plain copy; the slot contents are the same either way, and preparing twice is
    a no-op."""
    import torch

    from loraplex.adapters.context import LoRABatchContext
    from loraplex.adapters.layer import MultiLoRALinear
    from loraplex.adapters.weights import AdapterWeights, LoraModuleWeights

    gen = torch.Generator().manual_seed(0)
    raw = LoraModuleWeights(torch.randn(3, 6, generator=gen), torch.randn(5, 3, generator=gen), 2.5)
    weights = AdapterWeights(None, {"m": raw}, 0)  # type: ignore[arg-type]
    prepared = weights.prepared().modules["m"]
    assert prepared.scale == 1.0 and prepared.b.t().is_contiguous()
    assert weights.prepared().prepared().modules["m"].b.t().is_contiguous()
    layers = [MultiLoRALinear(torch.nn.Linear(6, 5), kind="q_proj", num_slots=2, max_rank=4,
                              context=LoRABatchContext(), dtype=torch.float32) for _ in range(2)]
    layers[0].set_slot(1, raw.a, raw.b, raw.scale)
    layers[1].set_slot(1, prepared.a, prepared.b, prepared.scale)
    assert torch.equal(layers[0].lora_a, layers[1].lora_a)
    torch.testing.assert_close(layers[0].lora_b, layers[1].lora_b, rtol=0, atol=1e-6)
    assert not layers[1].lora_b[1, 3:].any()  # zeros past the rank
