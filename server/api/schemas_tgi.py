"""TGI / LoRAX request schema for `POST /generate`, `/generate_stream` and the compat route `POST /`.

Field names and defaults follow TGI and LoRAX (whose Python client sends every field, most as null).
`adapter_id` names a registered adapter; empty or null means the base model. Features this server does
not implement are refused with a 400 naming them, never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from loraplex.server.api.schemas_openai import (
    MaxTokens,
    NonEmptyText,
    StopList,
    StrictModel,
    Temperature,
    TopP,
    Unsupported,
)

# TGI's default when `max_new_tokens` is null.
DEFAULT_MAX_NEW_TOKENS = 100


class MergedAdapters(StrictModel):
    """LoRAX's `merged_adapters`: registered adapter ids with weights, and how to merge them."""

    ids: Annotated[list[NonEmptyText], Field(min_length=2, max_length=8)]
    weights: Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=2, max_length=8)]
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    density: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    majority_sign_method: Literal["total", "frequency"] = "total"


class TGIParameters(StrictModel):
    adapter_id: str | None = None
    adapter_source: str | None = None  # ignored: adapters are registered by name beforehand
    api_token: str | None = None  # ignored (for hub downloads, which this server never does)
    max_new_tokens: MaxTokens | None = None
    do_sample: bool = False
    temperature: Temperature | None = None
    top_k: Annotated[int, Field(gt=0)] | None = None
    top_p: TopP | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    stop: StopList = []
    ignore_eos_token: bool = False
    details: bool = False
    return_full_text: bool = False
    truncate: Annotated[int, Field(ge=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] | None = None
    best_of: Annotated[int, Field(ge=1, le=16)] | None = None
    decoder_input_details: bool = False
    top_n_tokens: Annotated[int, Field(ge=0, le=20)] | None = None
    return_k_alternatives: Annotated[int, Field(ge=0, le=20)] | None = None  # LoRAX's name for top_n_tokens
    merged_adapters: MergedAdapters | None = None
    response_format: dict | None = None  # LoRAX: {"type": "json_object", "schema": {...}}
    grammar: dict | None = None  # TGI: {"type": "json" | "regex", "value": ...}
    # Not implemented: refused by unsupported() when set to anything but their neutral value.
    typical_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    watermark: bool = False

    @property
    def sampling(self) -> bool:
        """TGI's rule: sample when asked to or when any warper is set; temperature 0 is always greedy."""
        warped = self.temperature not in (None, 1.0) or self.top_k is not None or self.top_p not in (None, 1.0)
        return (self.do_sample or warped) and self.temperature != 0

    def unsupported(self) -> Unsupported:
        checks = {"typical_p": self.typical_p not in (None, 1.0), "watermark": self.watermark}
        return [(f"parameters.{name}", name) for name, bad in checks.items() if bad]

    @property
    def top_alternatives(self) -> int | None:
        return self.top_n_tokens if self.top_n_tokens is not None else self.return_k_alternatives


class TGIRequest(StrictModel):
    inputs: NonEmptyText
    parameters: TGIParameters | None = None
    stream: bool = False  # read by the compat route `POST /` only, as in TGI

    @property
    def params(self) -> TGIParameters:
        return self.parameters or TGIParameters()
