"""Base-model loading: clear refusals, fp32 per family, bitsandbytes nf4/int8 on CPU, targetable modules."""

from __future__ import annotations

import json
import logging
import shutil

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from tiny_models import FAMILIES
from transformers import AutoModelForCausalLM

from loraplex.server.config import ModelConfig
from loraplex.server.model_loader import (
    SUPPORTED_ARCHITECTURES,
    ModelLoadError,
    load_model,
    resolve_device,
    resolve_dtype,
    targetable_modules,
)

IDS = torch.tensor([[5, 40, 77, 300, 12, 9, 260, 146]])

# (in_features, out_features) of each projection in the tiny shape: hidden 64, 4 q heads / 2 kv heads of 16,
# intermediate 128.
TINY_SHAPES = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (64, 32),
    "self_attn.v_proj": (64, 32),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (64, 128),
    "mlp.up_proj": (64, 128),
    "mlp.down_proj": (128, 64),
}
EXPECTED_TARGETS = {f"model.layers.{layer}.{name}": shape for layer in range(2) for name, shape in TINY_SHAPES.items()}

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def copy_with_config(src, dst, **changes):
    """A copy of a model dir whose config.json has `changes` applied."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def logits(model):
    with torch.no_grad():
        return model(IDS).logits[0].float()


# --- refusals ------------------------------------------------------------------------------------------


def test_missing_dir_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match=f"{missing}.*does not exist"):
        load_model(ModelConfig(path=missing))


def test_file_instead_of_dir(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(ModelConfig(path=tmp_path / "weights.safetensors"))


def test_dir_without_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path}.*no config.json"):
        load_model(ModelConfig(path=tmp_path))


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(ModelConfig(path=tmp_path))


def test_model_load_error_is_a_value_error():
    assert issubclass(ModelLoadError, ValueError)


def test_unsupported_architecture_names_it_and_the_supported_list(tmp_path, tiny_model_dir):
    path = copy_with_config(tiny_model_dir("llama"), tmp_path / "m", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelConfig(path=path))
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    assert all(arch in message for arch in SUPPORTED_ARCHITECTURES)


def test_missing_architectures_field_resolves_from_model_type(tmp_path, tiny_model_dir):
    """A GGUF-derived config has no `architectures`: its model_type decides, as transformers' Auto classes do."""
    path = copy_with_config(tiny_model_dir("llama"), tmp_path / "m", architectures=None)
    assert type(load_model(ModelConfig(path=path)).model).__name__ == "LlamaForCausalLM"


def test_no_architectures_and_an_unsupported_or_missing_model_type_is_refused(tmp_path, tiny_model_dir):
    gpt2 = copy_with_config(tiny_model_dir("llama"), tmp_path / "g", architectures=None, model_type="gpt2")
    with pytest.raises(ModelLoadError, match=r"unsupported architecture \['GPT2LMHeadModel'\].*model_type 'gpt2'"):
        load_model(ModelConfig(path=gpt2))
    bare = copy_with_config(tiny_model_dir("llama"), tmp_path / "b", architectures=None, model_type=None)
    with pytest.raises(ModelLoadError, match="unsupported architecture None.*model_type None"):
        load_model(ModelConfig(path=bare))


def test_custom_code_auto_map_is_refused(tmp_path, tiny_model_dir):
    auto_map = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    path = copy_with_config(tiny_model_dir("llama"), tmp_path / "m", auto_map=auto_map)
    (path / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelLoadError, match="auto_map"):
        load_model(ModelConfig(path=path))


def test_pickle_only_weights_are_refused(tmp_path, tiny_model_dir):
    path = tmp_path / "m"
    path.mkdir()
    shutil.copy(tiny_model_dir("llama") / "config.json", path)
    (path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(ModelConfig(path=path))


def test_truncated_weights_are_a_clear_error(tmp_path, tiny_model_dir):
    path = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=f"cannot load the model in {path}"):
        load_model(ModelConfig(path=path))


def test_missing_tokenizer_is_a_clear_error(tmp_path, tiny_model_dir):
    path = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    with pytest.raises(ModelLoadError, match=f"cannot load the model in {path}"):
        load_model(ModelConfig(path=path))


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="--device cuda"):
        resolve_device("cuda")


# --- device / dtype ------------------------------------------------------------------------------------


def test_auto_device_and_dtype_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("auto picks CUDA here")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_explicit_dtype_is_honoured(tiny_model_dir):
    loaded = load_model(ModelConfig(path=tiny_model_dir("llama"), dtype="bfloat16", device="cpu"))
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(logits(loaded.model)).all()


# --- loading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_load_matches_plain_transformers(tiny_model_dir, family):
    path = tiny_model_dir(family)
    loaded = load_model(ModelConfig(path=path))
    assert (loaded.device, loaded.dtype, loaded.quantize, loaded.model_dir) == (
        torch.device("cpu"),
        torch.float32,
        "none",
        path,
    )
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.config._attn_implementation == "sdpa"
    assert loaded.tokenizer.eos_token_id == 0
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    torch.testing.assert_close(logits(loaded.model), logits(reference.eval()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("quantize", "layer_type", "min_cosine"),
    [("nf4", bnb.nn.Linear4bit, 0.5), ("int8", bnb.nn.Linear8bitLt, 0.99)],
)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_quantized_load_runs_on_cpu(tiny_model_dir, family, quantize, layer_type, min_cosine):
    path = tiny_model_dir(family)
    loaded = load_model(ModelConfig(path=path, quantize=quantize))
    assert loaded.quantize == quantize
    projections = [m for n, m in loaded.model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert projections and all(isinstance(m, layer_type) for m in projections)
    quantized = logits(loaded.model)
    assert torch.isfinite(quantized).all()
    # Quantized logits track the fp32 ones (nf4 on random weights is coarse; int8 is close).
    full = logits(load_model(ModelConfig(path=path)).model)
    assert torch.nn.functional.cosine_similarity(quantized, full, dim=-1).mean() > min_cosine


def test_int8_cast_notice_does_not_flood_the_log(tiny_model_dir, caplog):
    loaded = load_model(ModelConfig(path=tiny_model_dir("llama"), quantize="int8"))
    with caplog.at_level(logging.WARNING):
        logits(loaded.model)
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]


# --- targetable modules --------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", ["none", "nf4", "int8"])
def test_targetable_modules_report_logical_shapes(tiny_model_dir, quantize):
    loaded = load_model(ModelConfig(path=tiny_model_dir("qwen2"), quantize=quantize))
    assert targetable_modules(loaded.model) == EXPECTED_TARGETS


def test_targetable_modules_see_through_lora_wrappers(tiny_model_dir, adapter_dir):
    model = load_model(ModelConfig(path=tiny_model_dir("llama"))).model
    peft = PeftModel.from_pretrained(model, adapter_dir("llama", 4, ("q_proj", "down_proj"), 0))
    # PEFT wraps q_proj/down_proj (the linear moves to `.base_layer`); the inner model keeps its names.
    assert "model.layers.0.self_attn.q_proj.base_layer" in dict(peft.base_model.model.named_modules())
    assert targetable_modules(peft.base_model.model) == EXPECTED_TARGETS
