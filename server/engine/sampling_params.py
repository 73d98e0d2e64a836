"""Per-request sampling parameters: one frozen, validated value the API layer builds and the engine reads."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MAX_TOKENS_LIMIT = 1_000_000
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
# torch.Generator.manual_seed accepts [-2**63, 2**64); OpenAI/vLLM document seeds as signed 64-bit.
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1
# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing logits by a subnormal temperature
# overflows to inf and turns the softmax into NaN, and no sampled distribution differs from argmax there.
GREEDY_TEMPERATURE_EPS = 1e-5
# OpenAI's ranges (vLLM's too): penalties in [-2, 2], logit_bias values in [-100, 100], at most 300 biased
# tokens, at most 20 alternatives per position (vLLM's default --max-logprobs).
MAX_PENALTY = 2.0
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 300
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    `temperature` below `GREEDY_TEMPERATURE_EPS` (0 included) or `top_k == 1` means greedy; `top_k` 0 or -1,
    `top_p` 1.0 and `min_p` 0.0 mean "off". `min_p` (vLLM's) drops tokens whose probability, after temperature,
    is below `min_p` times the most likely token's.
    `stop` strings are matched on detokenized text and excluded from the output (as OpenAI does);
    `stop_token_ids` end the request like EOS. `min_tokens` forbids EOS and stop tokens until that many
    tokens were generated. Lists given for `stop`/`stop_token_ids` are stored as tuples (hashable, frozen).

    Penalties follow vLLM: `repetition_penalty` divides the positive logits (multiplies the negative ones) of
    every token seen in the prompt or the output; `frequency_penalty` and `presence_penalty` subtract
    `f * count + p * (count > 0)` for tokens of the output only (OpenAI). `logit_bias` (a dict or pairs of
    token id -> bias) is stored as a sorted tuple of (id, bias) pairs; ids beyond the model's vocabulary are
    caught by the sampler, which knows it. `logprobs` / `prompt_logprobs`: how many top alternatives to
    report per generated / prompt position (0 = only the chosen token's). `max_tokens=0` is allowed only
    with `prompt_logprobs` (scoring a prompt without generating). `guided` is an opaque structured-output
    spec, stored as given.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    guided: object | None = None

    def __post_init__(self) -> None:
        # Frozen: normalise sequences through object.__setattr__ once, before anyone can read them.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _normalised_logit_bias(self.logit_bias))
        self._check_numbers()
        self._check_penalties()
        self._check_logprobs()
        self._check_lengths()
        self._check_stops()

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    def _check_numbers(self) -> None:
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not _SEED_MIN <= self.seed <= _SEED_MAX):
            raise ValueError(f"seed must be a 64-bit signed integer or None, got {self.seed!r}")

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
        rep = self.repetition_penalty
        if not _is_number(rep) or not 0 < rep <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be a number in (0, {MAX_REPETITION_PENALTY:g}], got {rep!r}")

    def _check_logprobs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}")

    def _check_lengths(self) -> None:
        # max_tokens=0 scores a prompt without generating (lm-eval's loglikelihood): only with prompt_logprobs.
        lowest = 0 if self.prompt_logprobs is not None else 1
        if not _is_int(self.max_tokens) or not lowest <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise ValueError(
                f"max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}] (0 only with prompt_logprobs), "
                f"got {self.max_tokens!r}"
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


def _normalised_logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """A dict {id: bias} or pairs (id, bias) -> sorted ((id, bias), ...); str ids as JSON keys carry them."""
    items = value.items() if isinstance(value, Mapping) else value
    if not isinstance(items, Iterable) or isinstance(items, str | bytes):
        raise ValueError(f"logit_bias must be a mapping or pairs of token id -> bias, got {value!r}")
    pairs = [_logit_bias_pair(item) for item in items]
    if len(pairs) > MAX_LOGIT_BIAS_TOKENS:
        raise ValueError(f"logit_bias allows at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(pairs)}")
    ids = [token for token, _ in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"logit_bias names a token id more than once: {sorted(ids)}")
    return tuple(sorted(pairs))


def _logit_bias_pair(item: object) -> tuple[int, float]:
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise ValueError(f"logit_bias entries must be (token id, bias) pairs, got {item!r}")
    token, bias = item
    if isinstance(token, str) and token.isascii() and token.isdigit():
        token = int(token)  # OpenAI's JSON object keys are strings: {"50256": -100}
    if not _is_int(token) or token < 0:
        raise ValueError(f"logit_bias token ids must be integers >= 0, got {token!r}")
    if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                         f"got {bias!r} for token {token}")
    return token, float(bias)


def _is_int(x: object) -> bool:
    # bool is an int subclass; `top_k=True` is a caller bug, not 1.
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)
