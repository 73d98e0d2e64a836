r"""Parse and validate a PEFT LoRA `adapter_config.json` into a `LoraSpec`.

We accept exactly the subset of peft 0.21's `LoraConfig` whose inference forward is plain LoRA:
`y = base(x) + scale_m · B_m (A_m x)` per targeted module m. Any field that changes that math (DoRA, lora
bias, aLoRA, KaSA, ...) or that presumes a modified base model (PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA residual
weights) is refused with a 400 naming the field. Training-only fields (dropout, init seeds, EVA, VeLoRA,
MonteCLoRA) are ignored: they do not alter the eval-mode forward.

Patterns (`rank_pattern` / `alpha_pattern` keys, a string `target_modules`) are regexes that PEFT matches with
Python's `re` (peft/utils/other.py: `get_pattern_key` tries `re.match(rf"(.*\.)?({key})$", name)` key by key, the
first match wins; `match_target_against_key` is `re.fullmatch`). A backtracking engine can take minutes on a
hostile key while holding the GIL, so we match them with RE2 (google-re2), which runs in time linear in the
name, with those exact expressions. A pattern must compile in both engines (what PEFT could not load, we do not
accept); one RE2 cannot run in linear time (backreferences, look-around) or that means something else there
(POSIX classes `[[:alpha:]]`) is refused with a 400 naming the field. On module names (dotted ASCII, no newline)
the two engines then agree on every match.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import re2

from loraplex.adapters.errors import AdapterValidationError

CONFIG_NAME = "adapter_config.json"
# A real adapter_config.json is a few KiB; refuse anything absurd before reading it into memory.
MAX_CONFIG_BYTES = 1 << 20
# peft's LoraConfig defaults, used when a (hand-written) config omits the field, exactly as PEFT does.
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8
# Entries per rank_pattern / alpha_pattern / target_modules list: PEFT writes one per module at most (a 128-layer
# model with 7 targets: 896), so this only bounds the work a hostile config can ask for.
MAX_PATTERNS = 4096
_SHOWN = 100  # characters of a user's pattern quoted back in an error

# Fields whose non-default (truthy) value changes the forward pass or the saved tensors; default is falsy.
_REFUSED_IF_SET: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA) is not supported",
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
    "modules_to_save": "modules_to_save (fully fine-tuned extra modules) is not supported",
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

    def __post_init__(self) -> None:
        # The patterns compiled once (RE2, linear time); not part of equality or repr.
        object.__setattr__(self, "_rank_keys", PatternKeys(tuple(self.rank_pattern), "rank_pattern"))
        object.__setattr__(self, "_alpha_keys", PatternKeys(tuple(self.alpha_pattern), "alpha_pattern"))
        target = self.target_modules
        regex = isinstance(target, str) and target != "all-linear"
        object.__setattr__(self, "_target_regex", _linear_regex(target) if regex else None)

    def rank_for(self, module_name: str) -> int:
        key = self._rank_keys.first_match(module_name)  # type: ignore[attr-defined]
        return int(self.r if key is None else self.rank_pattern[key])

    def alpha_for(self, module_name: str) -> float:
        key = self._alpha_keys.first_match(module_name)  # type: ignore[attr-defined]
        return float(self.lora_alpha if key is None else self.alpha_pattern[key])

    def scale_for(self, module_name: str) -> float:
        """PEFT's `LoraLayer.scaling`: alpha/r, or alpha/sqrt(r) with rsLoRA, per module's own r/alpha."""
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def max_declared_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])

    def targets(self, module_name: str) -> bool:
        """PEFT's `check_target_module_exists` (without layers_to_transform narrowing): a regex must match the whole
        name; a list entry must be the name or a dotted suffix of it."""
        if isinstance(self.target_modules, str):
            regex = self._target_regex  # type: ignore[attr-defined]
            return regex is None or regex.fullmatch(module_name) is not None
        return not set(dotted_suffixes(module_name)).isdisjoint(self.target_modules)

    def unmatched_targets(self, module_names: Iterable[str]) -> list[str]:
        """Target entries that select none of `module_names` (the base model's modules)."""
        names = list(module_names)
        if isinstance(self.target_modules, str):
            hit = any(self.targets(n) for n in names)
            return [] if hit else [self.target_modules[:_SHOWN]]
        suffixes = {suffix for name in names for suffix in dotted_suffixes(name)}
        return [t[:_SHOWN] for t in self.target_modules if t not in suffixes]


def dotted_suffixes(name: str) -> list[str]:
    """"a.b.c" -> ["a.b.c", "b.c", "c"]: the names a target list entry selects `name` by (PEFT: equal, or
    `name.endswith("." + entry)`)."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


class PatternKeys:
    r"""peft.utils.other.get_pattern_key over fixed keys: the first key, in the config's order, for which
    `re.match(rf"(.*\.)?({key})$", name)` holds; None when none does.

    In linear time and without a loop over the keys: a binary tree of RE2 alternations over ranges of keys (the root
    holds all of them). A name that matches a range's alternation matches one of its keys, so it descends to the
    first such key in log2(len(keys)) matches, each a DFA run over the name (no captures).
    """

    def __init__(self, keys: tuple[str, ...], field: str) -> None:
        self.keys = keys
        self._ranges: dict[tuple[int, int], Any] = {}  # (lo, hi) -> the alternation of keys[lo:hi]
        try:
            self._build(0, len(keys))
        except re2.error:
            raise AdapterValidationError(f"{field}: its {len(keys)} patterns are too large to match together",
                                         field=field) from None

    def _build(self, lo: int, hi: int) -> None:
        if lo >= hi:
            return
        # (.*\.)? is common to every key: one prefix before the alternation keeps the DFA's states small.
        alternatives = "|".join(f"(?:{key})" for key in self.keys[lo:hi])
        self._ranges[(lo, hi)] = _linear_regex(rf"(?:.*\.)?(?:{alternatives})")
        if hi - lo > 1:
            mid = (lo + hi) // 2
            self._build(lo, mid)
            self._build(mid, hi)

    def first_match(self, name: str) -> str | None:
        lo, hi = 0, len(self.keys)
        if hi == 0 or self._ranges[(lo, hi)].fullmatch(name) is None:
            return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._ranges[(lo, mid)].fullmatch(name) is not None:
                hi = mid
            else:
                lo = mid
        return self.keys[lo]


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


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is the user's 400, not a line on the server's stderr
    options.never_capture = True  # only whether it matches: the DFA answers, no submatch extraction
    options.max_mem = 8 << 20  # RE2's default budget for one compiled program
    return options


def _linear_regex(pattern: str) -> Any:
    """The RE2 program of a pattern `_regex` accepted. re2.compile keeps the last 128 programs in a module-wide
    cache (up to `max_mem` each): emptied at once, so a program lives exactly as long as the spec holding it."""
    try:
        return re2.compile(pattern, _re2_options())
    finally:
        re2.purge()


def _regex(pattern: str, name: str, peft_form: str = "{}") -> str:
    """`pattern` when both Python's `re` (PEFT's engine) and RE2 (ours) compile it to the same meaning, else 400.
    `peft_form`: the expression PEFT embeds it in (a key of rank_pattern: `(.*\\.)?({})$`), compiled too."""
    shown = pattern if len(pattern) <= _SHOWN else pattern[:_SHOWN] + "..."
    if "[:" in pattern:
        raise AdapterValidationError(f"{name} pattern {shown!r}: '[:' (a POSIX character class in RE2, literal "
                                     "characters in Python) is ambiguous; escape the bracket or the colon", field=name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "possible nested set": the user's pattern, not ours
            re.compile(pattern)
            re.compile(peft_form.replace("{}", pattern))
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterValidationError(f"{name} has an invalid regex {shown!r}: {exc}", field=name) from None
    try:
        _linear_regex(pattern)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise AdapterValidationError(
            f"{name} pattern {shown!r} cannot be matched in linear time ({reason}); backreferences and look-around "
            "are not supported", field=name) from None
    return pattern


def _target_modules(value: Any) -> tuple[str, ...] | str:
    if isinstance(value, str) and value:
        return value if value == "all-linear" else _regex(value, "target_modules")
    if isinstance(value, list | tuple) and value and all(isinstance(t, str) and t for t in value):
        if len(value) > MAX_PATTERNS:
            raise AdapterValidationError(f"target_modules lists {len(value)} names; at most {MAX_PATTERNS}",
                                         field="target_modules")
        return tuple(dict.fromkeys(value))  # PEFT stores a set; keep the file's order, drop repeats
    raise AdapterValidationError(
        f"target_modules must be a non-empty list of module names or a regex string, got {_short(value)}",
        field="target_modules",
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _pattern(value: Any, name: str, check: Callable[[Any, str], Any]) -> dict[str, Any]:
    """rank_pattern / alpha_pattern: {regex-or-suffix: value}; absent or null means none."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise AdapterValidationError(f"{name} must be an object, got {_short(value)}", field=name)
    if len(value) > MAX_PATTERNS:
        raise AdapterValidationError(f"{name} has {len(value)} keys; at most {MAX_PATTERNS}", field=name)
    out: dict[str, Any] = {}
    for key, item in value.items():
        try:
            out[_regex(str(key), name, r"(.*\.)?({})$")] = check(item, f"{name}[{_short(key)}]")
        except AdapterValidationError as exc:
            raise AdapterValidationError(exc.message, field=name) from None
    return out
