"""`--generation-config auto|vllm|PATH`: the sampling defaults a model's creator recommends, as vLLM applies them.

`auto` (the default) reads `generation_config.json` beside the model's weights; `PATH` reads it from another
folder (or names the file itself); `vllm` uses none, so every omitted field takes OpenAI's default. Only the
keys vLLM takes are used: `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, and
`max_new_tokens` (becoming the default `max_tokens` of a chat request that sets none). A request's own values
always win. As in vLLM, `do_sample` is not read: a file that sets a temperature is sampled at that
temperature.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

FILENAME = "generation_config.json"
# generation_config.json key -> (request field, the values it may hold)
_KEYS: dict[str, tuple[str, str]] = {
    "temperature": ("temperature", "a number >= 0"),
    "top_p": ("top_p", "a number in (0, 1]"),
    "top_k": ("top_k", "an integer >= -1"),
    "min_p": ("min_p", "a number in [0, 1]"),
    "repetition_penalty": ("repetition_penalty", "a number in (0, 10]"),
    "max_new_tokens": ("max_tokens", "an integer >= 1"),
}


def _valid(key: str, value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return {
        "temperature": value >= 0,
        "top_p": 0 < value <= 1,
        "top_k": isinstance(value, int) and value >= -1,
        "min_p": 0 <= value <= 1,
        "repetition_penalty": 0 < value <= 10,
        "max_new_tokens": isinstance(value, int) and value >= 1,
    }[key]


def check_choice(choice: str) -> None:
    """ValueError naming the flag unless `choice` is auto, vllm, or an existing folder / file."""
    if choice in ("auto", "vllm"):
        return
    if not Path(choice).exists():
        raise ValueError(f"--generation-config: expected auto, vllm or a folder holding {FILENAME}, got "
                         f"{choice!r} (no such file or folder)")


def sampling_defaults(choice: str, model_dir: Path | None) -> dict[str, float]:
    """The request defaults `choice` gives for the model in `model_dir` ({} for `vllm` or when no file sets any).
    ValueError (naming the flag and the file) for a file that is not JSON or holds an invalid value."""
    if choice == "vllm":
        return {}
    path = Path(model_dir) / FILENAME if choice == "auto" and model_dir is not None else Path(choice)
    if choice != "auto" and path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        if choice != "auto":
            raise ValueError(f"--generation-config: {path} does not exist")
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--generation-config: cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--generation-config: {path} must hold a JSON object")
    defaults: dict[str, float] = {}
    for key, (field, expected) in _KEYS.items():
        value = raw.get(key)
        if value is None:
            continue
        if not _valid(key, value):
            raise ValueError(f"--generation-config: {path}: {key} must be {expected}, got {value!r}")
        defaults[field] = value
    if defaults:
        shown = ", ".join(f"{k}={v}" for k, v in defaults.items())
        log.info("sampling defaults from %s: %s (a request's own values win; --generation-config vllm ignores "
                 "the file)", path, shown)
    return defaults
