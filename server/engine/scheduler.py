"""Continuous batching, adapter-aware: which tokens of which requests run in the next step.

Each step: running requests first (decodes and unfinished prefill chunks, oldest first), then waiting
requests under the token budget (`max_batch_tokens`), the sequence cap (`max_num_seqs`) and the device
adapter slots (`max_loras`, via the SlotTable's refcounts). The policy picks which waiting request goes
next: `fair` (default) the oldest request of the least-served tenant (adapter) by virtual token counter, with
light tenants first, and when every sequence slot is taken a light tenant may preempt one running request of
the most-served tenant (the rules are in fairness.py); `fcfs` takes requests in arrival order. A waiting
request whose adapter is still loading is skipped, not waited on. Starvation (both policies): once the first
request tried has been blocked on a slot for `starvation_steps` steps, no request that would take a slot (or a
new ref on one) is admitted until it has one, so busy adapters drain and free a slot; requests that already
hold their slots (preempted ones) are still admitted, since only they can drain it.
When the KV pool runs dry, a running request is preempted (its blocks freed, recomputed later): the newest,
under `fair` the newest of the most-served tenant among those not yet scheduled in the step.

Prefix caching (`prefix_caching`, prefix_cache.py): an admitted request starts from the longest prefix of its
full blocks found published in the pool under its KV identity (never the block of its last token, whose
logits it needs; not at all when it scores its prompt), and publishes each block it completes. A preempted
request so finds its own blocks again while nobody evicted them. The choices of an n > 1 request form a group
(`Request.group`): a choice waits (skipped, not blocking others) while a running sibling is still computing the
prompt, then finds its blocks. A waiting request holds no KV blocks.

A started request keeps its adapter ref (and so its slot) until it finishes, through any preemption: an
adapter unregistered after the request started cannot be acquired again, yet the request must finish; and
re-admission needs no reload. A merged request (adapters/merge.py) does the same with every slot its recipe
needs (each adapter of a linear merge, or the one virtual adapter of a ties / dare merge), acquired all or
nothing per step, and is accounted to its own tenant, the recipe's label.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from loraplex.adapters.merge import remember
from loraplex.adapters.slot_table import Acquired, SlotState, SlotTable
from loraplex.server.engine.block_pool import BlockPool
from loraplex.server.engine.fairness import VirtualTokenCounter, request_worth, tenant_of
from loraplex.server.engine.prefix_cache import KVIdentity, extend_keys
from loraplex.server.engine.request import Request, Status
from loraplex.server.engine.waiting_queue import WaitingQueue

POLICIES = ("fair", "fcfs")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_batch_tokens: int = 2048
    starvation_steps: int = 64
    policy: str = "fair"
    # Rows projected to logits for prompt logprobs per step (about): each is a [V] fp32 row, plus its
    # log-softmax, so a long prompt scored at once would cost rows x V x 8 bytes (1.7 GB at 2k x 49k + top-k).
    max_prompt_logprob_rows: int = 256
    prefix_caching: bool = True  # --prefix-caching: reuse full KV blocks of earlier prompts (prefix_cache.py)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("--max-num-seqs: must be >= 1")
        if self.max_batch_tokens < 1:
            raise ValueError("--max-batch-tokens: must be >= 1")
        if self.max_prompt_logprob_rows < 1:
            raise ValueError("max_prompt_logprob_rows: must be >= 1")
        if self.policy not in POLICIES:
            raise ValueError(f"--scheduling-policy: expected one of {', '.join(POLICIES)}, got {self.policy!r}")


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
    def __init__(self, config: SchedulerConfig, pool: BlockPool, adapters: SlotTable | None) -> None:
        self.config = config
        self.pool = pool
        self.adapters = adapters
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self.vtc = VirtualTokenCounter()  # kept under both policies; only `fair` reads it
        self.on_preempt: Callable[[Request], None] = lambda r: None
        self._kv_preempted = False
        # Prefix cache lookups, in tokens: asked for (every admission that may reuse) and found.
        self.prefix_queries = self.prefix_hits = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self.vtc.arrive(_tenant(request))
        if request.merge is not None and request.merge.virtual:
            remember(request.merge)  # its virtual name resolves from now on (SlotTable, host loader)
        if self.adapters is not None:
            for name in _slot_names(request):  # a merge's adapters (or its virtual one) load in parallel
                self.adapters.prefetch(name)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        fair = self.config.policy == "fair"
        self._kv_preempted = False
        self._prompt_rows_left = self.config.max_prompt_logprob_rows
        promised = self._preempt_for_fairness(out) if fair else []
        budget = self._schedule_running(out)
        if budget > 0 and not self._kv_preempted:  # after a KV preemption the pool is short: no new work
            if fair:
                self._admit_fair(out, budget, promised)
            else:
                self._admit_fcfs(out, budget)
        for req in promised:  # refs taken for a promise that did not start: a waiting request holds none
            if not req.started and req.status is Status.WAITING:
                self._release_adapter(req)
        return out

    def _emit(self, out: SchedulerOutput, req: Request, start: int, n: int) -> None:
        """Schedule tokens [start, start + n) of `req`; charge its tenant for prompt tokens computed for the
        first time (a preempted request's recomputation is free) and for the token it will sample."""
        chunk = ScheduledChunk(req, start, n)
        out.chunks.append(chunk)
        prompt_end = min(start + n, len(req.prompt_ids))
        new_prompt = max(0, prompt_end - max(start, req.charged_prompt))
        req.charged_prompt = max(req.charged_prompt, prompt_end)
        self.vtc.charge(_tenant(req), new_prompt, int(chunk.samples))

    # ---- running ---------------------------------------------------------------------------
    def _schedule_running(self, out: SchedulerOutput) -> int:
        budget = self.config.max_batch_tokens
        scheduled: set[int] = set()  # id() of the requests given a chunk this step: never KV victims
        for req in list(self.running):  # oldest first
            if req.status is not Status.RUNNING or budget <= 0:
                continue
            n = self._chunk_len(req, budget)
            if n <= 0 or not self._grow_or_preempt(req, req.num_computed + n, scheduled):
                continue
            self._emit(out, req, req.num_computed, n)
            scheduled.add(id(req))
            budget -= n
        return budget

    def _grow_or_preempt(self, req: Request, num_tokens: int, scheduled: set[int]) -> bool:
        """Make room for `req` by preempting running requests not scheduled yet this step (`_kv_victim`); False
        if req itself went."""
        while not self.pool.grow(req.blocks, num_tokens):
            candidates = [r for r in self.running if id(r) not in scheduled]
            # The oldest running request goes only when nothing else can: it always progresses (liveness).
            victim = self._kv_victim([r for r in candidates if r is not self.running[0]] or candidates)
            self.preempt(victim)
            self._kv_preempted = True
            if victim is req:
                return False
        return True

    def _kv_victim(self, candidates: list[Request]) -> Request:
        """Who gives its blocks back: the newest candidate; under `fair`, the newest of the most-served tenant
        (a light tenant's request is not the one recomputed because it arrived last)."""
        if self.config.policy != "fair":
            return candidates[-1]
        tenants = dict.fromkeys(_tenant(r) for r in reversed(candidates))
        most_served = max(tenants, key=self.vtc.counter)  # ties: the newest candidate's tenant
        return [r for r in candidates if _tenant(r) == most_served][-1]

    def preempt(self, req: Request) -> None:
        """Free the request's KV blocks (it keeps its adapter ref and slot); it goes back to the queue head
        and is recomputed, outputs so far kept."""
        self.running.remove(req)
        self.pool.release(req.blocks)
        req.num_computed = req.num_published = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.vtc.enqueue(_tenant(req))
        self.on_preempt(req)

    # ---- fairness preemption ----------------------------------------------------------------
    def _preempt_for_fairness(self, out: SchedulerOutput) -> list[Request]:
        """Give every entitled waiting request (fairness.py) a sequence slot this step: a free one, else the
        slot of the newest running request of the most-served tenant over its share. Returns them in order:
        admission takes them first, so the slots go where they were freed for."""
        if not self.waiting:
            return []
        running = self._running_per_tenant()
        entitled = self._entitled(running)
        free = max(0, self.config.max_num_seqs - len(self.running))
        promised = entitled[:free]
        for req in entitled[free:]:
            victim = self._fairness_victim(running)
            if victim is None:
                break
            verdict = self._admit_adapter(req, out)  # a preemption is wasted unless the request can run now
            if verdict == "failed":
                self.waiting.remove(req)
            if verdict != "ok":
                continue
            victim.fair_preempted_at = len(victim.output_ids)
            self.preempt(victim)
            running[_tenant(victim)] -= 1
            promised.append(req)
        return promised

    def _fairness_victim(self, running: dict[str, int]) -> Request | None:
        """The newest running request of the most-served tenant over its share of slots, if any. A request
        preempted for fairness before is a candidate again only once it generated `REFAIR_TOKENS` more tokens:
        every one of its preemptions is paid for by progress, so its recomputation stays bounded and it ends."""
        cap = self.config.max_num_seqs
        candidates = [r for r in self.running if _refair_ok(r) and self.vtc.over_share(_tenant(r), running, cap)]
        if not candidates:
            return None
        tenants = dict.fromkeys(_tenant(r) for r in candidates)  # ordered: ties go to the oldest
        victim_tenant = max(tenants, key=self.vtc.counter)
        return [r for r in candidates if _tenant(r) == victim_tenant][-1]

    def _ranked(self, queues: dict[str, deque[Request]], running: dict[str, int]) -> list[tuple[str, bool]]:
        """Waiting tenants in admission order, with whether each is entitled."""
        worth = {t: request_worth(len(q[0].prompt_ids), q[0].params.max_tokens) for t, q in queues.items()}
        return self.vtc.order(worth, running, self.config.max_num_seqs)

    def _entitled(self, running: dict[str, int]) -> list[Request]:
        """The waiting requests of entitled tenants, in admission order."""
        queues = self._queues()
        return [r for t, entitled in self._ranked(queues, running) if entitled for r in queues[t]]

    def _running_per_tenant(self) -> Counter[str]:
        return Counter(_tenant(r) for r in self.running)

    def _queues(self) -> dict[str, deque[Request]]:
        """The oldest waiting requests of each tenant, at most `max_num_seqs` each (no step admits more),
        FCFS within a tenant; tenants in the order of their oldest request. The scan stops once every
        backlogged tenant has its share, so a flooding tenant's long queue costs little per step."""
        cap = self.config.max_num_seqs
        missing = sum(min(cap, n) for n in self.vtc.backlog().values())
        queues: dict[str, deque[Request]] = {}
        for req in self.waiting:
            if missing <= 0:
                break
            queue = queues.setdefault(_tenant(req), deque())
            if len(queue) < cap:
                queue.append(req)
                missing -= 1
        return queues

    # ---- waiting ---------------------------------------------------------------------------
    def _admit_fair(self, out: SchedulerOutput, budget: int, promised: list[Request]) -> None:
        """Admit the promised requests, then the least-served tenant's oldest request again and again
        (counters move as we admit)."""
        cap = self.config.max_num_seqs
        gate = _Gate(self)
        for req in promised:
            if budget <= 0 or len(self.running) >= cap:
                return
            if gate.skips(req):
                continue
            verdict, budget = self._admit_one(req, out, budget)
            if gate.stops(verdict, req):
                return
        queues, running = self._queues(), self._running_per_tenant()
        while queues and budget > 0 and len(self.running) < cap:
            tenant = self._ranked(queues, running)[0][0]
            req = queues[tenant].popleft()
            if not gate.skips(req):
                verdict, budget = self._admit_one(req, out, budget)
                if gate.stops(verdict, req):
                    break
                running[tenant] += verdict == "ok"
                if verdict in ("loading", "no_slot"):  # the tenant's other requests need the same adapter
                    queues[tenant].clear()
            if not queues[tenant]:
                del queues[tenant]

    def _admit_one(self, req: Request, out: SchedulerOutput, budget: int) -> tuple[str, int]:
        """`_try_admit` for a request still in the queue: takes it out when it started or failed."""
        verdict = self._try_admit(req, out, budget)
        if verdict in ("ok", "failed"):
            self.waiting.remove(req)
        return verdict, budget - (out.chunks[-1].n if verdict == "ok" else 0)

    def _admit_fcfs(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Request] = []
        gate = _Gate(self)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            if gate.skips(req):
                skipped.append(req)
                continue
            verdict = self._try_admit(req, out, budget)
            if verdict == "ok":
                budget -= out.chunks[-1].n
                continue
            if verdict == "failed":
                continue
            skipped.append(req)
            if gate.stops(verdict, req):
                break  # the pool is full: new work waits for blocks to come back
        self.waiting.extendleft(reversed(skipped))

    def _try_admit(self, req: Request, out: SchedulerOutput, budget: int) -> str:
        """Start `req` with its first chunk if its adapter and the KV pool allow: 'ok', or why not: 'loading',
        'no_slot', 'failed' (its adapter errored; listed in out.failed), 'sharing' (a running sibling is
        computing the prompt it will share) or 'no_blocks'. The caller takes it out of the queue on 'ok' and
        'failed'. A request that does not start keeps no blocks, and no adapter ref unless it started before."""
        verdict = self._admit_adapter(req, out)
        n = 0
        if verdict == "ok":
            verdict, n = self._admit_blocks(req, budget)
        if verdict in ("sharing", "no_blocks") and not req.started:
            self._release_adapter(req)
        if verdict != "ok":
            return verdict
        req.status, req.started, req.waiting_steps = Status.RUNNING, True, 0
        self.running.append(req)
        self.vtc.dequeue(_tenant(req))
        self._emit(out, req, req.num_computed, n)
        return "ok"

    def _admit_blocks(self, req: Request, budget: int) -> tuple[str, int]:
        """Give `req` the blocks of its first chunk: ('ok', its length), starting from the blocks the prefix
        cache holds for it; else why not ('sharing', 'no_blocks')."""
        if self.config.prefix_caching and not req.blocks:
            if self._sibling_computing(req):
                return "sharing", 0
            self._reuse_cached(req)
        n = self._chunk_len(req, budget)
        if not self.pool.grow(req.blocks, req.num_computed + n):
            self.pool.release(req.blocks)  # cached ones go back to the cache: a waiting request holds no blocks
            req.num_computed = req.num_published = 0
            return "no_blocks", 0
        return "ok", n

    def _sibling_computing(self, req: Request) -> bool:
        """A running choice of the same n > 1 request is still computing the prompt this one will find."""
        return req.group is not None and req.params.prompt_logprobs is None and any(
            r.group == req.group and r.num_computed < len(r.prompt_ids) for r in self.running)

    def _reuse_cached(self, req: Request) -> None:
        """Hold the longest published prefix of `req`'s full blocks, never the block of its last token (its
        logits are needed), and none when it scores its prompt (every position's logits are)."""
        usable = (req.num_tokens - 1) // self.pool.block_size
        if usable == 0 or req.params.prompt_logprobs is not None:
            return
        hits = self.pool.lookup(self._block_keys(req, usable)[:usable])
        req.blocks = self.pool.take(hits)
        req.num_computed = len(hits) * self.pool.block_size
        req.num_published = len(hits)
        self.prefix_queries += req.num_tokens
        self.prefix_hits += req.num_computed
        if not req.started:
            req.num_cached_tokens = min(req.num_computed, len(req.prompt_ids))

    def _block_keys(self, req: Request, num_blocks: int) -> list[bytes]:
        bs = self.pool.block_size
        tokens = req.prompt_ids if num_blocks * bs <= len(req.prompt_ids) else req.prompt_ids + req.output_ids
        extend_keys(req.block_keys, tokens, req.kv_identity.root, bs, num_blocks)
        return req.block_keys

    def publish_computed(self, req: Request) -> None:
        """After a step computed `req`'s chunk: publish the blocks it completed (their K/V are final)."""
        full = req.num_computed // self.pool.block_size
        if not self.config.prefix_caching or full <= req.num_published:
            return
        keys = self._block_keys(req, full)
        for i in range(req.num_published, full):
            self.pool.publish(req.blocks[i], keys[i], req.kv_identity.components)
        req.num_published = full

    def _chunk_len(self, req: Request, budget: int) -> int:
        """Tokens of `req` to compute this step: what is left, within the token budget, and for a request
        scoring its prompt, within the step's prompt-logprob rows (at least one, so it always progresses)."""
        n = min(req.num_tokens - req.num_computed, budget)
        scored = min(req.num_computed + n, len(req.prompt_ids) - 1) - req.num_computed  # rows predicting prompt
        if req.params.prompt_logprobs is None or scored <= 0:
            return n
        n = min(n, max(1, self._prompt_rows_left))
        self._prompt_rows_left -= min(n, scored)
        return n

    def _starving(self, req: Request) -> bool:
        """One more step blocked on a slot at the front; True once that has lasted `starvation_steps`."""
        req.waiting_steps += 1
        return req.waiting_steps >= self.config.starvation_steps

    def _admit_adapter(self, req: Request, out: SchedulerOutput) -> str:
        """'ok' (slots held or acquired, or base only), 'loading', 'no_slot' (all slots busy) or 'failed'.

        A merged request holds a slot for every adapter of a linear recipe (the virtual adapter's one for
        ties / dare), acquired all or nothing each step: one still loading gives the others' refs back at once,
        so requests waiting for slots never hold any (two merges cannot deadlock on each other's halves)."""
        names = _slot_names(req)
        if not names or self.adapters is None:
            req.slot = -1
            req.kv_identity = req.kv_identity or _identity(req, ())
            return "ok"
        if req.holds_adapter:  # started before (then preempted): the slots are still its own
            return "ok"
        if req.merge is not None and req.merge.virtual:
            remember(req.merge)  # keeps its virtual name resolvable for the host loader
        first, req.adapter_asked = not req.adapter_asked, True
        got = [self.adapters.acquire(name, first=first) for name in names]
        if all(g.state is SlotState.READY for g in got):
            req.slot, req.holds_adapter = got[0].slot, True
            if req.merge is not None:
                req.merge_slots = tuple(g.slot for g in got)  # recipe order: what the runner weights
            req.kv_identity = _identity(req, tuple(zip(names, (g.epoch for g in got), strict=True)))
            return "ok"
        for name, g in zip(names, got, strict=True):
            if g.state is SlotState.READY:
                self.adapters.release(name)
        return self._adapter_wait(req, out, names, got)

    def _adapter_wait(self, req: Request, out: SchedulerOutput, names: tuple[str, ...], got: list[Acquired]
                      ) -> str:
        """Why `req` cannot have its adapters' slots this step: 'failed' (listed in out.failed) when one errored
        or the slots not pinned by other adapters can never hold them all, else 'no_slot' or 'loading'."""
        errored = next(((n, g) for n, g in zip(names, got, strict=True) if g.state is SlotState.ERRORED), None)
        if errored is not None:
            out.failed.append((req, f"adapter {errored[0]!r} failed to load: {errored[1].reason}"))
            return "failed"
        if not any(g.state is SlotState.NO_SLOT for g in got):
            return "loading"
        usable = self.adapters.usable_slots(names) if len(names) > 1 else 1  # one slot is never pinned
        if len(names) > usable:
            out.failed.append((req, f"{req.merge.label if req.merge else names[0]} needs {len(names)} device "
                                    f"slots at once, but only {usable} are not pinned by other adapters"))
            return "failed"
        return "no_slot"

    # ---- finishing -------------------------------------------------------------------------
    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request wherever it is; its blocks and adapter ref return at once."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.status is not Status.FINISHED:
            self.vtc.depart(_tenant(req), queued=req.status is Status.WAITING)
        self.pool.release(req.blocks)
        self._release_adapter(req)
        req.status = Status.FINISHED

    def _release_adapter(self, req: Request) -> None:
        if req.holds_adapter and self.adapters is not None:
            for name in _slot_names(req):
                self.adapters.release(name)
        req.holds_adapter, req.slot = False, -1
        if req.merge is not None:
            req.merge_slots = ()


REFAIR_TOKENS = 16  # tokens a request generates between two of its preemptions for fairness


def _refair_ok(req: Request) -> bool:
    """Never preempted for fairness, or it generated REFAIR_TOKENS since it last was."""
    return req.fair_preempted_at is None or len(req.output_ids) - req.fair_preempted_at >= REFAIR_TOKENS


class _Gate:
    """One step's admission stops: the pool is full ('no_blocks' stops everything), or the first request tried
    is starving for slots: blocked on them for `starvation_steps` steps, or at once when nothing runs (no
    throughput to protect). Blocked means 'no_slot', or 'loading' for a request that needs several slots at
    once (a linear merge gives back the ones it got while the others load, so two such requests could evict
    each other's forever). From then on only requests that need no new slot ref (they hold theirs since they
    started, or use the base model) are admitted: they are what drains a slot, and nobody evicts the first's."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._first = True
        self.starving = False

    def skips(self, req: Request) -> bool:
        return self.starving and not req.holds_adapter and bool(_slot_names(req))

    def stops(self, verdict: str, req: Request) -> bool:
        first, self._first = self._first, False
        if verdict == "no_blocks":
            return True
        blocked = verdict == "no_slot" or (verdict == "loading" and len(_slot_names(req)) > 1)
        if first and blocked and (self._scheduler._starving(req) or not self._scheduler.running):
            self.starving = True
        return False


def _identity(req: Request, registrations: tuple[tuple[str, int], ...]) -> KVIdentity:
    """What `req`'s K/V depends on besides its tokens: the registrations its slots hold (name, epoch), a merge's
    recipe (strategy and weights, in its label), its cache salt."""
    kind = req.merge.label if req.merge is not None else ("adapter" if registrations else "base")
    return KVIdentity(f"{kind}|salt={req.cache_salt or ''}", registrations)


def _tenant(req: Request) -> str:
    """The fairness tenant: its adapter, "" for the base model, a merge's recipe label ("merge:a*0.7+b*0.3"):
    a recipe is its own tenant, charged apart from the adapters it merges."""
    return req.merge.label if req.merge is not None else tenant_of(req.adapter)


def _slot_names(req: Request) -> tuple[str, ...]:
    """The adapters whose slots `req` holds while it runs: a linear merge's adapters in recipe order, a ties /
    dare merge's virtual adapter, its adapter, or none (the base model)."""
    if req.merge is not None:
        return req.merge.slot_names
    return () if req.adapter is None else (req.adapter,)
