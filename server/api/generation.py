"""The generation path shared by the OpenAI and TGI routes.

Every generation request goes through the same checks, cheapest and most specific first, and nothing
holds an admission slot until the request is known to be runnable:

    auth (dependency, 401) → ready / draining (dependency, 503) → body schema (422)
    → adapter (404) → prompt (422 / 400) → fits the context (400) → admission (429, Retry-After) → run

After admission a `Generation` owns the request. Whatever ends it — the last token, an engine error, the
client going away — `Generation.aclose()` runs exactly once: the engine request is aborted if it is still
running (its KV blocks and adapter refcount return at once), the admission slot is released, and the
request is recorded in the metrics (status 499 when the client left before the end, as nginx does).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from loraplex.adapters.errors import AdapterError
from loraplex.server.api.errors import ApiError
from loraplex.server.api.limits import check_request_weight
from loraplex.server.engine.engine import RequestRejected
from loraplex.server.engine.request import RequestOutput, TokenLogprob
from loraplex.server.engine.sampling_params import SamplingParams
from loraplex.server.runtime import Runtime

if TYPE_CHECKING:
    from loraplex.adapters.merge import MergeRecipe
    from loraplex.server.engine.guided import GuidedSpec

log = logging.getLogger(__name__)

# Seconds a client is told to wait after a 429; admission frees up as soon as any request finishes.
RETRY_AFTER_S = 1
# Longest user-supplied name quoted back in an error message (names are otherwise unbounded here).
_MAX_QUOTED = 200
CLIENT_GONE = 499  # nginx's "client closed request": recorded, never sent


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


# ---- readiness and admission ---------------------------------------------------------------------
def require_ready(request: Request) -> None:
    """FastAPI dependency: 503 while the model loads, after a failed start, or while draining."""
    check_ready(runtime_of(request))


def check_ready(rt: Runtime) -> None:
    if rt.draining:
        raise ApiError(503, "the server is shutting down (draining in-flight requests); send new requests "
                            "to another replica")
    check_loaded(rt)
    if not rt.ready:
        raise ApiError(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})


def check_loaded(rt: Runtime) -> None:
    """503 unless the model is loaded and the process is not exiting (draining is fine here)."""
    if rt.fatal_error:
        raise ApiError(503, f"the server cannot serve and is exiting: {rt.fatal_error}")
    if rt.store is None:
        raise ApiError(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})


def admit(rt: Runtime, adapter: str | None, weight: int = 1, what: str = "", param: str | None = None) -> None:
    """Take `weight` admission slots (one per sequence the request runs: prompts x best_of/n) or answer: 400 when
    one request asks for more than it may ever hold (limits.request_limit; a 429 would be retried forever), 429
    when the slots are taken now. The caller releases each (Generation.aclose does, one per choice)."""
    check_ready(rt)  # draining may have begun while the request was being prepared
    too_heavy = check_request_weight(rt.config.server.max_queue, weight, what)
    if too_heavy is not None:
        raise ApiError(400, too_heavy, param=param)
    refused = rt.try_admit(adapter, weight)
    if refused is not None:
        raise ApiError(429, f"{refused}; retry after {RETRY_AFTER_S}s", headers={"Retry-After": str(RETRY_AFTER_S)})


@contextlib.contextmanager
def recorded_rejections(rt: Runtime, endpoint: str, model: str | None, arrival: float) -> Iterator[None]:
    """Count requests refused while being prepared (404/400/422/429/503) in the metrics, then re-raise."""
    try:
        yield
    except (ApiError, AdapterError, RequestRejected) as exc:
        status = exc.status if isinstance(exc, ApiError | AdapterError) else 400
        rt.metrics.record_request(endpoint=endpoint, adapter=model, status=status,
                                  latency_s=time.perf_counter() - arrival)
        raise


# ---- adapters, prompts, parameters ---------------------------------------------------------------
def refuse_unsupported(features: Sequence[tuple[str, str]]) -> None:
    """400 naming every requested feature this server does not implement (never silently ignored).

    `features`: (field, what was asked for) pairs, as the schemas' `unsupported()` list them.
    """
    if features:
        asked = "; ".join(what for _, what in features)
        raise ApiError(400, f"not supported by this server: {asked}", param=features[0][0])


def quote(name: str) -> str:
    return repr(name if len(name) <= _MAX_QUOTED else name[:_MAX_QUOTED] + "...")


def resolve_adapter(rt: Runtime, name: str | None, *, param: str, empty_is_base: bool) -> str | None:
    """The adapter to run, or None for the base model: `name` is the served base name or a registered
    adapter (`empty_is_base`: None / "" also mean the base, as TGI's `adapter_id` does)."""
    if (name is None or name == "") and empty_is_base:
        return None
    if name == rt.served_model_name:
        return None
    if name is not None and rt.store is not None and name in rt.store:
        return name
    raise ApiError(404, f"{param} {quote(name or '')} not found: it is neither the served base model "
                        f"{rt.served_model_name!r} nor a registered adapter (see GET /v1/models)", param=param)


async def encode_text(rt: Runtime, text: str, *, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
    """Tokenize off the event loop: a prompt near the body limit takes a noticeable time to encode. A text too long
    to fit the context whatever its tokens is refused before tokenizing (a 4 MiB prompt took ~20 s and 700 MB)."""
    check_utf8(text, param=param)
    tokenizer = rt.loaded.tokenizer
    check_prompt_bytes(len(text.encode("utf-8")), rt.config.engine.max_model_len, max_token_bytes(tokenizer), param)
    return await run_in_threadpool(tokenizer.encode, text, add_special_tokens=add_special_tokens)


# How much a tokenizer's normalizer may shrink text before it is split (NFKC folds a 3-byte full-width letter into
# one byte; accent stripping 2 into 1): the byte bound below allows for it.
_NORMALIZED_SHRINK = 4


def check_prompt_bytes(n_bytes: int, max_model_len: int, token_bytes: int, param: str) -> None:
    """400 when `n_bytes` of text cannot fit `max_model_len` tokens however it is split: no token spells more than
    `token_bytes` bytes of input, so such a text has more than `max_model_len` tokens."""
    limit = max_model_len * token_bytes * _NORMALIZED_SHRINK
    if n_bytes > limit:
        raise ApiError(400, f"{param}: the prompt is {n_bytes} bytes, more than the {limit} bytes any prompt that fits "
                            f"--max-model-len {max_model_len} tokens can have with this tokenizer", param=param)


_TOKEN_BYTES: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # tokenizer -> longest token


def max_token_bytes(tokenizer: Any) -> int:
    """The UTF-8 length of the tokenizer's longest vocabulary entry (added tokens included): an upper bound on the
    input bytes one token covers (a byte-level 'Ġ' or a SentencePiece '▁' is longer than the byte it stands for)."""
    if tokenizer not in _TOKEN_BYTES:
        _TOKEN_BYTES[tokenizer] = max((len(token.encode("utf-8")) for token in tokenizer.get_vocab()), default=1)
    return _TOKEN_BYTES[tokenizer]


def check_utf8(text: str, *, param: str) -> None:
    """JSON's "\\udcff" escapes decode to lone surrogates, which no UTF-8 text (and no tokenizer) can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param}: not valid Unicode text: a lone surrogate {text[exc.start]!r} at character "
                            f"{exc.start} cannot be encoded as UTF-8", param=param) from exc


def check_token_ids(rt: Runtime, ids: Sequence[int], *, param: str) -> list[int]:
    """Token ids given directly must exist in the model's vocabulary."""
    vocab = rt.loaded.model.config.get_text_config().vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param=param)
    return list(ids)


def resolve_merge(rt: Runtime, model: str | None, adapters: Sequence[Any] | None, strategy: str, density: float,
                  majority_sign_method: str, *, param: str = "adapters") -> MergeRecipe | None:
    """The merge recipe a request names (LoRAX's per-request merging), or None. The request's model must then
    be the base model; every adapter must be registered (404); the recipe must fit the device slots (400)."""
    if not adapters:
        return None
    from loraplex.adapters.merge import MergeRecipe, check_recipe

    if model not in (None, "", rt.served_model_name):
        raise ApiError(400, f"with {param}, the model must be the base model {rt.served_model_name!r} (the adapters "
                            f"to merge are listed in {param}), got {quote(model)}", param="model")
    names = [_merged_adapter(rt, a.name, f"{param}.{i}.name") for i, a in enumerate(adapters)]
    try:
        recipe = MergeRecipe(tuple(zip(names, (float(a.weight) for a in adapters), strict=True)), strategy,
                             density, majority_sign_method)
        check_recipe(recipe, rt.config.engine.lora.max_loras)
    except ValueError as exc:  # RecipeError names the recipe's field: "adapters.1.weight", "density", ...
        field = getattr(exc, "field", "adapters")
        where = param + field.removeprefix("adapters") if field.startswith("adapters") else field
        raise ApiError(400, str(exc), param=where) from exc
    if recipe.virtual and recipe.virtual_name not in rt.engine.adapters.adapters:
        log.info("%s merge of %s: not computed yet; this request's first step waits while it is computed from the "
                 "adapters' weights (off the engine thread; later requests reuse it)", strategy, ", ".join(names))
    return recipe


def _merged_adapter(rt: Runtime, name: str, param: str) -> str:
    adapter = resolve_adapter(rt, name, param=param, empty_is_base=False)
    if adapter is None:
        raise ApiError(400, f"{param}: {quote(name)} is the base model, not an adapter to merge", param=param)
    return adapter


def guided_or_400(build: Callable[[], GuidedSpec], param: str) -> GuidedSpec:
    """Build a structured-output spec; its validation errors become a 400 naming `param`."""
    from loraplex.server.engine.guided import GuidedError

    try:
        return build()
    except GuidedError as exc:
        raise ApiError(400, f"{param}: {exc.reason}", param=param) from exc


async def compile_guided(rt: Runtime, spec: GuidedSpec | None, param: str | None = None) -> GuidedSpec | None:
    """Compile the grammar off the event loop before the request is admitted (the engine then finds it in the
    compiler's cache): an invalid schema or regex is a 400 naming the field (`param`, else the OpenAI field
    the spec came from), never a failed request later."""
    if spec is None:
        return None
    from loraplex.server.engine.guided import GuidedError

    try:
        await run_in_threadpool(rt.engine.compile_grammar, spec)
    except GuidedError as exc:
        field = param or exc.field
        raise ApiError(400, f"{field}: {exc.reason}", param=field) from exc
    return spec


def make_params(**kwargs: Any) -> SamplingParams:
    """SamplingParams re-checks what the schemas check, plus cross-field rules (min_tokens <= max_tokens)."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        message = str(exc)
        raise ApiError(422, message, param=message.split(" ", 1)[0]) from exc


def context_room(rt: Runtime, prompt_len: int) -> int:
    """Tokens left for generation after the prompt, within the context and the KV pool (at least 1, so that
    an over-long prompt is reported as such by `check_fits`)."""
    return max(1, rt.engine.token_capacity - prompt_len)


# ---- running one request -------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationRequest:
    """One request ready to run: what the caller asked for, resolved and validated."""

    endpoint: str  # metrics label, e.g. "/v1/completions"
    model: str | None  # the name the caller used (echoed back); None = base via TGI's empty adapter_id
    adapter: str | None  # registered adapter name, None = base model only (or a merge)
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    arrival: float  # time.perf_counter() when the request arrived
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    merge: MergeRecipe | None = None  # several adapters combined (adapter is then None)
    prefix_of: str | None = None  # another choice of the same HTTP request whose prompt blocks it shares
    counted: bool = True  # counted as an HTTP request in the metrics (the extra choices of n > 1 are not)
    cache_salt: str | None = None  # prefix-cache blocks are shared only between requests with the same salt


def plan_choices(rt: Runtime, req: GenerationRequest, count: int) -> list[GenerationRequest]:
    """`count` independent choices of one prompt (n / best_of), checked to fit: the first computes the prompt, the
    others share its KV blocks (prefix_of). Choice i > 0 of a seeded request draws from a seed derived from
    (seed, i), so every choice is reproducible and none repeats another."""
    rt.engine.check_fits(len(req.prompt_ids), req.params)
    return [req if i == 0 else dataclasses.replace(
        req, request_id=f"{req.request_id}-{i}", params=_choice_params(req.params, i), prefix_of=req.request_id,
        counted=False) for i in range(count)]


def start_planned(rt: Runtime, plans: Sequence[GenerationRequest], what: str, param: str | None = None
                  ) -> list[Generation]:
    """Admit every planned sequence of one HTTP request at once (its weight is their number; `what` says where the
    number comes from, for the 400), then start them all."""
    admit(rt, plans[0].adapter, len(plans), what, param)
    return [Generation(rt, plan) for plan in plans]  # nothing here can fail: each releases its slot on close


def start_choices(rt: Runtime, req: GenerationRequest, count: int, param: str | None = None) -> list[Generation]:
    """One prompt's `count` choices, planned and admitted together."""
    return start_planned(rt, plan_choices(rt, req, count), f"1 prompt x {count} choices", param)


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    if params.seed is None:
        return params
    digest = hashlib.blake2b(f"{params.seed}:{index}".encode(), digest_size=8).digest()
    return dataclasses.replace(params, seed=int.from_bytes(digest, "big") >> 1)  # 63 bits: a valid seed


async def merged_outputs(generations: Sequence[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from every choice as they come, until all finished."""
    queue: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for out in generation.outputs():
                await queue.put((index, out))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(tasks)
        while remaining:
            index, out = await queue.get()
            if out is None:
                remaining -= 1
            else:
                yield index, out
        for task in tasks:
            task.result()  # re-raise a pump's failure
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def complete_all(generations: Sequence[Generation], request: Request) -> bool:
    """Run every choice to its end (non-streamed) and close them; False if the client left first. An engine
    failure of any choice raises ApiError with its message (the others are aborted)."""
    async def drain() -> None:
        async for _ in merged_outputs(generations):
            pass

    try:
        finished = await _until_done_or_gone(drain(), request)
    finally:
        for generation in generations:
            await generation.aclose()
    failed = next((g for g in generations if g.finish_reason == "error"), None)
    if finished and failed is not None:
        raise ApiError(failed.failure_status, failed.error or "generation failed")
    return finished


async def _until_done_or_gone(work_coro: Awaitable[None], request: Request) -> bool:
    """Await `work_coro` unless the client disconnects first (then cancel it and answer False)."""
    work = asyncio.ensure_future(work_coro)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.cancelled():
        return False
    if work.exception() is not None:
        raise work.exception()
    return True


class Generation:
    """An admitted request. Iterate `outputs()` (once); always `await aclose()` (idempotent)."""

    def __init__(self, rt: Runtime, req: GenerationRequest) -> None:
        self.rt, self.req = rt, req
        self._outs = rt.engine.generate(list(req.prompt_ids), req.params, req.adapter, req.request_id,
                                        merge=req.merge, prefix_of=req.prefix_of, cache_salt=req.cache_salt)
        self.token_ids: list[int] = []
        self.token_texts: list[str] = []  # text emitted with each token (a held partial char comes later)
        self.token_logprobs: list[float | None] = []  # None while the engine reports no logprobs
        self.token_top_logprobs: list[tuple[tuple[int, float], ...]] = []  # per token, when logprobs >= 1
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # when prompt logprobs were asked for
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.error_kind: str | None = None
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._closed = False

    @property
    def text(self) -> str:
        return "".join(self.token_texts)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.req.prompt_ids)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        async for out in self._outs:
            self._observe(out)
            yield out

    def _observe(self, out: RequestOutput) -> None:
        if out.new_token_ids:
            now = time.perf_counter()
            self._first_token_at = self._first_token_at or now
            self._last_token_at = now
            self.token_ids.extend(out.new_token_ids)
            # One engine step appends one token per request; should a step ever carry several, its text
            # goes with the last of them.
            self.token_texts.extend([""] * (len(out.new_token_ids) - 1) + [out.new_text])
            self.token_logprobs.extend(token_logprobs(out))
            if out.top_logprobs is not None:
                self.token_top_logprobs.extend(out.top_logprobs)
        elif out.new_text and self.token_texts:
            self.token_texts[-1] += out.new_text
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.finished:
            self.finish_reason, self.error, self.error_kind = out.finish_reason, out.error, out.error_kind

    @property
    def cumulative_logprob(self) -> float:
        """Sum of the generated tokens' logprobs: how best_of ranks choices (vLLM's rule)."""
        return sum(lp for lp in self.token_logprobs if lp is not None)

    @property
    def failure_status(self) -> int:
        names = self.req.merge.names if self.req.merge is not None else (self.req.adapter,)
        if any(n is not None and (self.rt.store is None or n not in self.rt.store) for n in names):
            return 404  # its adapter (or one its merge names) was unregistered meanwhile
        if self.error_kind == "request":
            return 400  # this request's own parameters or adapter (e.g. errored, non-finite logits)
        if self.error_kind == "unavailable":
            return 503  # the engine stopped: retry on another replica
        return 500  # a server-side fault in a step

    @property
    def status(self) -> int:
        if self.finish_reason in ("stop", "length"):
            return 200
        return self.failure_status if self.finish_reason == "error" else CLIENT_GONE

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._outs.aclose()  # unfinished: the engine aborts the request and frees its KV blocks
        finally:
            self.rt.release(self.req.adapter)
            self._record()

    def _record(self) -> None:
        now = time.perf_counter()
        first, last, n = self._first_token_at, self._last_token_at, len(self.token_ids)
        self.rt.metrics.record_request(
            endpoint=self.req.endpoint, adapter=self.req.adapter, status=self.status,
            latency_s=now - self.req.arrival,
            ttft_s=first - self.req.arrival if first is not None else None,
            tpot_s=(last - first) / (n - 1) if first is not None and last is not None and n > 1 else None,
            prompt_tokens=self.num_prompt_tokens, generation_tokens=n, count_request=self.req.counted)


def token_logprobs(out: RequestOutput) -> list[float | None]:
    """Log-probabilities of `out.new_token_ids` (None for each token when the engine reported none)."""
    return list(out.logprobs) if out.logprobs is not None else [None] * len(out.new_token_ids)


async def _until_disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (or the server sends it once
    # the response is complete, when this task is cancelled anyway).
    while (await request.receive())["type"] != "http.disconnect":
        continue


# ---- server-sent events --------------------------------------------------------------------------
# Characters that json.dumps(ensure_ascii=False) leaves raw but many clients treat as line breaks
# (str.splitlines, which httpx's iter_lines and others use): escaped, so one event is always one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: dict[str, Any] | str) -> str:
    """One SSE event: `data: <json>\\n\\n` (a str payload, e.g. "[DONE]", goes as is)."""
    if not isinstance(payload, str):
        payload = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)
    return f"data: {payload}\n\n"


class EventStream(StreamingResponse):
    """`text/event-stream` whose generation is closed however the response ends.

    Starlette cancels the streaming task when the client disconnects; the events generator and then the
    generation are closed here in every case, so the engine aborts the request and the slot is released
    at once rather than whenever the garbage collector finalizes the generator. An unexpected exception
    while streaming can no longer change the status (the headers are sent): it becomes the events that
    `error_events(message)` returns, in the caller's dialect.
    """

    def __init__(self, events: AsyncGenerator[str, None], generations: Generation | Sequence[Generation],
                 error_events: Callable[[str], str]) -> None:
        self._generations = [generations] if isinstance(generations, Generation) else list(generations)
        self._events = _guarded(events, error_events, self._generations[0].req.request_id)
        super().__init__(self._events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            for generation in self._generations:
                await generation.aclose()


async def _guarded(events: AsyncGenerator[str, None], error_events: Callable[[str], str],
                   request_id: str) -> AsyncGenerator[str, None]:
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                yield event
        except Exception:  # noqa: BLE001 - reported in-band; CancelledError/GeneratorExit pass through
            log.exception("request %s failed while streaming", request_id)
            yield error_events(f"internal error while streaming (request {request_id}); see the server log")
