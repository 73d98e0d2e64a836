"""Per-request sampling parameters: one frozen, validated value the API layer builds and the engine reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_TOKENS_LIMIT = 1_000_000
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
# torch.Generator.manual_seed accepts [-2**63, 2**64); OpenAI/vLLM document seeds as signed 64-bit.
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1
# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing logits by a subnormal temperature
# overflows to inf and turns the softmax into NaN, and no sampled distribution differs from argmax there.
GREEDY_TEMPERATURE_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    `temperature` below `GREEDY_TEMPERATURE_EPS` (0 included) or `top_k == 1` means greedy; `top_k` 0 or -1
    and `top_p` 1.0 mean "off".
    `stop` strings are matched on detokenized text and excluded from the output (as OpenAI does);
    `stop_token_ids` end the request like EOS. `min_tokens` forbids EOS and stop tokens until that many
    tokens were generated. Lists given for `stop`/`stop_token_ids` are stored as tuples (hashable, frozen).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Frozen: normalise sequences through object.__setattr__ once, before anyone can read them.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._check_numbers()
        self._check_lengths()
        self._check_stops()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    def _check_numbers(self) -> None:
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not _SEED_MIN <= self.seed <= _SEED_MAX):
            raise ValueError(f"seed must be a 64-bit signed integer or None, got {self.seed!r}")

    def _check_lengths(self) -> None:
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise ValueError(
                f"max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}], got {self.max_tokens!r}"
            )
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}"
            )

    def _check_stops(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop allows at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} chars, got {len(s)}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}")


def _is_int(x: object) -> bool:
    # bool is an int subclass; `top_k=True` is a caller bug, not 1.
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)
