"""OpenAI request schemas (completions, chat completions) with vLLM's extensions.

Strict on purpose: numbers must be JSON numbers within their bounds (422 naming the field otherwise),
unknown fields are ignored (clients send many optional ones), and features we do not implement are
accepted by the schema but refused by `unsupported()` with a 400 that names them, rather than being
silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from loraplex.server.engine.sampling_params import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKENS_LIMIT,
)

_MAX_STOP_TOKEN_IDS = 64
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # signed 64-bit, as OpenAI and vLLM document it
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
# A single string is accepted too (normalized to a list before validation, so errors name `stop.<i>`).
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0)]
NonEmptyText = Annotated[str, StringConstraints(min_length=1)]
Unsupported = list[tuple[str, str]]  # (field, what was asked for)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class AdapterWeight(StrictModel):
    """One adapter of a merge (the `adapters` extension): a registered name and its weight."""

    name: NonEmptyText
    weight: Annotated[float, Field(allow_inf_nan=False)] = 1.0


LogprobCount = Annotated[int, Field(ge=0, le=20)]


class _SamplingFields(StrictModel):
    """Fields shared by both endpoints (OpenAI's, then vLLM's extensions)."""

    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: StopList | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored
    # vLLM extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)] = 0
    stop_token_ids: Annotated[list[TokenId], Field(max_length=_MAX_STOP_TOKEN_IDS)] | None = None
    skip_special_tokens: bool = True
    repetition_penalty: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] | None = None
    prompt_logprobs: LogprobCount | None = None
    # Structured output (vLLM's extensions; response_format is on chat).
    guided_json: dict | str | None = None
    guided_regex: NonEmptyText | None = None
    guided_choice: Annotated[list[NonEmptyText], Field(min_length=1, max_length=256)] | None = None
    # Adapter merging (LoRAX's feature): "model" names the base model, these adapters are combined.
    adapters: Annotated[list[AdapterWeight], Field(min_length=2, max_length=8)] | None = None
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    density: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    majority_sign_method: Literal["total", "frequency"] = "total"

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def unsupported(self) -> Unsupported:
        """Fields set to values this server does not implement (→ 400 naming them)."""
        return []

    @property
    def choices(self) -> int:
        return self.n or 1


class CompletionRequest(_SamplingFields):
    # One prompt: a string, a list holding one string, token ids, or a list holding one list of ids.
    prompt: str | list[int] | list[str] | list[list[int]]
    # 0: generate nothing, score the prompt (with echo + logprobs, or prompt_logprobs), as lm-eval asks.
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)] | None = 16
    echo: bool = False
    logprobs: LogprobCount | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: object) -> object:
        # One clear message instead of one per union member; token ids' range is checked against the model.
        if not _is_prompt(value):
            raise ValueError("prompt must be a non-empty string, a non-empty list of token ids, "
                             "or a list of such prompts")
        return value

    def unsupported(self) -> Unsupported:
        out = super().unsupported()
        if self.suffix:
            out.append(("suffix", "suffix"))
        return out

    @property
    def requested_max_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default for completions

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or token ids (a batch of prompts: choices are numbered prompt by prompt)."""
        return list(self.prompt) if _is_batch(self.prompt) else [self.prompt]


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _is_prompt(value: object) -> bool:
    if isinstance(value, str):
        return bool(value)
    if _is_ids(value):
        return True
    if not isinstance(value, list) or not value:
        return False
    return all(isinstance(p, str) and p for p in value) or all(_is_ids(p) for p in value)


def _is_batch(prompt: object) -> bool:
    return isinstance(prompt, list) and isinstance(prompt[0], str | list)


class ContentPart(StrictModel):
    """Any content part; only "text" is supported, others are refused with 400 naming their type."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    # None: up to the end of the context (OpenAI's default for chat); max_completion_tokens wins if set.
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: LogprobCount | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None
    # vLLM extension
    add_generation_prompt: bool = True

    def unsupported(self) -> Unsupported:
        out = super().unsupported()
        if self.tools:
            out.append(("tools", "tools and function calling"))
        for i, msg in enumerate(self.messages):
            for part in msg.content if isinstance(msg.content, list) else []:
                if part.type != "text" or part.text is None:
                    out.append((f"messages.{i}.content", f"content parts of type {part.type!r} (text only)"))
        return out

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
