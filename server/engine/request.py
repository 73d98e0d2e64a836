"""A request's state inside the engine (prompt, outputs, KV blocks, adapter slot, sampling state)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraplex.server.engine.detokenizer import IncrementalDetokenizer
from loraplex.server.engine.sampling_params import SamplingParams
from loraplex.server.engine.stop import StopStringMatcher

if TYPE_CHECKING:
    from loraplex.adapters.merge import MergeRecipe
    from loraplex.server.engine.guided import GuidedState
    from loraplex.server.engine.prefix_cache import KVIdentity


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw distribution, and the `top` alternatives asked for
    ((token, logprob), best first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # 1 + how many tokens the model found likelier


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: a delta, plus the final state when finished."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    logprobs: list[float] | None = None  # log-probability of each new token under the model's raw logits
    # Per new token, the top alternatives when the request asked for logprobs >= 1 (else None).
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None
    # With the first output (or the only one, for max_tokens 0): each prompt token's logprob when the request
    # asked for prompt logprobs; the first prompt token has none (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Who is at fault when finish_reason == "error": "request" (its own parameters, prompt or adapter: a
    # client error), "internal" (a server fault in a step) or "unavailable" (the engine stopped).
    error_kind: str | None = None
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (OpenAI's cached_tokens)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    seed: int | None  # the sampling seed (its own or a random one; None when greedy)
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the pool
    blocks: list[int] = field(default_factory=list)
    slot: int = -1  # device adapter slot while running (-1 = base only)
    holds_adapter: bool = False  # True while this request holds a refcount on its adapter
    adapter_asked: bool = False  # the cache counted this request's hit/miss already
    finish_reason: str | None = None
    first_token_time: float | None = None
    waiting_steps: int = 0  # steps spent blocked at the head of the queue (fairness)
    started: bool = False  # admitted at least once: from then on it keeps its adapter ref until finished
    charged_prompt: int = 0  # prompt tokens already charged to its tenant's fairness counter
    # len(output_ids) when last preempted for fairness (None: never); see scheduler.REFAIR_TOKENS
    fair_preempted_at: int | None = None
    # The choices of one n > 1 request share a group (the first choice's id): they share prompt blocks, and
    # when one fails they all end.
    group: str | None = None
    # Several registered adapters combined for this request (LoRAX-style merging); `adapter` is then None.
    merge: MergeRecipe | None = None
    merge_slots: tuple[int, ...] = ()  # device slots of a merge's adapters (recipe order) while it holds them
    # Prompt logprobs computed so far (params.prompt_logprobs set): one per prompt position, the first None.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    guided: GuidedState | None = None  # the structured-output grammar's state, advanced by each output token
    # Prefix caching: what its K/V depends on besides its tokens (set when it first holds its adapters), the keys
    # of its full blocks so far, how many of its blocks are published (or were found), and the prompt tokens
    # its first admission found cached (usage.prompt_tokens_details.cached_tokens).
    cache_salt: str | None = None
    kv_identity: KVIdentity | None = None
    block_keys: list[bytes] = field(default_factory=list)
    num_published: int = 0
    num_cached_tokens: int = 0
    counts_row: int | None = None  # its row of the engine's TokenCounts (penalties), once it first samples

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + outputs."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:  # a decode: no copy of the prompt
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]


@dataclass(frozen=True)
class StepStats:
    """What one engine step computed: tokens (0: it only waited on adapter loads), sequences, distinct
    adapters among them."""

    num_tokens: int = 0
    num_seqs: int = 0
    num_adapters: int = 0


@dataclass
class StepResult:
    """What `LLMEngine.step()` returns: the outputs to deliver and the step's statistics."""

    outputs: list[RequestOutput] = field(default_factory=list)
    stats: StepStats = StepStats()

    @property
    def computed(self) -> bool:
        return self.stats.num_tokens > 0
