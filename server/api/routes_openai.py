"""OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

`model` is a registered adapter's name, or the served base model's name for no adapter. Streaming
answers are server-sent events ending with `data: [DONE]`; an error after the stream has started is sent
as one `data: {"error": {...}}` event, then `[DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from loraplex.server.api.auth import require_api_key
from loraplex.server.api.chat import ChatTurn, build_chat_prompt
from loraplex.server.api.errors import ApiError
from loraplex.server.api.generation import (
    CLIENT_GONE,
    EventStream,
    Generation,
    GenerationRequest,
    check_loaded,
    check_token_ids,
    context_room,
    encode_text,
    make_params,
    quote,
    recorded_rejections,
    refuse_unsupported,
    require_ready,
    resolve_adapter,
    runtime_of,
    sse,
    start,
)
from loraplex.server.api.schemas_openai import ChatCompletionRequest, ChatMessage, CompletionRequest
from loraplex.server.engine.sampling_params import SamplingParams
from loraplex.server.runtime import Runtime

router = APIRouter()
_GENERATION_DEPS = [Depends(require_api_key), Depends(require_ready)]
_STARTED = int(time.time())
_SamplingBody = CompletionRequest | ChatCompletionRequest


# ---- response shapes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Shape:
    """What differs between the two endpoints' response objects."""

    endpoint: str
    object: str
    chunk_object: str
    id_prefix: str

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return self.choice(text, finish_reason)

    def opening_choice(self) -> dict[str, Any] | None:
        return None


class _ChatShape(_Shape):
    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def chunk_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                "finish_reason": finish_reason}

    def opening_choice(self) -> dict[str, Any] | None:
        # The first chat chunk carries the role, as OpenAI's does.
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


COMPLETION = _Shape("/v1/completions", "text_completion", "text_completion", "cmpl-")
CHAT = _ChatShape("/v1/chat/completions", "chat.completion", "chat.completion.chunk", "chatcmpl-")


# ---- routes --------------------------------------------------------------------------------------
@router.post("/v1/completions", dependencies=_GENERATION_DEPS)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _respond(await _start(request, body, COMPLETION, _completion_prompt_ids), request, body, COMPLETION)


@router.post("/v1/chat/completions", dependencies=_GENERATION_DEPS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _respond(await _start(request, body, CHAT, _chat_prompt_ids), request, body, CHAT)


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def list_models(request: Request) -> dict[str, Any]:
    rt = runtime_of(request)
    check_loaded(rt)  # no base model to list before it loaded (or after it failed to)
    names = rt.store.names() if rt.store is not None else []
    return {"object": "list", "data": [_base_card(rt)] + [_adapter_card(rt, name) for name in names]}


@router.get("/v1/models/{model_id}", dependencies=[Depends(require_api_key)])
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    rt = runtime_of(request)
    check_loaded(rt)
    if model_id == rt.served_model_name:
        return _base_card(rt)
    if rt.store is not None and model_id in rt.store:
        return _adapter_card(rt, model_id)
    raise ApiError(404, f"model {quote(model_id)} not found", param="model")


# ---- helpers -------------------------------------------------------------------------------------
async def _start(request: Request, body: _SamplingBody, shape: _Shape,
                 prompt_ids: Callable[[Runtime, Any], Awaitable[list[int]]]) -> Generation:
    rt, arrival = runtime_of(request), time.perf_counter()
    with recorded_rejections(rt, shape.endpoint, body.model, arrival):
        refuse_unsupported(body.unsupported())
        adapter = resolve_adapter(rt, body.model, param="model", empty_is_base=False)
        ids = await prompt_ids(rt, body)
        params = _sampling(body, body.requested_max_tokens or context_room(rt, len(ids)))
        return start(rt, GenerationRequest(shape.endpoint, body.model, adapter, tuple(ids), params, arrival))


async def _completion_prompt_ids(rt: Runtime, body: CompletionRequest) -> list[int]:
    prompt = body.single_prompt()
    return await encode_text(rt, prompt) if isinstance(prompt, str) else check_token_ids(rt, prompt, param="prompt")


def _sampling(body: _SamplingBody, max_tokens: int) -> SamplingParams:
    return make_params(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
        stop=tuple(body.stop or ()), stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens, skip_special_tokens=body.skip_special_tokens)


async def _chat_prompt_ids(rt: Runtime, body: ChatCompletionRequest) -> list[int]:
    turns = [ChatTurn(m.role, _content_text(m)) for m in body.messages]
    prompt = await run_in_threadpool(build_chat_prompt, rt.loaded.tokenizer, turns, body.add_generation_prompt)
    return await encode_text(rt, prompt.text, add_special_tokens=not prompt.templated, param="messages")


def _content_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.text or "" for part in message.content)  # text parts only (others refused)


def _base_card(rt: Runtime) -> dict[str, Any]:
    return {"id": rt.served_model_name, "object": "model", "created": _STARTED, "owned_by": "loraplex",
            "root": rt.served_model_name, "parent": None, "max_model_len": rt.config.engine.max_model_len}


def _adapter_card(rt: Runtime, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(rt.store.get(name).created_at), "owned_by": "loraplex",
            "root": name, "parent": rt.served_model_name}


def _usage(generation: Generation) -> dict[str, int]:
    n_prompt, n_out = generation.num_prompt_tokens, len(generation.token_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def _head(generation: Generation, shape: _Shape, object_: str) -> dict[str, Any]:
    return {"id": shape.id_prefix + generation.req.request_id, "object": object_, "created": int(time.time()),
            "model": generation.req.model}


async def _respond(generation: Generation, request: Request, body: _SamplingBody, shape: _Shape) -> Response:
    if body.stream:
        return EventStream(_events(generation, body.include_usage, shape), generation, _error_events)
    if not await generation.complete(request):
        return Response(status_code=CLIENT_GONE)  # nobody is listening; the request was aborted
    return JSONResponse({**_head(generation, shape, shape.object),
                         "choices": [shape.choice(generation.text, generation.finish_reason)],
                         "usage": _usage(generation)})


async def _events(generation: Generation, include_usage: bool, shape: _Shape) -> AsyncGenerator[str, None]:
    head = _head(generation, shape, shape.chunk_object)
    usage_slot: dict[str, Any] = {"usage": None} if include_usage else {}
    opening = shape.opening_choice()
    if opening is not None:
        yield sse({**head, "choices": [opening], **usage_slot})
    async for out in generation.outputs():
        if out.finish_reason == "error":
            yield _error_events(out.error or "generation failed", generation.failure_status)
            return
        if out.new_text or out.finished:
            yield sse({**head, "choices": [shape.chunk_choice(out.new_text, out.finish_reason)], **usage_slot})
    if include_usage:
        yield sse({**head, "choices": [], "usage": _usage(generation)})
    yield sse("[DONE]")


def _error_events(message: str, status: int = 500) -> str:
    """An error once the stream has started: one event with OpenAI's error object, then [DONE]."""
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": status}}) + sse("[DONE]")
