"""OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

`model` is a registered adapter's name, or the served base model's name for no adapter. Streaming
answers are server-sent events ending with `data: [DONE]`; an error after the stream has started is sent
as one `data: {"error": {...}}` event, then `[DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from loraplex.server.api.auth import KeysFirstRoute, require_api_key
from loraplex.server.api.chat import ChatTurn, build_chat_prompt
from loraplex.server.api.errors import ApiError
from loraplex.server.api.generation import (
    CLIENT_GONE,
    EventStream,
    Generation,
    GenerationRequest,
    check_loaded,
    check_token_ids,
    compile_guided,
    complete_all,
    context_room,
    encode_text,
    guided_or_400,
    make_params,
    merged_outputs,
    plan_choices,
    quote,
    recorded_rejections,
    refuse_unsupported,
    require_ready,
    resolve_adapter,
    resolve_merge,
    runtime_of,
    sse,
    start_planned,
)
from loraplex.server.api.logprobs import (
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    padded_tops,
    vllm_prompt_logprobs,
)
from loraplex.server.api.schemas_openai import ChatCompletionRequest, ChatMessage, CompletionRequest
from loraplex.server.engine.guided import GuidedSpec
from loraplex.server.engine.request import RequestOutput
from loraplex.server.engine.sampling_params import MAX_LOGIT_BIAS_TOKENS, SamplingParams
from loraplex.server.runtime import Runtime

router = APIRouter(route_class=KeysFirstRoute)
_GENERATION_DEPS = [Depends(require_api_key), Depends(require_ready)]
_STARTED = int(time.time())
_SamplingBody = CompletionRequest | ChatCompletionRequest
MAX_PROMPTS = 64  # prompts in one completions request (lm-eval batches them)


# ---- response shapes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Shape:
    """What differs between the two endpoints' response objects."""

    endpoint: str
    object: str
    chunk_object: str
    id_prefix: str

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def chunk_choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None
                     ) -> dict[str, Any]:
        return self.choice(index, text, finish_reason, logprobs)

    def opening_choice(self, index: int) -> dict[str, Any] | None:
        return None


class _ChatShape(_Shape):
    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def chunk_choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None
                     ) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def opening_choice(self, index: int) -> dict[str, Any] | None:
        # The first chat chunk carries the role, as OpenAI's does.
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}


COMPLETION = _Shape("/v1/completions", "text_completion", "text_completion", "cmpl-")
CHAT = _ChatShape("/v1/chat/completions", "chat.completion", "chat.completion.chunk", "chatcmpl-")


@dataclass(frozen=True)
class _Prompt:
    ids: list[int]
    text: str  # what `echo` puts before the completion


@dataclass
class _Run:
    """One HTTP request's generations: for each prompt, `per_prompt` choices (best_of, else n), in order."""

    body: Any  # CompletionRequest | ChatCompletionRequest
    shape: _Shape
    prompts: list[_Prompt]
    generations: list[Generation]
    per_prompt: int

    @property
    def n(self) -> int:
        return self.body.choices

    def groups(self) -> list[tuple[_Prompt, list[Generation]]]:
        k = self.per_prompt
        return [(p, self.generations[i * k:(i + 1) * k]) for i, p in enumerate(self.prompts)]


# ---- routes --------------------------------------------------------------------------------------
@router.post("/v1/completions", dependencies=_GENERATION_DEPS)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _respond(await _start(request, body, COMPLETION, _completion_prompts), request)


@router.post("/v1/chat/completions", dependencies=_GENERATION_DEPS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _respond(await _start(request, body, CHAT, _chat_prompts), request)


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


# ---- starting --------------------------------------------------------------------------------------
async def _start(request: Request, body: _SamplingBody, shape: _Shape,
                 prompts: Callable[[Runtime, Any], Awaitable[list[_Prompt]]]) -> _Run:
    rt, arrival = runtime_of(request), time.perf_counter()
    with recorded_rejections(rt, shape.endpoint, body.model, arrival):
        refuse_unsupported(body.unsupported())
        merge = resolve_merge(rt, body.model, body.adapters, body.merge_strategy, body.density,
                              body.majority_sign_method)
        adapter = None if merge else resolve_adapter(rt, body.model, param="model", empty_is_base=body.model is None)
        per_prompt = _per_prompt(body)
        spec, spec_param = _guided_spec(body)
        guided = await compile_guided(rt, spec, spec_param)
        run = _Run(body, shape, await prompts(rt, body), [], per_prompt)
        plans = []
        for i, prompt in enumerate(run.prompts):
            params = _sampling(rt, body, prompt, guided)
            req = GenerationRequest(shape.endpoint, body.model, adapter, tuple(prompt.ids), params, arrival,
                                    uuid.uuid4().hex, merge=merge, counted=i == 0, cache_salt=body.cache_salt)
            plans += plan_choices(rt, req, per_prompt)
        what = f"{len(run.prompts)} prompt{'s' if len(run.prompts) > 1 else ''} x {per_prompt} choices"
        run.generations = start_planned(rt, plans, what, "n" if per_prompt > 1 else "prompt")
        return run


def _per_prompt(body: _SamplingBody) -> int:
    best_of = getattr(body, "best_of", None) or body.choices
    if best_of < body.choices:
        raise ApiError(400, f"best_of ({best_of}) must be >= n ({body.choices})", param="best_of")
    if best_of > body.choices and body.stream:
        raise ApiError(400, "best_of > n cannot stream: the best choices are known only at the end", param="best_of")
    return best_of


async def _completion_prompts(rt: Runtime, body: CompletionRequest) -> list[_Prompt]:
    if len(body.prompts) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts in one request, got {len(body.prompts)}",
                       param="prompt")
    out = []
    for i, prompt in enumerate(body.prompts):
        param = "prompt" if len(body.prompts) == 1 else f"prompt.{i}"
        if isinstance(prompt, str):
            ids = await encode_text(rt, prompt, add_special_tokens=body.add_special_tokens, param=param)
            out.append(_Prompt(ids, prompt))
        else:
            ids = check_token_ids(rt, prompt, param=param)
            out.append(_Prompt(ids, rt.loaded.tokenizer.decode(ids) if body.echo else ""))
    return out


async def _chat_prompts(rt: Runtime, body: ChatCompletionRequest) -> list[_Prompt]:
    ids, text = await chat_prompt_ids(rt, body.messages, body.add_generation_prompt, body.continue_final_message,
                                      body.add_special_tokens)
    return [_Prompt(ids, text)]


async def chat_prompt_ids(rt: Runtime, messages: list[ChatMessage], add_generation_prompt: bool,
                          continue_final_message: bool, add_special_tokens: bool) -> tuple[list[int], str]:
    """The prompt's token ids and text for chat `messages` (also what POST /tokenize counts). Special tokens
    are added on top of the template's only when asked (vLLM's add_special_tokens); a prompt without a
    template is encoded like a completion prompt."""
    turns = [ChatTurn(m.role, _content_text(m), m.name) for m in messages]
    prompt = await run_in_threadpool(build_chat_prompt, rt.loaded.tokenizer, turns, add_generation_prompt,
                                     continue_final_message)
    special = add_special_tokens or not prompt.templated
    return await encode_text(rt, prompt.text, add_special_tokens=special, param="messages"), prompt.text


def _sampling(rt: Runtime, body: _SamplingBody, prompt: _Prompt, guided: GuidedSpec | None) -> SamplingParams:
    """The request's sampling parameters; what it omits comes from the model's generation config
    (--generation-config), then from OpenAI's defaults."""
    defaults = rt.sampling_defaults
    max_tokens = body.requested_max_tokens
    if max_tokens is None:  # chat without a limit: the model's max_new_tokens if it has one, within the context
        max_tokens = min(defaults.get("max_tokens", 2**62), context_room(rt, len(prompt.ids)))

    def pick(name: str, neutral: float) -> float:
        value = getattr(body, name)
        return defaults.get(name, neutral) if value is None else value

    return make_params(
        max_tokens=max_tokens, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
        top_k=int(pick("top_k", 0)), min_p=pick("min_p", 0.0), seed=body.seed,
        stop=tuple(body.stop or ()), stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens, skip_special_tokens=body.skip_special_tokens,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=pick("repetition_penalty", 1.0), logit_bias=_logit_bias(rt, body.logit_bias),
        logprobs=_logprobs(body), prompt_logprobs=_prompt_logprobs(body), guided=guided)


def _logprobs(body: _SamplingBody) -> int | None:
    """Top alternatives per generated token: completions' `logprobs`; chat's `top_logprobs` (with logprobs)."""
    if isinstance(body, CompletionRequest):
        return body.logprobs
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def _prompt_logprobs(body: _SamplingBody) -> int | None:
    """vLLM's prompt_logprobs, or completions' echo with logprobs (the echoed prompt tokens carry theirs)."""
    if body.prompt_logprobs is not None:
        return body.prompt_logprobs
    if isinstance(body, CompletionRequest) and body.echo and body.logprobs is not None:
        return body.logprobs
    return None


def _logit_bias(rt: Runtime, bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings): ASCII digits only (str.isdigit also takes "²" and "٣",
    which int() refuses or reads as another number), at most as many as the vocabulary's largest id has (so a
    5,000-digit key is never converted)."""
    bias = bias or {}
    if len(bias) > MAX_LOGIT_BIAS_TOKENS:
        raise ApiError(400, f"logit_bias: at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(bias)}", param="logit_bias")
    vocab = rt.loaded.model.config.get_text_config().vocab_size
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= len(str(vocab))) or int(key) >= vocab:
            raise ApiError(400, f"logit_bias: key {quote(key)} is not a token id in [0, {vocab}) (ASCII digits)",
                           param="logit_bias")
        out[int(key)] = value
    return out


def _guided_spec(body: _SamplingBody) -> tuple[GuidedSpec | None, str | None]:
    """The one structured-output constraint the request names, if any, and the field that named it (400 for
    two, or for an unknown response_format type). `structured_outputs` is vLLM's current field; `guided_*` its
    older spelling (aliases); `response_format` OpenAI's."""
    whitespace, ws_field = _whitespace_pattern(body)
    specs = _requested_specs(body, whitespace)
    if len(specs) > 1:
        names = ", ".join(name for name, _ in specs)
        raise ApiError(400, f"at most one structured-output constraint per request, got {names}",
                       param=specs[1][0])
    if whitespace is not None and not (specs and "json" in specs[0][0] or specs and specs[0][0] == "response_format"):
        raise ApiError(400, f"{ws_field} applies to JSON output only (a JSON schema or json_object)", param=ws_field)
    if not specs:
        return None, None
    field, build = specs[0]
    return guided_or_400(build, field), field


def _requested_specs(body: _SamplingBody, whitespace: str | None) -> list[tuple[str, Callable[[], GuidedSpec]]]:
    """(field, builder) for every constraint the request sets."""
    specs: list[tuple[str, Callable[[], GuidedSpec]]] = []
    fmt = body.response_format
    if fmt is not None:
        spec = _response_format_spec(fmt, whitespace)
        if spec is not None:
            field = "response_format.json_schema.schema" if fmt.get("type") == "json_schema" else "response_format"
            specs.append((field, lambda: spec))
    so = body.structured_outputs
    candidates: list[tuple[str, object, Callable[[Any], GuidedSpec]]] = []
    if so is not None:
        candidates += [
            ("structured_outputs.json", so.json_, lambda v: _json_spec("structured_outputs.json", v, whitespace)),
            ("structured_outputs.regex", so.regex, GuidedSpec.regex),
            ("structured_outputs.choice", so.choice, GuidedSpec.choice),
            ("structured_outputs.grammar", so.grammar, GuidedSpec.grammar),
            ("structured_outputs.json_object", so.json_object or None,
             lambda _: _json_spec("structured_outputs.json_object", {"type": "object"}, whitespace)),
        ]
    candidates += [
        ("guided_json", body.guided_json, lambda v: _json_spec("guided_json", v, whitespace)),
        ("guided_regex", body.guided_regex, GuidedSpec.regex),
        ("guided_choice", body.guided_choice, GuidedSpec.choice),
        ("guided_grammar", body.guided_grammar, GuidedSpec.grammar),
    ]
    for field, value, build in candidates:
        if value is not None:
            specs.append((field, lambda build=build, value=value: build(value)))
    return specs


def _whitespace_pattern(body: _SamplingBody) -> tuple[str | None, str]:
    so = body.structured_outputs
    if so is not None and so.whitespace_pattern is not None:
        if body.guided_whitespace_pattern is not None:
            raise ApiError(400, "give structured_outputs.whitespace_pattern or guided_whitespace_pattern, not both",
                           param="guided_whitespace_pattern")
        return so.whitespace_pattern, "structured_outputs.whitespace_pattern"
    return body.guided_whitespace_pattern, "guided_whitespace_pattern"


def _json_spec(field: str, schema: dict | str, whitespace: str | None) -> GuidedSpec:
    """A JSON-schema spec; `whitespace`: the regex every whitespace gap must match (llguidance's
    `x-guidance.whitespace_pattern`), else our compact default."""
    if whitespace is not None:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ApiError(400, f"{field}: is not valid JSON ({exc})", param=field) from None
        if isinstance(schema, dict):
            options = schema.get("x-guidance") if isinstance(schema.get("x-guidance"), dict) else {}
            schema = {**schema, "x-guidance": {**options, "whitespace_pattern": whitespace}}
    return GuidedSpec.json_schema(schema)


def _response_format_spec(fmt: dict, whitespace: str | None) -> GuidedSpec | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedSpec.json_object() if whitespace is None else guided_or_400(
            lambda: _json_spec("response_format", {"type": "object"}, whitespace), "response_format")
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt.get("json_schema"), dict) else None
        if schema is None:
            raise ApiError(400, "response_format json_schema needs json_schema.schema (a JSON Schema object)",
                           param="response_format.json_schema.schema")
        return guided_or_400(lambda: _json_spec("response_format.json_schema.schema", schema, whitespace),
                             "response_format.json_schema.schema")
    raise ApiError(400, f"response_format type {quote(str(kind))} is not one of text, json_object, json_schema",
                   param="response_format.type")


def _content_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.text or "" for part in message.content)  # text parts only (others refused)


def _base_card(rt: Runtime) -> dict[str, Any]:
    return {"id": rt.served_model_name, "object": "model", "created": _STARTED, "owned_by": "loraplex",
            "root": rt.served_model_name, "parent": None, "max_model_len": rt.max_model_len,
            "sampling_defaults": rt.sampling_defaults}


def _adapter_card(rt: Runtime, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(rt.store.get(name).created_at), "owned_by": "loraplex",
            "root": name, "parent": rt.served_model_name, "max_model_len": rt.max_model_len}


# ---- answering -------------------------------------------------------------------------------------
def _usage(run: _Run, returned: list[Generation]) -> dict[str, Any]:
    """OpenAI's counts; a prompt counts once whatever its `n`, with the cached tokens of its first choice (the
    one that computed it: the others find it in the prefix cache)."""
    n_prompt = sum(len(p.ids) for p in run.prompts)
    n_out = sum(len(g.token_ids) for g in returned)
    cached = sum(gens[0].num_cached_tokens for _, gens in run.groups())
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _head(run: _Run, object_: str) -> dict[str, Any]:
    first = run.generations[0]
    rid = run.body.request_id or first.req.request_id  # vLLM's request_id names the response when given
    return {"id": run.shape.id_prefix + rid, "object": object_, "created": int(time.time()),
            "model": first.req.model if first.req.model is not None else first.rt.served_model_name}


async def _respond(run: _Run, request: Request) -> Response:
    if run.body.stream:
        return EventStream(_events(run), run.generations, _error_events)
    if not await complete_all(run.generations, request):
        return Response(status_code=CLIENT_GONE)  # nobody is listening; the request was aborted
    texts = TokenTexts(run.generations[0].rt.loaded.tokenizer)
    choices, returned = [], []
    for prompt, group in run.groups():
        best = sorted(group, key=lambda g: -g.cumulative_logprob)[:run.n] if run.per_prompt > run.n else group
        for generation in best:
            choices.append(_final_choice(run, texts, len(choices), prompt, generation))
            returned.append(generation)
    return JSONResponse({**_head(run, run.shape.object), "choices": choices, "usage": _usage(run, returned)})


def _final_choice(run: _Run, texts: TokenTexts, index: int, prompt: _Prompt, g: Generation) -> dict[str, Any]:
    echo = isinstance(run.body, CompletionRequest) and run.body.echo
    text = (prompt.text if echo else "") + g.text
    choice = run.shape.choice(index, text, g.finish_reason, _logprobs_object(run, texts, prompt, g, echo))
    if run.body.prompt_logprobs is not None and g.prompt_logprobs is not None:
        choice["prompt_logprobs"] = vllm_prompt_logprobs(texts, g.prompt_logprobs)
    return choice


def _logprobs_object(run: _Run, texts: TokenTexts, prompt: _Prompt, g: Generation, echo: bool) -> dict | None:
    wanted = g.req.params.logprobs
    if wanted is None:
        return None
    tops = padded_tops(len(g.token_ids), g.token_top_logprobs)
    if isinstance(run.body, ChatCompletionRequest):
        return chat_logprobs(texts, g.token_ids, g.token_logprobs, tops, wanted)
    ids, lps, top = list(g.token_ids), list(g.token_logprobs), list(tops)
    if echo:
        entries = g.prompt_logprobs or [None] * len(prompt.ids)
        ids = list(prompt.ids) + ids
        lps = [e.logprob if e else None for e in entries] + lps
        top = [e.top if e else None for e in entries] + top
    return completion_logprobs(texts, ids, lps, top)


async def _events(run: _Run) -> AsyncGenerator[str, None]:
    shape, body = run.shape, run.body
    head = _head(run, shape.chunk_object)
    usage_slot: dict[str, Any] = {"usage": None} if body.include_usage else {}
    texts = TokenTexts(run.generations[0].rt.loaded.tokenizer)
    echo = isinstance(body, CompletionRequest) and body.echo
    for index in range(len(run.generations)):
        opening = shape.opening_choice(index)
        if opening is not None:
            yield sse({**head, "choices": [opening], **usage_slot})
        if echo:
            prompt = run.prompts[index // run.per_prompt]
            yield sse({**head, "choices": [shape.chunk_choice(index, prompt.text, None, None)], **usage_slot})
    async for index, out in merged_outputs(run.generations):
        if out.finish_reason == "error":
            yield _error_events(out.error or "generation failed", run.generations[index].failure_status)
            return
        if out.new_text or out.finished or out.new_token_ids:
            logprobs = _chunk_logprobs(run, texts, out)
            if out.new_text or out.finished or logprobs is not None:
                choice = shape.chunk_choice(index, out.new_text, out.finish_reason, logprobs)
                yield sse({**head, "choices": [choice], **usage_slot})
    if body.include_usage:
        yield sse({**head, "choices": [], "usage": _usage(run, run.generations)})
    yield sse("[DONE]")


def _chunk_logprobs(run: _Run, texts: TokenTexts, out: RequestOutput) -> dict | None:
    wanted = run.generations[0].req.params.logprobs
    if wanted is None or not out.new_token_ids:
        return None
    lps = out.logprobs or [None] * len(out.new_token_ids)
    tops = padded_tops(len(out.new_token_ids), out.top_logprobs or [])
    if isinstance(run.body, ChatCompletionRequest):
        return chat_logprobs(texts, out.new_token_ids, lps, tops, wanted)
    return completion_logprobs(texts, out.new_token_ids, lps, tops)


def _error_events(message: str, status: int = 500) -> str:
    """An error once the stream has started: one event with OpenAI's error object, then [DONE]."""
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": status}}) + sse("[DONE]")
