"""vLLM's utility routes: `POST /tokenize`, `POST /detokenize`, `GET /version`.

`/tokenize` takes a prompt (completion form) or chat messages (chat form, rendered with the model's chat template
exactly as `/v1/chat/completions` renders them) and answers vLLM's shape:
`{"count", "max_model_len", "tokens", "token_strs"}`. `model` may name the base model or any registered adapter:
adapters share the base's tokenizer, so the answer is the same; an unknown name is a 404 as for generation.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from fastapi import APIRouter, Depends, Request

from loraplex.server.api.auth import require_api_key
from loraplex.server.api.errors import ApiError
from loraplex.server.api.generation import check_loaded, check_token_ids, encode_text, resolve_adapter, runtime_of
from loraplex.server.api.routes_openai import chat_prompt_ids
from loraplex.server.api.schemas_openai import DetokenizeRequest, TokenizeRequest

router = APIRouter()


@router.post("/tokenize", dependencies=[Depends(require_api_key)])
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    rt = runtime_of(request)
    check_loaded(rt)
    resolve_adapter(rt, body.model, param="model", empty_is_base=True)  # 404 for an unknown name
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give either prompt or messages", param="prompt")
    if body.messages is not None:
        ids, _ = await chat_prompt_ids(rt, body.messages, body.add_generation_prompt, body.continue_final_message,
                                       bool(body.add_special_tokens))
    else:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await encode_text(rt, body.prompt, add_special_tokens=special)
    strs = rt.loaded.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": rt.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize", dependencies=[Depends(require_api_key)])
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    rt = runtime_of(request)
    check_loaded(rt)
    resolve_adapter(rt, body.model, param="model", empty_is_base=True)
    ids = check_token_ids(rt, body.tokens, param="tokens")
    return {"prompt": rt.loaded.tokenizer.decode(ids)}


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": server_version()}


def server_version() -> str:
    try:
        return importlib.metadata.version("loraplex")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return "0+unknown"
