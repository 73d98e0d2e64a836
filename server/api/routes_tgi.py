"""TGI / LoRAX-compatible routes: `POST /generate`, `POST /generate_stream`, and `POST /` (TGI's compat
route, where LoRAX's Python client posts: it streams when the body says `"stream": true`, otherwise it
answers a list of one response).

Differences from TGI, documented rather than hidden: stop sequences are cut from the text (as OpenAI
does); `token.logprob` is null while the engine reports no log-probabilities (TGI's schema marks the
field nullable, but LoRAX's Python client requires a number there); decoder_input_details, best_of > 1,
penalties, typical_p and watermarking are refused with a 400 naming them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from loraplex.server.api.auth import require_api_key
from loraplex.server.api.generation import (
    CLIENT_GONE,
    EventStream,
    Generation,
    GenerationRequest,
    encode_text,
    make_params,
    recorded_rejections,
    refuse_unsupported,
    require_ready,
    resolve_adapter,
    runtime_of,
    sse,
    start,
    token_logprobs,
)
from loraplex.server.api.schemas_tgi import DEFAULT_MAX_NEW_TOKENS, TGIParameters, TGIRequest
from loraplex.server.engine.sampling_params import SamplingParams
from loraplex.server.runtime import Runtime

router = APIRouter()
_GENERATION_DEPS = [Depends(require_api_key), Depends(require_ready)]


@router.post("/generate", dependencies=_GENERATION_DEPS)
async def generate(body: TGIRequest, request: Request) -> Response:
    generation = await _start(body, request, "/generate")
    return await _respond(generation, request, body, as_list=False)


@router.post("/generate_stream", dependencies=_GENERATION_DEPS)
async def generate_stream(body: TGIRequest, request: Request) -> Response:
    generation = await _start(body, request, "/generate_stream")
    return EventStream(_events(generation, body), generation, _error_event)


@router.post("/", dependencies=_GENERATION_DEPS)
async def compat_generate(body: TGIRequest, request: Request) -> Response:
    endpoint = "/generate_stream" if body.stream else "/generate"
    generation = await _start(body, request, endpoint)
    if body.stream:
        return EventStream(_events(generation, body), generation, _error_event)
    return await _respond(generation, request, body, as_list=True)


# ---- helpers -------------------------------------------------------------------------------------
async def _start(body: TGIRequest, request: Request, endpoint: str) -> Generation:
    rt, arrival, p = runtime_of(request), time.perf_counter(), body.params
    with recorded_rejections(rt, endpoint, p.adapter_id, arrival):
        refuse_unsupported(p.unsupported())
        adapter = resolve_adapter(rt, p.adapter_id, param="adapter_id", empty_is_base=True)
        ids = await encode_text(rt, body.inputs, param="inputs")
        if p.truncate is not None:
            ids = ids[-p.truncate:]  # TGI keeps the last `truncate` tokens
        req = GenerationRequest(endpoint, p.adapter_id, adapter, tuple(ids), _sampling(p), arrival)
        return start(rt, req)


def _sampling(p: TGIParameters) -> SamplingParams:
    if not p.sampling:
        return make_params(max_tokens=p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, temperature=0.0, stop=p.stop,
                           ignore_eos=p.ignore_eos_token)
    # A drawn seed is reported back in `details.seed`, as TGI does, so a sampled answer can be replayed.
    return make_params(max_tokens=p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                       temperature=1.0 if p.temperature is None else p.temperature,
                       top_k=p.top_k or 0, top_p=1.0 if p.top_p is None else p.top_p,
                       seed=secrets.randbits(63) if p.seed is None else p.seed, stop=p.stop,
                       ignore_eos=p.ignore_eos_token)


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
        out["prefill"] = []
        out["tokens"] = [_token(rt, *token) for token in zip(generation.token_ids, generation.token_texts,
                                                                generation.token_logprobs, strict=True)]
    return out


def _full_text(body: TGIRequest, generation: Generation) -> str:
    return (body.inputs if body.params.return_full_text else "") + generation.text


async def _respond(generation: Generation, request: Request, body: TGIRequest, *, as_list: bool) -> Response:
    if not await generation.complete(request):
        return Response(status_code=CLIENT_GONE)  # nobody is listening; the request was aborted
    answer: dict[str, Any] = {"generated_text": _full_text(body, generation)}
    if body.params.details:
        answer["details"] = _details(generation, stream=False)
    return JSONResponse([answer] if as_list else answer)


async def _events(generation: Generation, body: TGIRequest) -> AsyncGenerator[str, None]:
    """One event per token; the last carries the full text (and details when asked), as TGI sends them."""
    rt = generation.rt
    async for out in generation.outputs():
        if out.finish_reason == "error":
            yield _error_event(out.error or "generation failed")
            return
        for i, (token_id, logprob) in enumerate(zip(out.new_token_ids, token_logprobs(out), strict=True)):
            last = out.finished and i == len(out.new_token_ids) - 1
            text = out.new_text if i == len(out.new_token_ids) - 1 else ""
            yield sse({"token": _token(rt, token_id, text, logprob),
                       "generated_text": _full_text(body, generation) if last else None,
                       "details": _details(generation, stream=True) if last and body.params.details else None})


def _error_event(message: str) -> str:
    return sse({"error": message, "error_type": "generation"})
