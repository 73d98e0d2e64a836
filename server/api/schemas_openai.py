"""OpenAI request schemas (completions, chat completions) with vLLM's extensions.

Strict on purpose. Numbers must be JSON numbers within their bounds (422 naming the field otherwise). Every
field OpenAI's or vLLM's current API defines is either implemented as they define it (a typed field below) or
listed in `_COMPLETION_NOT_IMPLEMENTED` / `_CHAT_NOT_IMPLEMENTED`, where it passes only at its neutral value
(null, or the value that means "off") and is otherwise refused by `unsupported()` with a 400 naming it. A few
harmless fields are accepted and ignored (`IGNORED`: user, metadata, service_tier, ...). Any other field is
refused with a 400 naming it as unknown: a misspelt `max_token` must not silently generate 16 tokens.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

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
MinP = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0)]
NonEmptyText = Annotated[str, StringConstraints(min_length=1)]
Unsupported = list[tuple[str, str]]  # (field, why it is refused)


class StrictModel(BaseModel):
    """Typed fields, strict types; unknown keys ignored (the TGI schema's base: LoRAX's client sends extras)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class ClosedModel(StrictModel):
    """A nested OpenAI object: an unknown key is refused (the error handler answers 400 naming it)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(ClosedModel):
    include_usage: bool = False
    # vLLM: usage in every chunk. OpenAI: random padding against length side channels. Neither implemented.
    continuous_usage_stats: Literal[False] | None = None
    include_obfuscation: Literal[False] | None = None


class AdapterWeight(ClosedModel):
    """One adapter of a merge (the `adapters` extension): a registered name and its weight."""

    name: NonEmptyText
    weight: Annotated[float, Field(allow_inf_nan=False)] = 1.0


class StructuredOutputs(ClosedModel):
    """vLLM's `structured_outputs` (since 0.12; the `guided_*` fields are its older spelling): exactly one of
    json / regex / choice / grammar / json_object, and options."""

    json_: dict | str | None = Field(None, alias="json")
    regex: NonEmptyText | None = None
    choice: Annotated[list[NonEmptyText], Field(min_length=1, max_length=256)] | None = None
    grammar: NonEmptyText | None = None  # llguidance's Lark syntax (EBNF rules `name: ...`)
    json_object: bool | None = None
    whitespace_pattern: NonEmptyText | None = None  # JSON only: the regex whitespace between tokens must match
    # Our JSON is already compact (one space after ':' and ','), and there is no fallback backend: both hold.
    disable_any_whitespace: bool = False
    disable_fallback: bool = False
    # Not implemented: refused by `problems()` when set.
    disable_additional_properties: bool = False
    structural_tag: str | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    def problems(self) -> Unsupported:
        out = []
        if self.disable_additional_properties:
            out.append(("structured_outputs.disable_additional_properties",
                        "not implemented (write \"additionalProperties\": false in the schema instead)"))
        if self.structural_tag is not None:
            out.append(("structured_outputs.structural_tag", "structural tags are not implemented"))
        return out


LogprobCount = Annotated[int, Field(ge=0, le=20)]

# Fields of OpenAI's or vLLM's current API this server does not implement: field -> (neutral values, why).
# A request may send a field at a neutral value (clients fill in defaults); anything else is a 400 naming it.
_BOTH_NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_beam_search": ((False,), "beam search is not implemented"),
    "length_penalty": ((1, 1.0), "length_penalty applies to beam search, which is not implemented"),
    "include_stop_str_in_output": ((False,), "stop strings are always cut from the output"),
    "spaces_between_special_tokens": ((True,), "special tokens are always detokenized with spaces between them"),
    "truncate_prompt_tokens": ((), "prompt truncation is not implemented (send a shorter prompt)"),
    "truncation_side": ((), "prompt truncation is not implemented"),
    "allowed_token_ids": ((), "allowed_token_ids is not implemented (logit_bias -100 bans tokens)"),
    "bad_words": (([],), "bad_words is not implemented (logit_bias -100 bans tokens)"),
    "logprob_token_ids": ((), "logprob_token_ids is not implemented (use logprobs / top_logprobs)"),
    "watermarking": ((False,), "watermarking is not implemented"),
    "priority": ((0,), "priority scheduling is not implemented (fair sharing across adapters is)"),
    "return_tokens_as_token_ids": ((False,), "return_tokens_as_token_ids is not implemented"),
    "return_token_ids": ((False,), "return_token_ids is not implemented"),
    "kv_transfer_params": ((), "disaggregated serving (kv_transfer_params) is not implemented"),
    "ec_transfer_params": ((), "disaggregated serving (ec_transfer_params) is not implemented"),
    "vllm_xargs": ((), "vllm_xargs (custom extensions) is not implemented"),
    "logits_processors": ((), "custom logits processors are not implemented"),
    "repetition_detection": ((), "repetition_detection is not implemented"),
    "thinking_token_budget": ((-1,), "thinking_token_budget is for reasoning models, not implemented"),
    "routed_experts_prompt_start": ((0,), "routed-expert data is not implemented"),
    "stream_interval": ((1,), "stream_interval is not implemented (every token is sent as it comes)"),
    "prompt_embeds": ((), "prompt_embeds is not implemented (send text or token ids)"),
    "mm_processor_kwargs": ((), "multimodal inputs are not implemented"),
    "media_io_kwargs": ((), "multimodal inputs are not implemented"),
}
_COMPLETION_NOT_IMPLEMENTED = {
    **_BOTH_NOT_IMPLEMENTED,
    "suffix": (("",), "suffix (fill-in-the-middle) is not implemented"),
}
_CHAT_NOT_IMPLEMENTED = {
    **_BOTH_NOT_IMPLEMENTED,
    "audio": ((), "audio output is not implemented"),
    "modalities": ((["text"],), "only the text modality is implemented"),
    "functions": (([],), "function calling is not implemented"),
    "function_call": (("none",), "function calling is not implemented"),
    "tool_choice": (("none", "auto"), "tools and function calling are not implemented"),
    "prediction": ((), "predicted outputs are not implemented"),
    "reasoning_effort": ((), "reasoning_effort is for reasoning models, not implemented"),
    "verbosity": ((), "verbosity is not implemented"),
    "web_search_options": ((), "web search is not implemented"),
    "echo": ((False,), "echo for chat (prepending the last message) is not implemented"),
    "documents": (([],), "documents (RAG templates) are not implemented"),
    "chat_template": ((), "a per-request chat_template is refused (the model's own template is used)"),
    "chat_template_kwargs": (({},), "chat_template_kwargs is not implemented"),
}
# Harmless fields accepted and ignored: labels and hints about billing, storage or caching that change nothing
# in the output.
IGNORED = frozenset({
    "user", "metadata", "service_tier", "store", "safety_identifier", "prompt_cache_key", "session_id",
    "parallel_tool_calls", "include_reasoning", "return_token_offsets", "return_mm_kwargs", "disable_fallback",
})
# The guided_* spelling of structured_outputs' options that were never typed fields here.
_DECODING_BACKENDS = ("auto", "guidance", "llguidance")


def _is_neutral(value: object, neutral: tuple[Any, ...]) -> bool:
    return value is None or any(value == n and type(value) is type(n) for n in neutral) or (
        isinstance(value, int | float) and not isinstance(value, bool) and any(
            isinstance(n, int | float) and not isinstance(n, bool) and value == n for n in neutral))


class _SamplingFields(StrictModel):
    """Fields shared by both endpoints (OpenAI's, then vLLM's extensions). Keys no field declares land in
    `model_extra` and are judged by `unsupported()`."""

    model_config = ConfigDict(extra="allow", strict=True)
    _not_implemented: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {}

    model: str | None = None  # None: the served base model (vLLM's rule)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: StopList | None = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None  # chat's field; vLLM takes it on completions too
    # vLLM extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: MinP | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)] = 0
    stop_token_ids: Annotated[list[TokenId], Field(max_length=_MAX_STOP_TOKEN_IDS)] | None = None
    skip_special_tokens: bool = True
    repetition_penalty: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] | None = None
    prompt_logprobs: LogprobCount | None = None
    request_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None  # the response id
    # Only requests with the same salt share prefix-cache blocks (tenants that must not see each other's timing).
    cache_salt: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    # Structured output: vLLM's current field, and its older guided_* spelling (aliases).
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: NonEmptyText | None = None
    guided_choice: Annotated[list[NonEmptyText], Field(min_length=1, max_length=256)] | None = None
    guided_grammar: NonEmptyText | None = None
    guided_whitespace_pattern: NonEmptyText | None = None
    guided_decoding_backend: str | None = None  # only llguidance's names: the one backend here
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
        """Fields this server does not implement, set to a value that asks for them, and unknown fields: (field,
        why) pairs (-> 400 naming the first)."""
        out: Unsupported = []
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED:
                continue
            known = self._not_implemented.get(name)
            if known is None:
                out.append((name, f"unknown field {name!r} (not part of OpenAI's or vLLM's API for this "
                                  "endpoint; see docs/api.md)"))
            elif not _is_neutral(value, known[0]):
                out.append((name, f"{name}: {known[1]}"))
        if self.structured_outputs is not None:
            out += self.structured_outputs.problems()
        backend = self.guided_decoding_backend
        if backend is not None and backend not in _DECODING_BACKENDS:
            out.append(("guided_decoding_backend", f"guided_decoding_backend: this server's only backend is "
                                                   f"llguidance ({', '.join(_DECODING_BACKENDS)}), not {backend!r}"))
        return out

    @property
    def choices(self) -> int:
        return self.n or 1


class CompletionRequest(_SamplingFields):
    _not_implemented: ClassVar = _COMPLETION_NOT_IMPLEMENTED

    # One prompt: a string, a list holding one string, token ids, or a list holding one list of ids.
    prompt: str | list[int] | list[str] | list[list[int]]
    # 0: generate nothing, score the prompt (with echo + logprobs, or prompt_logprobs), as lm-eval asks.
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)] | None = 16
    echo: bool = False
    logprobs: LogprobCount | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    add_special_tokens: bool = True  # vLLM: BOS etc. added to a text prompt

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: object) -> object:
        # One clear message instead of one per union member; token ids' range is checked against the model.
        if not _is_prompt(value):
            raise ValueError("prompt must be a non-empty string, a non-empty list of token ids, "
                             "or a list of such prompts")
        return value

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


class ChatMessage(ClosedModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # handed to the chat template, as vLLM does
    # OpenAI's assistant/tool message fields: tool calls are not implemented (refused when set).
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    function_call: dict | None = None
    refusal: str | None = None
    audio: dict | None = None
    reasoning_content: str | None = None  # vLLM: a reasoning model's earlier thinking (dropped, as its templates do)
    reasoning: str | None = None


class ChatCompletionRequest(_SamplingFields):
    _not_implemented: ClassVar = _CHAT_NOT_IMPLEMENTED

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    # None: up to the end of the context (OpenAI's default for chat); max_completion_tokens wins if set.
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = False
    top_logprobs: LogprobCount | None = None
    tools: list[dict] | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None  # vLLM takes it on chat too
    # vLLM extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the chat template adds the model's special tokens itself

    def unsupported(self) -> Unsupported:
        out = super().unsupported()
        if self.tools:
            out.append(("tools", "tools: tools and function calling are not implemented"))
        for i, msg in enumerate(self.messages):
            for part in msg.content if isinstance(msg.content, list) else []:
                if part.type != "text" or part.text is None:
                    out.append((f"messages.{i}.content", f"messages.{i}.content: content parts of type "
                                                         f"{part.type!r} are not implemented (text only)"))
            for name in ("tool_calls", "tool_call_id", "function_call", "audio"):
                if getattr(msg, name):
                    out.append((f"messages.{i}.{name}", f"messages.{i}.{name}: tool calls and audio are not "
                                                         "implemented"))
        return out

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)


class TokenizeRequest(ClosedModel):
    """vLLM's `POST /tokenize`: a prompt (completion form) or messages (chat form), never both."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (as vLLM)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(ClosedModel):
    """vLLM's `POST /detokenize`."""

    model: str | None = None
    tokens: Annotated[list[TokenId], Field(max_length=1_000_000)]
