"""TGI / LoRAX-compatible routes: `POST /generate`, `POST /generate_stream`, and `POST /` (TGI's compat
route, where LoRAX's Python client posts: it streams when the body says `"stream": true`, otherwise it
answers a list of one response).

Differences from TGI, documented rather than hidden: stop sequences are cut from the text (as OpenAI
does); typical_p and watermarking are refused with a 400 naming them. Supported beyond plain generation:
`details` (tokens with logprobs), `decoder_input_details` (the prompt's tokens with logprobs in
`details.prefill`), `top_n_tokens` (`details.top_tokens`), `best_of` (the best by cumulative logprob, the
others in `details.best_of_sequences`), repetition and frequency penalties, `grammar` (TGI) or
`response_format` (LoRAX) for structured output, and `merged_adapters` (LoRAX's per-request merging).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from loraplex.server.api.auth import KeysFirstRoute, require_api_key
from loraplex.server.api.errors import ApiError
from loraplex.server.api.generation import (
    CLIENT_GONE,
    EventStream,
    Generation,
    GenerationRequest,
    compile_guided,
    complete_all,
    encode_text,
    guided_or_400,
    make_params,
    recorded_rejections,
    refuse_unsupported,
    require_ready,
    resolve_adapter,
    resolve_merge,
    runtime_of,
    sse,
    start_choices,
    token_logprobs,
)
from loraplex.server.api.logprobs import TokenTexts
from loraplex.server.api.schemas_tgi import DEFAULT_MAX_NEW_TOKENS, TGIParameters, TGIRequest
from loraplex.server.engine.guided import GuidedSpec
from loraplex.server.engine.sampling_params import SamplingParams
from loraplex.server.runtime import Runtime

if TYPE_CHECKING:
    from loraplex.adapters.merge import MergeRecipe

router = APIRouter(route_class=KeysFirstRoute)
_GENERATION_DEPS = [Depends(require_api_key), Depends(require_ready)]


@router.post("/generate", dependencies=_GENERATION_DEPS)
async def generate(body: TGIRequest, request: Request) -> Response:
    generations = await _start(body, request, "/generate")
    return await _respond(generations, request, body, as_list=False)


@router.post("/generate_stream", dependencies=_GENERATION_DEPS)
async def generate_stream(body: TGIRequest, request: Request) -> Response:
    generations = await _start(body, request, "/generate_stream")
    return EventStream(_events(generations[0], body), generations, _error_event)


@router.post("/", dependencies=_GENERATION_DEPS)
async def compat_generate(body: TGIRequest, request: Request) -> Response:
    endpoint = "/generate_stream" if body.stream else "/generate"
    generations = await _start(body, request, endpoint)
    if body.stream:
        return EventStream(_events(generations[0], body), generations, _error_event)
    return await _respond(generations, request, body, as_list=True)


# ---- helpers -------------------------------------------------------------------------------------
async def _start(body: TGIRequest, request: Request, endpoint: str) -> list[Generation]:
    rt, arrival, p = runtime_of(request), time.perf_counter(), body.params
    with recorded_rejections(rt, endpoint, p.adapter_id, arrival):
        refuse_unsupported(p.unsupported())
        best_of = _best_of(p, body.stream or endpoint == "/generate_stream")
        merge = _merge(rt, p)
        adapter = None if merge else resolve_adapter(rt, p.adapter_id, param="adapter_id", empty_is_base=True)
        guided = await compile_guided(rt, _guided_spec(p),
                                      "parameters.grammar.value" if p.grammar else "parameters.response_format")
        ids = await encode_text(rt, body.inputs, param="inputs")
        if p.truncate is not None:
            ids = ids[-p.truncate:]  # TGI keeps the last `truncate` tokens
        req = GenerationRequest(endpoint, p.adapter_id, adapter, tuple(ids), _sampling(p, guided), arrival,
                                merge=merge)
        return start_choices(rt, req, best_of, "parameters.best_of")


def _best_of(p: TGIParameters, stream: bool) -> int:
    """TGI's rules: best_of > 1 needs sampling and cannot stream."""
    best_of = p.best_of or 1
    if best_of > 1 and not p.sampling:
        raise ApiError(422, "best_of > 1 needs sampling (do_sample or a temperature/top_k/top_p)",
                       param="parameters.best_of")
    if best_of > 1 and stream:
        raise ApiError(422, "best_of > 1 cannot stream", param="parameters.best_of")
    return best_of


def _merge(rt: Runtime, p: TGIParameters) -> MergeRecipe | None:
    m = p.merged_adapters
    if m is None:
        return None
    if len(m.ids) != len(m.weights):
        raise ApiError(422, f"merged_adapters: {len(m.ids)} ids but {len(m.weights)} weights",
                       param="parameters.merged_adapters.weights")
    pairs = [_Weighted(name, weight) for name, weight in zip(m.ids, m.weights, strict=True)]
    return resolve_merge(rt, p.adapter_id, pairs, m.merge_strategy, m.density, m.majority_sign_method,
                         param="parameters.merged_adapters.ids")


@dataclass(frozen=True)
class _Weighted:
    name: str
    weight: float


def _guided_spec(p: TGIParameters) -> GuidedSpec | None:
    """TGI's `grammar` ({"type": "json" | "regex", "value"}) or LoRAX's `response_format`
    ({"type": "json_object", "schema"?})."""
    if p.grammar is not None and p.response_format is not None:
        raise ApiError(422, "give grammar or response_format, not both", param="parameters.grammar")
    if p.grammar is not None:
        kind, value = p.grammar.get("type"), p.grammar.get("value")
        if kind == "json":
            return guided_or_400(lambda: GuidedSpec.json_schema(value), "parameters.grammar.value")
        if kind == "regex" and isinstance(value, str):
            return guided_or_400(lambda: GuidedSpec.regex(value), "parameters.grammar.value")
        raise ApiError(422, "grammar must be {\"type\": \"json\", \"value\": <schema>} or "
                            "{\"type\": \"regex\", \"value\": <pattern>}", param="parameters.grammar")
    fmt = p.response_format
    if fmt is None:
        return None
    if fmt.get("type") not in ("json_object", "json_schema"):
        raise ApiError(422, "response_format type must be json_object", param="parameters.response_format.type")
    schema = fmt.get("schema")
    if schema is None:
        return GuidedSpec.json_object()
    return guided_or_400(lambda: GuidedSpec.json_schema(schema), "parameters.response_format.schema")


def _sampling(p: TGIParameters, guided: GuidedSpec | None) -> SamplingParams:
    common: dict[str, Any] = {
        "max_tokens": p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, "stop": p.stop, "ignore_eos": p.ignore_eos_token,
        "repetition_penalty": p.repetition_penalty or 1.0, "frequency_penalty": p.frequency_penalty or 0.0,
        "logprobs": p.top_alternatives or 0, "prompt_logprobs": (p.top_alternatives or 0) if
        p.decoder_input_details else None, "guided": guided}
    if not p.sampling:
        return make_params(temperature=0.0, **common)
    # A drawn seed is reported back in `details.seed`, as TGI does, so a sampled answer can be replayed.
    return make_params(temperature=1.0 if p.temperature is None else p.temperature,
                       top_k=p.top_k or 0, top_p=1.0 if p.top_p is None else p.top_p,
                       seed=secrets.randbits(63) if p.seed is None else p.seed, **common)


def _finish_reason(rt: Runtime, generation: Generation) -> str:
    """TGI's names: length, eos_token, stop_sequence (our "stop" covers both of the latter)."""
    if generation.finish_reason == "length":
        return "length"
    last = generation.token_ids[-1] if generation.token_ids else None
    return "eos_token" if last in rt.engine.eos_ids else "stop_sequence"


def _token(rt: Runtime, token_id: int, text: str, logprob: float | None) -> dict[str, Any]:
    special = token_id in rt.loaded.tokenizer.all_special_ids
    return {"id": token_id, "text": text, "logprob": logprob, "special": special}


def _details(generation: Generation, *, stream: bool) -> dict[str, Any]:
    rt = generation.rt
    out: dict[str, Any] = {"finish_reason": _finish_reason(rt, generation),
                           "generated_tokens": len(generation.token_ids),
                           "prompt_tokens": generation.num_prompt_tokens, "seed": generation.req.params.seed}
    if not stream:
        out["prefill"] = _prefill(generation)
        out["tokens"] = [_token(rt, *token) for token in zip(generation.token_ids, generation.token_texts,
                                                                generation.token_logprobs, strict=True)]
        if generation.req.params.logprobs:
            out["top_tokens"] = [_top_tokens(rt, top) for top in generation.token_top_logprobs]
    return out


def _prefill(generation: Generation) -> list[dict[str, Any]]:
    """decoder_input_details: the prompt's tokens with their logprobs (the first has none)."""
    entries = generation.prompt_logprobs
    if entries is None:
        return []
    ids = list(generation.req.prompt_ids)
    texts = TokenTexts(generation.rt.loaded.tokenizer)(ids)
    return [{"id": i, "text": t, "logprob": e.logprob if e else None} for i, t, e in zip(ids, texts, entries,
                                                                                           strict=True)]


def _top_tokens(rt: Runtime, top: tuple[tuple[int, float], ...]) -> list[dict[str, Any]]:
    texts = TokenTexts(rt.loaded.tokenizer)([t for t, _ in top])
    return [_token(rt, t, text, lp) for (t, lp), text in zip(top, texts, strict=True)]


def _full_text(body: TGIRequest, generation: Generation) -> str:
    return (body.inputs if body.params.return_full_text else "") + generation.text


async def _respond(generations: list[Generation], request: Request, body: TGIRequest, *, as_list: bool
                   ) -> Response:
    if not await complete_all(generations, request):
        return Response(status_code=CLIENT_GONE)  # nobody is listening; the request was aborted
    ranked = sorted(generations, key=lambda g: -g.cumulative_logprob)  # best_of: the best first
    best = ranked[0]
    answer: dict[str, Any] = {"generated_text": _full_text(body, best)}
    if body.params.details:
        answer["details"] = _details(best, stream=False)
        if len(ranked) > 1:
            answer["details"]["best_of_sequences"] = [
                {"generated_text": _full_text(body, g), **_details(g, stream=False)} for g in ranked[1:]]
    return JSONResponse([answer] if as_list else answer)


async def _events(generation: Generation, body: TGIRequest) -> AsyncGenerator[str, None]:
    """One event per token, numbered by `index` from 0; the last carries the full text (and details when asked),
    as TGI sends them."""
    rt = generation.rt
    index = 0
    async for out in generation.outputs():
        if out.finish_reason == "error":
            yield _error_event(out.error or "generation failed")
            return
        tops = out.top_logprobs or [()] * len(out.new_token_ids)
        for i, (token_id, logprob) in enumerate(zip(out.new_token_ids, token_logprobs(out), strict=True)):
            last = out.finished and i == len(out.new_token_ids) - 1
            text = out.new_text if i == len(out.new_token_ids) - 1 else ""
            event = {"index": index, "token": _token(rt, token_id, text, logprob),
                     "generated_text": _full_text(body, generation) if last else None,
                     "details": _details(generation, stream=True) if last and body.params.details else None}
            if generation.req.params.logprobs:
                event["top_tokens"] = _top_tokens(rt, tops[i])
            index += 1
            yield sse(event)


def _error_event(message: str) -> str:
    return sse({"error": message, "error_type": "generation"})
