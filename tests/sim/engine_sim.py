"""A deterministic simulation of the engine core, tested the way FoundationDB and TigerBeetle test theirs.

The real `LLMEngine` (scheduler, fairness, KV block pool, adapter SlotTable and its message protocol, n > 1
choice groups, merges, structured output, sampler, postprocessing) runs over fake parts (`EngineParts`):

- a fake forward whose "KV cache" holds, per pool position, a 64-bit hash chained from the previous position
  of the same sequence, the token and the *KV identity* (base model, the adapter registration in the slot the
  row reads, a merge of them). Each row's logits are a fixed random row picked by that hash. So a row's logits
  depend on everything its sequence ever read through its block table and its slot: a block shared or
  overwritten by mistake, or a slot holding another registration's weights, changes the tokens;
- a slot writer that records which registration each slot holds (and can fail a copy);
- a host loader that answers after a seeded number of steps (and can fail a read).

Because the fake forward is batch-invariant, a greedy request's tokens are a pure function of its prompt and
KV identity (`reference_tokens`): the oracle a real model cannot give cheaply.

A scenario (`Scenario`) is drawn from a stream of integers (`Draws`): a `random.Random(seed)` for the seeded
runs, or hypothesis' data for shrinking. It holds the engine's limits and a script of events per step:
arrivals (base, adapters, linear and ties merges, n > 1, prompt logprobs, stops, structured output, seeds),
aborts, admin commands (register, delete, replace with other weights, pin, unpin) and injected faults (a
read that fails, a slot copy that fails, a forward that raises, a sampler that raises on one row).

`run_scenario` drives the engine as the AsyncEngine and the runtime do (admin and aborts between steps, the
adapter messages applied at step start) and checks the invariants after every step (`_check_step`) and at
the end; a violation raises `SimViolation` saying which, at which step.

Liveness bound (derived in docs/architecture.md, "Testing the engine by simulation"): once the last event
has happened, the engine is idle within  sum over live requests of (prompt + max_tokens)  +
(max load delay + 3) x (live requests + 1)  steps: the oldest running request is never preempted (KV victims
are newer; fairness never preempts a request its tenant's only runner), so it computes at least one token
every step; and when nothing runs, a request starts within load delay + 3 steps.
"""

from __future__ import annotations

import dataclasses
import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from loraplex.adapters.merge import MergeRecipe, is_virtual, recipe_of
from loraplex.adapters.messages import HostLoaded, HostLoadFailed
from loraplex.adapters.peft_config import LoraSpec
from loraplex.adapters.weights import AdapterWeights
from loraplex.server.config import LoRAConfig
from loraplex.server.engine.block_pool import BlockPool
from loraplex.server.engine.engine import EngineConfig, EngineParts, LLMEngine, RequestRejected
from loraplex.server.engine.guided import GuidedCompiler, GuidedSpec
from loraplex.server.engine.model_runner import RunnerOutput
from loraplex.server.engine.request import RequestOutput, Status
from loraplex.server.engine.sampler import Sampler, SampleRow
from loraplex.server.engine.sampling_params import SamplingParams
from loraplex.server.engine.scheduler import ScheduledChunk, SchedulerConfig

MASK = (1 << 64) - 1
TABLE_ROWS = 1024  # distinct logit rows the fake forward picks from
ADAPTER_NAMES = ("a0", "a1", "a2", "a3", "a4")
REGEXES = ("[a-z]{1,6}", "(yes|no)( maybe)?", "[0-9]+")
CHOICES = (("red", "green", "blue"), ("alpha", "beta"))


class SimViolation(AssertionError):
    """An invariant failed: the message says which, at which step."""


def mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix-style); deterministic across processes, unlike hash(str)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & MASK)) * 0xBF58476D1CE4E5B9) & MASK
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & MASK
        h ^= h >> 29
    return h


def text_id(text: str) -> int:
    return zlib.crc32(text.encode())


# ---- the fake model: logits table and the reference ---------------------------------------------------------
class FakeModel:
    """`TABLE_ROWS` fixed random logit rows over the vocabulary; a position's row is picked by its chain hash."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.table = torch.randn(TABLE_ROWS, vocab_size, generator=g) * 3.0  # [R, V] fp32
        self.logprobs = torch.log_softmax(self.table, dim=-1)
        self.argmax = self.table.argmax(dim=-1).tolist()

    @staticmethod
    def chain(prev: int, token: int, position: int, kvid: int) -> int:
        return mix(prev, token, position, kvid)

    def row(self, h: int) -> int:
        return h % TABLE_ROWS

    def prompt_hashes(self, prompt: Sequence[int], kvid: int) -> list[int]:
        h, out = 0, []
        for p, t in enumerate(prompt):
            h = self.chain(h, t, p, kvid)
            out.append(h)
        return out

    def reference_tokens(self, prompt: Sequence[int], kvid: int, params: SamplingParams, eos_ids: tuple[int, ...],
                         seed: int | None) -> list[int]:
        """The request alone, token by token: each row through the real sampler on its own (a grammar aside),
        until max_tokens, a stop token or EOS (unless ignore_eos; not before min_tokens). Stop strings may end
        it earlier (a prefix of this). Batched, the engine must give exactly these tokens."""
        h = self.prompt_hashes(prompt, kvid)[-1]
        out: list[int] = []
        position = len(prompt)
        sampler = Sampler()
        plain = params.greedy and not params.has_penalties and not params.logit_bias and not params.min_tokens
        while len(out) < params.max_tokens:
            if plain:  # the argmax of the row, precomputed
                token = self.argmax[self.row(h)]
            else:
                row = SampleRow(params, seed, eos_ids, prompt, out)
                token = int(sampler.sample(self.table[self.row(h)][None], [row]).tokens[0])
            out.append(token)
            stops = token in params.stop_token_ids or (not params.ignore_eos and token in eos_ids)
            if stops and len(out) >= params.min_tokens:
                break
            h = self.chain(h, token, position, kvid)
            position += 1
        return out


# ---- scenarios -------------------------------------------------------------------------------------------
class Draws:
    """A stream of bounded integers: every choice a scenario makes comes from here."""

    def __init__(self, source: Callable[[int, int], int]) -> None:
        self._source = source
        self.log: list[int] = []  # what was drawn, in order: replays the scenario (`from_list`)

    @classmethod
    def from_seed(cls, seed: int) -> Draws:
        rng = random.Random(seed)
        return cls(rng.randint)

    @classmethod
    def from_list(cls, values: Sequence[int]) -> Draws:
        it = iter(values)

        def source(lo: int, hi: int) -> int:
            return min(max(next(it, lo), lo), hi)
        return cls(source)

    def int(self, lo: int, hi: int) -> int:
        value = self._source(lo, hi)
        self.log.append(value)
        return value

    def chance(self, percent: int) -> bool:
        return self.int(0, 99) < percent

    def pick(self, options: Sequence[Any]) -> Any:
        return options[self.int(0, len(options) - 1)]


@dataclass(frozen=True)
class SimConfig:
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_loras: int
    max_batch_tokens: int
    max_model_len: int
    policy: str
    starvation_steps: int
    max_cpu_loras: int
    max_load_delay: int
    prefix_caching: bool = True


@dataclass(frozen=True)
class Target:
    """What a request runs on: the base model (no adapter), one adapter, or a merge recipe of adapters."""

    adapter: str | None = None
    merge: tuple[tuple[str, float], ...] = ()
    strategy: str = "linear"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.merge) if self.merge else ((self.adapter,) if self.adapter else ())

    def recipe(self) -> MergeRecipe | None:
        if not self.merge:
            return None
        return MergeRecipe(self.merge, self.strategy, density=0.5 if self.strategy != "linear" else 1.0)

    def __str__(self) -> str:
        if self.merge:
            return f"{self.strategy}({'+'.join(f'{n}*{w}' for n, w in self.merge)})"
        return self.adapter or "base"


@dataclass(frozen=True)
class Arrival:
    rid: str
    prompt: tuple[int, ...]
    target: Target
    params: SamplingParams
    n: int = 1
    cache_salt: str | None = None


@dataclass(frozen=True)
class Event:
    step: int
    kind: str  # arrive | abort | register | delete | replace | pin | unpin | fail_load | fail_copy | fail_forward
    name: str = ""  # | fail_sample
    arrival: Arrival | None = None

    def __str__(self) -> str:
        if self.arrival is not None:
            a = self.arrival
            return (f"@{self.step} arrive {a.rid} n={a.n} {a.target} prompt={len(a.prompt)} "
                    f"max_tokens={a.params.max_tokens}{' greedy' if a.params.greedy else ''}"
                    f"{' guided' if a.params.guided else ''}{' plp' if a.params.prompt_logprobs is not None else ''}"
                    f"{' stop' if a.params.stop else ''}")
        return f"@{self.step} {self.kind} {self.name}".rstrip()


@dataclass(frozen=True)
class Scenario:
    config: SimConfig
    events: tuple[Event, ...]
    draws: tuple[int, ...] = ()  # what generated it (replay); empty after shrinking

    def describe(self) -> str:
        return "\n".join([str(self.config), *map(str, self.events)])

    def without(self, index: int) -> Scenario:
        return dataclasses.replace(self, events=self.events[:index] + self.events[index + 1:], draws=())


def generate(d: Draws, vocab_size: int, *, max_events: int = 20) -> Scenario:
    """Draw a scenario: limits, then a script of events over steps (registrations tracked as they happen, so
    arrivals name registered adapters, as the API would have admitted them)."""
    cfg = _draw_config(d)
    registered: list[str] = []
    events: list[Event] = []
    rids: list[str] = []
    step = 0
    for name in ADAPTER_NAMES[: d.int(0, 3)]:  # some adapters exist before the first request
        events.append(Event(0, "register", name))
        registered.append(name)
    for i in range(d.int(1, max_events)):
        step += d.pick((0, 0, 1, 1, 2, 3, 5, 8))
        kind = d.pick(("arrive",) * 16 + ("abort", "abort", "register", "register", "delete", "replace", "pin",
                                           "unpin", "fail_load", "fail_copy", "fail_forward", "fail_sample"))
        if kind == "arrive":
            arrival = _draw_arrival(d, f"r{i}", cfg, registered, vocab_size)
            events.append(Event(step, kind, arrival=arrival))
            rids.append(arrival.rid)
        elif kind in ("abort", "fail_sample"):
            if rids:
                events.append(Event(step, kind, d.pick(rids)))
        elif kind == "register":
            free = [n for n in ADAPTER_NAMES if n not in registered]
            if free:
                registered.append(d.pick(free))
                events.append(Event(step, kind, registered[-1]))
        elif kind == "delete":
            if registered:
                name = d.pick(registered)
                registered.remove(name)
                events.append(Event(step, kind, name))
        elif kind in ("fail_load", "fail_copy", "replace", "pin", "unpin"):
            if registered:
                events.append(Event(step, kind, d.pick(registered)))
        else:
            events.append(Event(step, kind))
    return Scenario(cfg, tuple(events), tuple(d.log))


def _draw_config(d: Draws) -> SimConfig:
    block_size = d.pick((1, 2, 4, 4, 8))
    max_model_len = d.pick((12, 24, 40))
    min_blocks = -(-max_model_len // block_size)  # a request of the longest legal size always fits alone
    return SimConfig(
        num_blocks=min_blocks + d.pick((0, 1, 2, min_blocks // 2, min_blocks, 3 * min_blocks)),
        block_size=block_size,
        max_num_seqs=d.int(1, 5),
        max_loras=d.int(1, 3),
        max_batch_tokens=d.pick((2, 3, 8, 16, 64, 64)),
        max_model_len=max_model_len,
        policy=d.pick(("fair", "fcfs")),
        starvation_steps=d.pick((1, 2, 4, 8, 64)),
        max_cpu_loras=d.int(3, 5),
        max_load_delay=d.int(0, 3),
        prefix_caching=d.chance(80),
    )


SHARED_PREFIXES = 3  # prompts often start with one of a few seeded "system prompts": prefix-cache hits


def _draw_arrival(d: Draws, rid: str, cfg: SimConfig, registered: list[str], vocab_size: int) -> Arrival:
    target = _draw_target(d, registered)
    prompt_len = d.int(1, cfg.max_model_len - 1)
    shared = random.Random(d.int(0, SHARED_PREFIXES - 1))
    head = [shared.randint(5, vocab_size - 1) for _ in range(d.int(0, prompt_len))] if d.chance(60) else []
    prompt = tuple(head + [d.int(5, vocab_size - 1) for _ in range(prompt_len - len(head))])
    params = _draw_params(d, cfg.max_model_len - prompt_len)
    n = d.pick((1, 1, 1, 1, 2, 3)) if params.max_tokens > 0 else 1
    return Arrival(rid, prompt, target, params, n, cache_salt=d.pick((None, None, None, "t1", "t2")))


def _draw_target(d: Draws, registered: list[str]) -> Target:
    kind = d.int(0, 9)
    if kind < 3 or not registered:
        return Target()
    if kind < 8 or len(registered) < 2:
        return Target(adapter=d.pick(registered))
    names = list(registered)
    picked = [names.pop(d.int(0, len(names) - 1)) for _ in range(min(len(names), d.int(2, 3)))]
    weights = tuple((name, d.pick((0.5, 1.0, 0.25))) for name in picked)
    return Target(merge=weights, strategy=d.pick(("linear", "linear", "ties")))


def _draw_params(d: Draws, room: int) -> SamplingParams:
    prompt_logprobs = d.pick((None, None, None, 0, 2)) if d.chance(30) else None
    lowest = 0 if prompt_logprobs is not None else 1
    max_tokens = d.int(lowest, min(room, 12))
    kw: dict[str, Any] = dict(max_tokens=max_tokens, prompt_logprobs=prompt_logprobs,
                              ignore_eos=d.chance(50), logprobs=d.pick((None, None, 0, 2)))
    if d.chance(60):
        kw["temperature"] = 0.0
    else:
        kw.update(temperature=d.pick((0.7, 1.0)), top_k=d.pick((0, 5)), min_p=d.pick((0.0, 0.0, 0.1)),
                  seed=d.pick((None, d.int(0, 1000))))
    if d.chance(10):
        kw.update(repetition_penalty=d.pick((1.0, 1.5)), frequency_penalty=d.pick((0.0, 0.5)),
                  presence_penalty=d.pick((0.0, -0.5)))
    if d.chance(10):
        kw["logit_bias"] = {d.int(5, 300): float(d.pick((-5, 5)))}
    if d.chance(15):
        kw["stop"] = (d.pick(("a", "e", " th", "in")),)
    if d.chance(10):
        kw["stop_token_ids"] = (d.int(5, 300),)
    if d.chance(10) and max_tokens:
        kw["min_tokens"] = d.int(0, max_tokens)
    if d.chance(10) and max_tokens:
        kw["guided"] = (GuidedSpec.regex(d.pick(REGEXES)) if d.chance(60) else GuidedSpec.choice(d.pick(CHOICES)))
    return SamplingParams(**kw)


# ---- the fake parts ----------------------------------------------------------------------------------------
@dataclass
class World:
    """Everything outside the engine: registrations, slot contents, the fake KV, pending reads, faults."""

    model: FakeModel
    cfg: SimConfig
    registry: dict[str, int] = field(default_factory=dict)  # name -> registration id
    pinned: set[str] = field(default_factory=set)
    slots: list[tuple | None] = field(default_factory=list)  # per slot: what was copied there
    kv: list[int | None] = field(default_factory=list)  # per pool position: the chain hash written there
    jobs: list[tuple[int, str, int]] = field(default_factory=list)  # (due step, name, epoch)
    fail_load: set[str] = field(default_factory=set)
    fail_copy: set[str] = field(default_factory=set)
    fail_forward: bool = False
    fail_sample: set[str] = field(default_factory=set)  # request ids whose row makes the sampler raise
    tags: dict[int, tuple[tuple, AdapterWeights]] = field(default_factory=dict)  # id(weights) -> its tag
    expected: dict[str, int] = field(default_factory=dict)  # request id -> the KV identity it must run on
    step: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    next_reg: int = 1

    def register(self, name: str) -> int:
        self.registry[name] = self.next_reg
        self.next_reg += 1
        return self.registry[name]

    def weights(self, tag: tuple) -> AdapterWeights:
        """Weights standing for `tag` (what a slot copy of them makes the slot hold): `tags` maps them back."""
        weights = AdapterWeights(LoraSpec(r=1, lora_alpha=1.0, target_modules=(repr(tag),)), {}, size_bytes=1024)
        self.tags[id(weights)] = (tag, weights)  # keeps `weights` alive, so its id is never reused meanwhile
        return weights

    def current_tag(self, name: str) -> tuple | None:
        """What reading `name`'s files now gives (None: not registered), as the store's reader would."""
        if not is_virtual(name):
            return ("adapter", name, self.registry[name]) if name in self.registry else None
        recipe = recipe_of(name)
        if recipe is None or any(n not in self.registry for n in recipe.names):
            return None
        return ("virtual", name, tuple(self.registry[n] for n in recipe.names))

    def kvid(self, target: Target) -> int:
        """The KV identity a request for `target` must run on, given the registrations now."""
        if target.merge and target.strategy != "linear":
            recipe = target.recipe()
            return _tag_kvid(("virtual", recipe.virtual_name, tuple(self.registry[n] for n in recipe.names)))
        if target.merge:
            return mix(2, *(mix(_tag_kvid(("adapter", n, self.registry[n])), round(w * 1000))
                            for n, w in target.merge))
        return _tag_kvid(("adapter", target.adapter, self.registry[target.adapter])) if target.adapter else 0


def _tag_kvid(tag: tuple) -> int:
    return mix(1, text_id(repr(tag)))


class FakeLoader:
    """Answers each read `delay` steps after it was asked (0..max_load_delay, seeded); merges repeated asks."""

    def __init__(self, world: World, post: Callable[[object], None]) -> None:
        self.world, self.post = world, post

    def submit(self, name: str, epoch: int, urgent: bool) -> None:
        w = self.world
        if any(job[1:] == (name, epoch) for job in w.jobs):
            return
        w.jobs.append((w.step + w.rng.randint(0, w.cfg.max_load_delay), name, epoch))

    def deliver_due(self) -> None:
        w = self.world
        due = [job for job in w.jobs if job[0] <= w.step]
        w.jobs = [job for job in w.jobs if job[0] > w.step]
        for _, name, epoch in due:
            tag = w.current_tag(name)
            if tag is None:
                self.post(HostLoadFailed(name, epoch, f"adapter {name!r} is not registered"))
            elif name in w.fail_load:
                w.fail_load.discard(name)
                self.post(HostLoadFailed(name, epoch, "injected: the adapter's files are corrupt"))
            else:
                self.post(HostLoaded(name, epoch, w.weights(tag), 0.0))

    def close(self) -> None:
        pass


class FakeSlots:
    """The slot writer: records the tag of what each slot holds; a copy of a `fail_copy` adapter raises."""

    def __init__(self, world: World) -> None:
        self.world = world

    def write(self, slot: int, weights: AdapterWeights) -> None:
        tag = self.world.tags[id(weights)][0]
        name = tag[1]
        if name in self.world.fail_copy:
            self.world.fail_copy.discard(name)
            raise RuntimeError("injected: the slot copy failed")
        self.world.slots[slot] = tag

    def clear(self, slot: int) -> None:
        self.world.slots[slot] = None

    def fence(self) -> None:
        pass


class FakeRunner:
    """The fake forward: chains each computed position's hash through the KV pool (read through the block
    table) and the KV identity of the slot(s) the row reads; checks that identity against the request's."""

    def __init__(self, world: World, block_size: int) -> None:
        self.world, self.bs = world, block_size
        self.forwards = 0

    def execute(self, chunks: list[ScheduledChunk]) -> RunnerOutput:
        w = self.world
        if w.fail_forward:
            w.fail_forward = False
            raise RuntimeError("injected: the forward pass failed")
        self.forwards += 1
        rows: list[int] = []
        prompt_rows: list[tuple[ScheduledChunk, list[int]]] = []
        for c in chunks:
            req = c.request
            kvid = self._kvid(req)
            if kvid != w.expected[req.request_id]:
                raise SimViolation(f"step {w.step}: {req.request_id} ran on KV identity {kvid}, expected "
                                   f"{w.expected[req.request_id]} (a slot holds another registration's weights)")
            hashes = []
            for p in range(c.start, c.start + c.n):
                prev = self._read(req.blocks, p - 1, req.request_id) if p else 0
                h = FakeModel.chain(prev, req.token_at(p, p + 1)[0], p, kvid)
                w.kv[self._pos(req.blocks, p)] = h
                hashes.append(h)
            if c.samples:
                rows.append(w.model.row(hashes[-1]))
            if req.params.prompt_logprobs is not None:
                n = min(c.start + c.n, len(req.prompt_ids) - 1) - c.start
                if n > 0:
                    prompt_rows.append((c, [w.model.row(h) for h in hashes[:n]]))
        table = w.model.table
        logits = table[torch.tensor(rows, dtype=torch.long)] if rows else table[:0]
        return RunnerOutput(logits, [(c, table[torch.tensor(r, dtype=torch.long)]) for c, r in prompt_rows])

    def _pos(self, blocks: list[int], p: int) -> int:
        return blocks[p // self.bs] * self.bs + p % self.bs

    def _read(self, blocks: list[int], p: int, rid: str) -> int:
        h = self.world.kv[self._pos(blocks, p)]
        if h is None:
            raise SimViolation(f"step {self.world.step}: {rid} read position {p} that nothing wrote")
        return h

    def _kvid(self, req: Any) -> int:
        slots = self.world.slots
        if req.merge is not None and not req.merge.virtual:
            tags = [slots[s] for s in req.merge_slots]
            if any(t is None or t[1] != n for t, n in zip(tags, req.merge.names, strict=True)):
                raise SimViolation(f"step {self.world.step}: {req.request_id} merge slots hold {tags}")
            return mix(2, *(mix(_tag_kvid(t), round(wt * 1000)) for t, wt in zip(tags, req.merge.weights,
                                                                                     strict=True)))
        if req.slot < 0:
            if req.adapter is not None or req.merge is not None:
                raise SimViolation(f"step {self.world.step}: {req.request_id} runs without its adapter's slot")
            return 0
        tag = slots[req.slot]
        wanted = req.merge.virtual_name if req.merge is not None else req.adapter
        if tag is None or tag[1] != wanted:
            raise SimViolation(f"step {self.world.step}: {req.request_id} ({wanted}) reads slot {req.slot} "
                               f"holding {tag}")
        return _tag_kvid(tag)


# ---- running a scenario -------------------------------------------------------------------------------------
@dataclass
class Tracked:
    arrival: Arrival
    index: int  # choice index within its arrival
    target: Target
    kvid: int
    seed: int | None = None  # the engine's sampling seed for it (its own, or the random one it was given)
    params: SamplingParams | None = None  # its own (a choice's seed differs from its arrival's)
    outputs: list[RequestOutput] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return bool(self.outputs) and self.outputs[-1].finished


@dataclass
class Report:
    steps: int = 0
    requests: int = 0
    rejected: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    idle_after: int = 0  # steps from the last event until idle
    idle_bound: int = 0
    checked_greedy: int = 0  # outputs equal to their solo reference (greedy or sampled, no grammar)
    checked_prompt_logprobs: int = 0
    preemptions: int = 0
    prefix_hits: int = 0  # tokens found in the prefix cache


class Simulation:
    def __init__(self, scenario: Scenario, tokenizer: Any, model: FakeModel, guided: GuidedCompiler | None,
                 *, check_guided: bool = True) -> None:
        self.scenario = scenario
        cfg = scenario.config
        self.world = World(model, cfg, slots=[None] * cfg.max_loras, kv=[None] * (cfg.num_blocks * cfg.block_size),
                           rng=random.Random(text_id(scenario.describe())))
        self.runner = FakeRunner(self.world, cfg.block_size)
        self.loader: FakeLoader | None = None
        eos_ids = (tokenizer.eos_token_id,)

        def make_loader(post: Callable[[object], None], wake: Callable[[], None]) -> FakeLoader:
            self.loader = FakeLoader(self.world, post)
            return self.loader

        parts = EngineParts(tokenizer, model.vocab_size, eos_ids, torch.device("cpu"),
                            BlockPool(cfg.num_blocks, cfg.block_size), self.runner, FakeSlots(self.world),
                            make_loader, guided)
        self.engine = LLMEngine.from_parts(EngineConfig(
            max_model_len=cfg.max_model_len, block_size=cfg.block_size, num_kv_blocks=cfg.num_blocks,
            scheduler=SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_batch_tokens=cfg.max_batch_tokens,
                                      starvation_steps=cfg.starvation_steps, policy=cfg.policy,
                                      max_prompt_logprob_rows=4, prefix_caching=cfg.prefix_caching),
            lora=LoRAConfig(max_loras=cfg.max_loras, max_lora_rank=8, max_cpu_loras=cfg.max_cpu_loras,
                            max_cpu_lora_bytes=4096)), parts)
        self.engine.adapter_port.is_registered = lambda name: name in self.world.registry
        self.engine.scheduler.on_preempt = self._preempted
        self._wrap_sampler()
        self.tracked: dict[str, Tracked] = {}
        self.report = Report()
        self.check_guided = check_guided
        self.eos_ids = eos_ids
        self._stalled = 0

    def _preempted(self, req: Any) -> None:
        self.report.preemptions += 1

    def _wrap_sampler(self) -> None:
        sampler, world = self.engine.sampler, self.world
        sample = sampler.sample

        def sample_or_fail(logits: torch.Tensor, rows: list, bitmask: Any = None) -> Any:
            doomed = {id(self.engine.requests[r].prompt_ids) for r in world.fail_sample if r in self.engine.requests}
            if any(id(row.prompt_ids) in doomed for row in rows):
                raise RuntimeError("injected: sampling failed on one row")
            return sample(logits, rows, bitmask)
        sampler.sample = sample_or_fail

    # ---- the driver ----------------------------------------------------------------------------------------
    def run(self, max_steps: int = 100_000) -> Report:
        events = sorted(self.scenario.events, key=lambda e: e.step)
        last = events[-1].step if events else 0
        i = 0
        for step in range(max_steps):
            self.world.step = step
            while i < len(events) and events[i].step == step:
                self._apply(events[i])
                i += 1
            if step == last:
                self.report.idle_bound = self._idle_bound()
            if step > last and not self.engine.has_work():
                self.report.idle_after = step - last
                self.report.steps = step
                self.report.prefix_hits = self.engine.prefix_cache_hits
                self._check_idle()
                return self.report
            if step > last and step - last > self.report.idle_bound:
                live = [r for r in self.engine.requests.values()]
                raise SimViolation(f"not idle {step - last} steps after the last event (bound "
                                   f"{self.report.idle_bound}); live: " + ", ".join(
                                       f"{r.request_id}:{r.status.value}:{r.num_computed}/{r.num_tokens}"
                                       for r in live))
            assert self.loader is not None
            self.loader.deliver_due()
            result = self.engine.step()
            self._collect(result.outputs)
            self._check_step()
            self._check_progress(result)
        raise SimViolation(f"ran {max_steps} steps")

    def _check_progress(self, result: Any) -> None:
        """No stall: while requests are in the engine, some token is computed or some request ends at least
        every `max_load_delay + 4` steps (a read, its slot copy, an admission; nothing else may hold everyone)."""
        if result.computed or result.outputs or not self.engine.has_work():
            self._stalled = 0
            return
        self._stalled += 1
        if self._stalled > self.scenario.config.max_load_delay + 4:
            waiting = ", ".join(f"{r.request_id}({r.adapter or r.merge or 'base'})"
                                for r in self.engine.scheduler.waiting)
            raise SimViolation(f"step {self.world.step}: no progress for {self._stalled} steps; waiting: {waiting}")

    def _idle_bound(self) -> int:
        live = [t for t in self.tracked.values() if not t.finished]
        work = sum(len(t.arrival.prompt) + t.arrival.params.max_tokens for t in live)
        return work + (self.scenario.config.max_load_delay + 3) * (len(live) + 1)

    def _apply(self, e: Event) -> None:
        w, engine = self.world, self.engine
        port = engine.adapter_port
        if e.kind == "arrive":
            self._arrive(e.arrival)
        elif e.kind == "abort":
            for t in [t for t in self.tracked.values() if t.arrival.rid == e.name]:
                rid = _choice_id(e.name, t.index)
                out = engine.abort(rid)
                if out is not None:
                    self._collect([out])
        elif e.kind == "register" and e.name not in w.registry:
            reg = w.register(e.name)
            port.register(e.name, w.weights(("adapter", e.name, reg)), pinned=False)
        elif e.kind in ("delete", "replace") and e.name in w.registry:
            del w.registry[e.name]
            w.pinned.discard(e.name)
            port.forget(e.name)  # what AdapterStore.unregister posts, then the runtime fails the queued ones
            self._collect(engine.fail_adapter(e.name, f"adapter {e.name!r} was unregistered"))
            if e.kind == "replace":
                reg = w.register(e.name)
                port.register(e.name, w.weights(("adapter", e.name, reg)), pinned=False)
        elif e.kind == "pin" and e.name in w.registry and len(w.pinned) + 1 < w.cfg.max_loras:
            w.pinned.add(e.name)  # the store's pin budget: one slot always stays unpinned
            port.pin(e.name, True)
        elif e.kind == "unpin" and e.name in w.pinned:
            w.pinned.discard(e.name)
            port.pin(e.name, False)
        elif e.kind == "fail_load":
            w.fail_load.add(e.name)
        elif e.kind == "fail_copy":
            w.fail_copy.add(e.name)
        elif e.kind == "fail_forward":
            w.fail_forward = True
        elif e.kind == "fail_sample":
            w.fail_sample.update(_choice_id(e.name, i) for i in range(3))

    def _arrive(self, a: Arrival) -> None:
        """What the API does: 404 for an adapter not registered now, then one engine request per choice."""
        if any(n not in self.world.registry for n in a.target.names) or \
                len(set(a.target.names)) != len(a.target.names):
            self.report.rejected += 1
            return
        kvid = self.world.kvid(a.target)
        recipe = a.target.recipe()
        for i in range(a.n):
            rid = _choice_id(a.rid, i)
            seeded = i and a.params.seed is not None
            params = dataclasses.replace(a.params, seed=a.params.seed + i) if seeded else a.params
            self.world.expected[rid] = kvid
            try:
                self.engine.add_request(rid, list(a.prompt), params, a.target.adapter, recipe,
                                        prefix_of=_choice_id(a.rid, 0) if i else None, cache_salt=a.cache_salt)
            except RequestRejected:
                self.report.rejected += 1
                return
            self.tracked[rid] = Tracked(a, i, a.target, kvid, self.engine.requests[rid].seed, params=params)
            self.report.requests += 1

    def _collect(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            t = self.tracked.get(out.request_id)
            if t is None:
                raise SimViolation(f"step {self.world.step}: output for unknown request {out.request_id}")
            if t.finished:
                raise SimViolation(f"step {self.world.step}: {out.request_id} got an output after its end: {out}")
            t.outputs.append(out)
            if out.finished:
                self._check_finished(out.request_id, t)

    # ---- invariants -----------------------------------------------------------------------------------------
    def _check_step(self) -> None:
        engine, step = self.engine, self.world.step
        live = list(engine.requests.values())
        holders = [0] * engine.pool.num_blocks
        for req in live:
            if req.status is Status.FINISHED:
                raise SimViolation(f"step {step}: finished {req.request_id} is still in the engine")
            for b in req.blocks:
                holders[b] += 1
            if req.status is Status.WAITING and req.blocks:
                raise SimViolation(f"step {step}: waiting {req.request_id} holds blocks {req.blocks}")
            if req.status is Status.WAITING and not req.started and req.holds_adapter:
                raise SimViolation(f"step {step}: {req.request_id} never started yet holds an adapter ref")
            if self.tracked[req.request_id].finished:
                raise SimViolation(f"step {step}: {req.request_id} ended but is still in the engine")
        pool = engine.pool
        for b, n in enumerate(holders):
            if pool.holders(b) != n:
                raise SimViolation(f"step {step}: block {b} counts {pool.holders(b)} holders, requests hold it {n}x")
        if pool.num_free != holders.count(0):
            raise SimViolation(f"step {step}: {pool.num_free} free blocks, {holders.count(0)} unheld")
        refs: dict[int, int] = {}
        for req in live:
            if req.holds_adapter:
                for s in (req.merge_slots or (req.slot,)):
                    refs[s] = refs.get(s, 0) + 1
        for s, occupant in enumerate(engine.adapters.occupancy()):
            held = 0 if occupant is None else occupant[2]
            if held != refs.get(s, 0):
                raise SimViolation(f"step {step}: slot {s} ({occupant}) counts {held} refs, requests hold "
                                   f"{refs.get(s, 0)}")
        unfinished = [rid for rid, t in self.tracked.items() if not t.finished and rid not in engine.requests]
        if unfinished:
            raise SimViolation(f"step {step}: {unfinished} left the engine without a final output")

    def _check_idle(self) -> None:
        engine = self.engine
        open_ = [rid for rid, t in self.tracked.items() if not t.finished]
        if open_:
            raise SimViolation(f"idle, yet {open_} never got a final output")
        if engine.pool.num_free != engine.pool.num_blocks:
            raise SimViolation(f"idle with {engine.pool.num_blocks - engine.pool.num_free} blocks held")
        held = [o for o in engine.adapters.occupancy() if o is not None and o[2]]
        if held:
            raise SimViolation(f"idle with adapter refs held: {held}")
        for t in self.tracked.values():
            reason = t.outputs[-1].finish_reason
            self.report.outcomes[reason] = self.report.outcomes.get(reason, 0) + 1

    def _check_finished(self, rid: str, t: Tracked) -> None:
        last = t.outputs[-1]
        tokens = [tok for o in t.outputs for tok in o.new_token_ids]
        if last.finish_reason == "error" and "breaks the grammar" in (last.error or "") and self.check_guided:
            raise SimViolation(f"step {self.world.step}: {rid}: {last.error}")
        if last.finish_reason in ("stop", "length") and len(tokens) > t.arrival.params.max_tokens:
            raise SimViolation(f"{rid} generated {len(tokens)} > max_tokens {t.arrival.params.max_tokens}")
        if last.finish_reason not in ("stop", "length"):
            return
        self._check_prompt_logprobs(rid, t)
        p = t.params
        if p.guided is not None:  # the grammar's state is not replayed by the reference
            return
        expected = self.world.model.reference_tokens(t.arrival.prompt, t.kvid, p, self.eos_ids, t.seed)
        if last.finish_reason == "length" and p.max_tokens and tokens != expected:
            raise SimViolation(f"{rid}: tokens {tokens} != its solo reference {expected}")
        if tokens != expected[: len(tokens)]:
            raise SimViolation(f"{rid}: tokens {tokens} are not a prefix of its solo reference {expected}")
        self.report.checked_greedy += 1

    def _check_prompt_logprobs(self, rid: str, t: Tracked) -> None:
        if t.arrival.params.prompt_logprobs is None:
            return
        got = next((o.prompt_logprobs for o in t.outputs if o.prompt_logprobs is not None), None)
        prompt = t.arrival.prompt
        if got is None or len(got) != len(prompt):
            raise SimViolation(f"{rid}: prompt logprobs {None if got is None else len(got)} for {len(prompt)} tokens")
        hashes = self.world.model.prompt_hashes(prompt, t.kvid)
        lp = self.world.model.logprobs
        for p in range(1, len(prompt)):
            want = float(lp[self.world.model.row(hashes[p - 1]), prompt[p]])
            if got[p] is None or got[p].token != prompt[p] or not math.isclose(got[p].logprob, want, abs_tol=1e-4):
                raise SimViolation(f"{rid}: prompt logprob at {p} is {got[p]}, expected {want}")
        self.report.checked_prompt_logprobs += 1


def _choice_id(rid: str, index: int) -> str:
    return rid if index == 0 else f"{rid}-{index}"


def run_scenario(scenario: Scenario, tokenizer: Any, model: FakeModel, guided: GuidedCompiler | None,
                 **kw: Any) -> Report:
    return Simulation(scenario, tokenizer, model, guided, **kw).run()


def shrink(scenario: Scenario, fails: Callable[[Scenario], bool], budget: int = 400) -> Scenario:
    """Drop events one at a time while the scenario still fails (delta debugging), at most `budget` tries."""
    current, tries = scenario, 0
    changed = True
    while changed and tries < budget:
        changed = False
        for i in reversed(range(len(current.events))):
            if tries >= budget:
                break
            candidate = current.without(i)
            tries += 1
            if fails(candidate):
                current, changed = candidate, True
    return current
