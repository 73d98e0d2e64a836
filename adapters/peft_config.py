"""Parse and validate a PEFT LoRA `adapter_config.json` into a `LoraSpec`.

We accept exactly the subset of peft 0.21's `LoraConfig` whose inference forward is plain LoRA,
`y = base(x) + scale_m · B_m (A_m x)` per targeted module m (a linear layer, the token embedding or lm_head),
or DoRA (`use_dora`: `y = g_m · (W x + scale_m · B_m A_m x) + (1 - g_m) · bias`, adapters/dora.py). Any field
that changes that math otherwise (lora bias, aLoRA, KaSA, ...), that carries full copies of modules
(`modules_to_save`), or that presumes a modified base model (PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA residual
weights) is refused with a 400 naming the field. Training-only fields (dropout, init seeds, EVA, VeLoRA,
MonteCLoRA) are ignored: they do not alter the eval-mode forward.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.adapters.errors import AdapterValidationError

CONFIG_NAME = "adapter_config.json"
# A real adapter_config.json is a few KiB; refuse anything absurd before reading it into memory.
MAX_CONFIG_BYTES = 1 << 20
# peft's LoraConfig defaults, used when a (hand-written) config omits the field, exactly as PEFT does.
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8

# Fields whose non-default (truthy) value changes the forward pass or the saved tensors; default is falsy.
_REFUSED_IF_SET: dict[str, str] = {
    "lora_bias": "a bias on lora_B is not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed base weights) is not supported",
    "use_qalora": "QALoRA (pooled inputs) is not supported",
    "layer_replication": "layer replication changes the base model's layer stack and is not supported",
    "megatron_config": "Megatron parallel LoRA layers are not supported",
    "alora_invocation_tokens": "Activated LoRA (aLoRA) is not supported",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA (singular-value diagonal between A and B) is not supported",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
}
# init_lora_weights values after which the adapter only fits a *modified* (residual) base model, unless it
# was converted back with `save_pretrained(path_initial_model_for_weight_conversion=...)`.
_RESIDUAL_BASE_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraSpec:
    """What the server needs from a LoRA adapter config; `rank_for`/`scale_for` apply PEFT's patterns."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str  # names (exact or `.suffix` match) or one regex (fullmatch)
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    use_dora: bool = False  # DoRA: every targeted module carries a magnitude vector
    ensure_weight_tying: bool = False  # on a tied base, lm_head shares the embedding's adapter (weights.py)

    def rank_for(self, module_name: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_name, self.lora_alpha))

    def scale_for(self, module_name: str) -> float:
        """PEFT's `LoraLayer.scaling`: alpha/r, or alpha/sqrt(r) with rsLoRA, per module's own r/alpha."""
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def max_declared_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])

    def targets(self, module_name: str) -> bool:
        """PEFT's `check_target_module_exists` (without layers_to_transform narrowing)."""
        if isinstance(self.target_modules, str):
            if self.target_modules == "all-linear":
                return True
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(_name_matches(t, module_name) for t in self.target_modules)

    def unmatched_targets(self, module_names: Iterable[str]) -> list[str]:
        """Target entries that select none of `module_names` (the base model's modules)."""
        names = list(module_names)
        if isinstance(self.target_modules, str):
            hit = self.target_modules == "all-linear" or any(self.targets(n) for n in names)
            return [] if hit else [self.target_modules]
        return [t for t in self.target_modules if not any(_name_matches(t, n) for n in names)]


def _name_matches(target: str, module_name: str) -> bool:
    return module_name == target or module_name.endswith(f".{target}")


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """peft.utils.other.get_pattern_key: the first key that matches a dotted suffix of the name wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def parse_adapter_config(path_or_dict: str | Path | Mapping[str, Any]) -> LoraSpec:
    """Read (a dir holding, or the path of) `adapter_config.json`, or take a parsed dict; validate it."""
    raw = path_or_dict if isinstance(path_or_dict, Mapping) else _read_config(Path(path_or_dict))
    if not isinstance(raw, Mapping):
        raise AdapterValidationError(
            f"{CONFIG_NAME} must be a JSON object, got {type(raw).__name__}", field=CONFIG_NAME
        )
    _check_lora_only(raw)
    return LoraSpec(
        r=_positive_int(raw.get("r", PEFT_DEFAULT_R), "r"),
        lora_alpha=_number(raw.get("lora_alpha", PEFT_DEFAULT_ALPHA), "lora_alpha"),
        target_modules=_target_modules(raw.get("target_modules")),
        use_rslora=_bool(raw.get("use_rslora", False), "use_rslora"),
        rank_pattern=_pattern(raw.get("rank_pattern"), "rank_pattern", _positive_int),
        alpha_pattern=_pattern(raw.get("alpha_pattern"), "alpha_pattern", _number),
        base_model_name_or_path=_optional_str(raw.get("base_model_name_or_path")),
        use_dora=_bool(raw.get("use_dora") or False, "use_dora"),
        ensure_weight_tying=_bool(raw.get("ensure_weight_tying") or False, "ensure_weight_tying"),
    )


def _read_config(path: Path) -> Any:
    file = path / CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise AdapterValidationError(f"{CONFIG_NAME} is missing in {path.name or path}", field=CONFIG_NAME)
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterValidationError(
            f"{CONFIG_NAME} is {file.stat().st_size} bytes, over the {MAX_CONFIG_BYTES}-byte limit",
            field=CONFIG_NAME,
        )
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterValidationError(f"{CONFIG_NAME} is not valid JSON: {exc}", field=CONFIG_NAME) from exc


def _check_lora_only(raw: Mapping[str, Any]) -> None:
    """Refuse non-LoRA adapters and every LoRA feature whose math we do not implement."""
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterValidationError(
            f"peft_type must be 'LORA', got {peft_type!r}: only LoRA adapters are supported",
            field="peft_type",
        )
    bias = raw.get("bias", "none")
    if bias != "none":
        raise AdapterValidationError(
            f"bias must be 'none', got {bias!r}: trained base-model biases are not supported", field="bias"
        )
    for name, reason in _REFUSED_IF_SET.items():
        if raw.get(name):
            raise AdapterValidationError(f"{name}={raw[name]!r}: {reason}", field=name)
    if raw.get("modules_to_save"):
        raise AdapterValidationError(
            f"modules_to_save={raw['modules_to_save']!r} is not supported: it stores a full trained copy of each of "
            "those modules per adapter, which would replace the shared base module for that adapter's rows; retrain "
            "with LoRA on those modules instead (add them to target_modules: embed_tokens and lm_head are "
            "supported)", field="modules_to_save")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_BASE_INITS):
        raise AdapterValidationError(
            f"init_lora_weights={init!r}: this adapter expects a modified (residual) base model; convert it "
            "to plain LoRA with save_pretrained(path_initial_model_for_weight_conversion=...)",
            field="init_lora_weights",
        )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterValidationError(f"{name} must be a positive integer, got {value!r}", field=name)
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterValidationError(f"{name} must be a finite number, got {value!r}", field=name)
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise AdapterValidationError(f"{name} must be true or false, got {value!r}", field=name)
    return value


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _regex(pattern: str, name: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise AdapterValidationError(f"{name} has an invalid regex {pattern!r}: {exc}", field=name) from exc
    return pattern


def _target_modules(value: Any) -> tuple[str, ...] | str:
    if isinstance(value, str) and value:
        return _regex(value, "target_modules")
    if isinstance(value, list | tuple) and value and all(isinstance(t, str) and t for t in value):
        return tuple(dict.fromkeys(value))  # PEFT stores a set; keep the file's order, drop repeats
    raise AdapterValidationError(
        f"target_modules must be a non-empty list of module names or a regex string, got {value!r}",
        field="target_modules",
    )


def _pattern(value: Any, name: str, check: Callable[[Any, str], Any]) -> dict[str, Any]:
    """rank_pattern / alpha_pattern: {regex-or-suffix: value}; absent or null means none."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise AdapterValidationError(f"{name} must be an object, got {value!r}", field=name)
    out: dict[str, Any] = {}
    for key, item in value.items():
        try:
            out[_regex(str(key), name)] = check(item, f"{name}[{key!r}]")
        except AdapterValidationError as exc:
            raise AdapterValidationError(exc.message, field=name) from None
    return out
