"""Continuous batching, adapter-aware: which tokens of which requests run in the next step.

Each step: running requests first (decodes and unfinished prefill chunks, oldest first), then waiting
requests FCFS under the token budget (`max_batch_tokens`), the sequence cap (`max_num_seqs`) and the device
adapter slots (`max_loras`, via the AdapterCache's refcounts). A waiting request whose adapter is still
loading is skipped, not waited on. Fairness: once the head of the queue has been blocked on a slot for
`starvation_steps` steps, nobody behind it is admitted until it is, so busy adapters drain and free a slot.
When the KV pool runs dry, the newest running request is preempted (its blocks freed, recomputed later).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from loraplex.adapters.cache import AdapterCache, SlotState
from loraplex.server.engine.block_pool import BlockPool
from loraplex.server.engine.request import Request, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_batch_tokens: int = 2048
    starvation_steps: int = 64

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("--max-num-seqs: must be >= 1")
        if self.max_batch_tokens < 1:
            raise ValueError("--max-batch-tokens: must be >= 1")


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens [start, start + n) of `request` this step; sample a token if they reach its end."""

    request: Request
    start: int
    n: int

    @property
    def samples(self) -> bool:
        return self.start + self.n == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    failed: list[tuple[Request, str]] = field(default_factory=list)  # adapter load failed etc.

    @property
    def num_tokens(self) -> int:
        return sum(c.n for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, adapters: AdapterCache | None) -> None:
        self.config = config
        self.pool = pool
        self.adapters = adapters
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.on_preempt: Callable[[Request], None] = lambda r: None

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        if request.adapter is not None and self.adapters is not None:
            self.adapters.prefetch(request.adapter)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out)
        if budget > 0 and not self._preempted_this_step:
            self._schedule_waiting(out, budget)
        return out

    # ---- running ---------------------------------------------------------------------------
    def _schedule_running(self, out: SchedulerOutput) -> int:
        budget = self.config.max_batch_tokens
        self._preempted_this_step = False
        for req in list(self.running):  # oldest first
            if req.status is not Status.RUNNING or budget <= 0:
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            if n <= 0 or not self._grow_or_preempt(req, req.num_computed + n):
                continue
            out.chunks.append(ScheduledChunk(req, req.num_computed, n))
            budget -= n
        return budget

    def _grow_or_preempt(self, req: Request, num_tokens: int) -> bool:
        """Make room for `req` by preempting the newest running requests; False if req itself went."""
        while not self.pool.grow(req.blocks, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is req:
                return False
        return True

    def preempt(self, req: Request) -> None:
        """Free the request's KV and adapter ref; it goes back to the queue head and is recomputed."""
        self._preempted_this_step = True
        self.running.remove(req)
        self._release(req)
        req.num_computed = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.on_preempt(req)

    # ---- waiting ---------------------------------------------------------------------------
    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            verdict = self._admit_adapter(req, out)
            if verdict in ("loading", "no_slot"):
                skipped.append(req)
                if verdict == "no_slot" and self._head_is_starving(req, skipped):
                    break
                continue
            if verdict == "failed":
                continue
            n = min(req.num_tokens, budget)
            if not self.pool.grow(req.blocks, n):
                self._release(req)
                skipped.append(req)
                break  # the pool is full: new work waits for blocks to come back
            req.status = Status.RUNNING
            req.waiting_steps = 0
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, 0, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _head_is_starving(self, req: Request, skipped: list[Request]) -> bool:
        if len(skipped) != 1:
            return False
        req.waiting_steps += 1
        return req.waiting_steps >= self.config.starvation_steps

    def _admit_adapter(self, req: Request, out: SchedulerOutput) -> str:
        """'ok' (slot acquired or base only), 'loading', 'no_slot' (all slots busy) or 'failed'."""
        if req.adapter is None or self.adapters is None:
            req.slot = -1
            return "ok"
        got = self.adapters.acquire(req.adapter, first=not req.adapter_asked)
        req.adapter_asked = True
        if got.state is SlotState.READY:
            req.slot, req.holds_adapter = got.slot, True
            return "ok"
        if got.state is SlotState.ERRORED:
            out.failed.append((req, f"adapter {req.adapter!r} failed to load: {got.reason}"))
            return "failed"
        return "no_slot" if got.state is SlotState.NO_SLOT else "loading"

    # ---- finishing -------------------------------------------------------------------------
    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request wherever it is; its blocks and adapter ref return at once."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.status = Status.FINISHED

    def _release(self, req: Request) -> None:
        self.pool.release(req.blocks)
        if req.holds_adapter and self.adapters is not None and req.adapter is not None:
            self.adapters.release(req.adapter)
        req.holds_adapter, req.slot = False, -1
