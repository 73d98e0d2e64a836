"""LLMEngine: the synchronous core. `step()` = schedule -> run -> sample -> postprocess.

It knows adapter names and slots, never HTTP. Thread-unsafe by design: the AsyncEngine drives it from one
thread.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from loraplex.adapters.host_loader import HostLoader
from loraplex.adapters.inject import LoRAInjection, inject_multi_lora
from loraplex.adapters.messages import Command, Message
from loraplex.adapters.ops import probe_lora_backend
from loraplex.adapters.port import AdapterPort
from loraplex.adapters.slot_table import SlotTable
from loraplex.adapters.slot_writer import SlotWriter
from loraplex.adapters.weights import AdapterWeights
from loraplex.server.config import LoRAConfig
from loraplex.server.engine.attention import PagedKVCache, register_paged_attention
from loraplex.server.engine.block_pool import BlockPool
from loraplex.server.engine.cuda_graphs import DecodeGraphs
from loraplex.server.engine.detokenizer import IncrementalDetokenizer
from loraplex.server.engine.guided import CompiledGrammar, GuidedCompiler, GuidedError, GuidedSpec, fill_bitmasks
from loraplex.server.engine.kv_sizing import (
    KVPlan,
    MemorySnapshot,
    kv_bytes_per_token,
    measure_cuda,
    plan_cpu,
    plan_cuda,
    plan_fixed,
    warn_if_short,
)
from loraplex.server.engine.memory_profile import profile_step
from loraplex.server.engine.model_runner import ModelRunner, RunnerOutput
from loraplex.server.engine.paged_kernels import PagedKernel, select_paged_kernel
from loraplex.server.engine.postprocess import Postprocessor
from loraplex.server.engine.request import Request, RequestOutput, Status, StepResult, StepStats, TokenLogprob
from loraplex.server.engine.sampler import (
    Bitmask,
    SampleOutput,
    Sampler,
    SampleRow,
    TokenCounts,
    bitmask_row,
    check_vocab,
    request_seed,
)
from loraplex.server.engine.sampling_params import SamplingParams
from loraplex.server.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput
from loraplex.server.engine.stop import StopStringMatcher
from loraplex.server.model_loader import LoadedModel

if TYPE_CHECKING:
    from loraplex.adapters.merge import MergeRecipe

log = logging.getLogger(__name__)


class RequestRejected(ValueError):
    """The request can never run (too long for the context or the KV pool); says why with numbers."""


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = 2048
    block_size: int = 16
    num_kv_blocks: int = 0  # 0 = sized by the rules of kv_sizing.py
    kv_cache_memory: int = 0  # --kv-cache-memory BYTES of KV (0 = unset)
    gpu_memory_utilization: float = 0.9  # fraction of a CUDA device's memory the engine may use (vLLM's flag)
    scheduler: SchedulerConfig = SchedulerConfig()
    lora: LoRAConfig = LoRAConfig()
    # Pad decode-only steps to a batch bucket with static shapes (what CUDA-graph capture replays).
    decode_buckets: bool = False
    # Replay decode steps from CUDA graphs, one per bucket (--cuda-graphs); CUDA devices only, where it
    # implies decode_buckets. Ignored on the CPU.
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise ValueError("--max-model-len: must be >= 2")
        if self.block_size < 1 or self.num_kv_blocks < 0:
            raise ValueError("--block-size must be >= 1 and --num-kv-blocks >= 0")
        if self.kv_cache_memory < 0:
            raise ValueError("--kv-cache-memory: must be >= 0 bytes (0: unset)")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization: must be in (0, 1], got {self.gpu_memory_utilization}")


class Runner(Protocol):
    """Runs one step's chunks (ModelRunner; the simulation's fake forward)."""

    def execute(self, chunks: list[ScheduledChunk]) -> RunnerOutput: ...


class SlotCopier(Protocol):
    """Copies adapter weights into device slots (SlotWriter)."""

    def write(self, slot: int, weights: AdapterWeights) -> None: ...

    def clear(self, slot: int) -> None: ...

    def fence(self) -> None: ...


class Loader(Protocol):
    """Reads adapter files off the engine thread and posts the results (HostLoader)."""

    def submit(self, name: str, epoch: int, urgent: bool) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineParts:
    """What the engine core drives, built from a loaded model (`LLMEngine.__init__`) or by the engine
    simulation (tests/sim), which fakes the forward, the slot copies and the loader."""

    tokenizer: Any
    vocab_size: int  # the logits' width
    eos_ids: tuple[int, ...]
    device: torch.device
    pool: BlockPool
    runner: Runner
    slot_writer: SlotCopier
    # (post, wake) -> the loader: it posts results into the adapter port and wakes the engine
    make_loader: Callable[[Callable[[Message], None], Callable[[], None]], Loader]
    guided: GuidedCompiler | None = None


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig,
                 adapter_loader: Callable[[str], AdapterWeights] | None = None) -> None:
        self.loaded = loaded
        model = loaded.model
        self.lora: LoRAInjection = inject_multi_lora(
            model, num_slots=config.lora.max_loras, max_rank=config.lora.max_lora_rank, dtype=loaded.dtype)
        model.set_attn_implementation(register_paged_attention())
        self.config = config
        kernel = self._warm_up_kernels(model, loaded)
        pool, kv = self._make_kv(model, loaded, kernel)
        graphs = self._graphs_on(loaded.device, kernel)
        self.runner = ModelRunner(model, kv, config.block_size, self.lora, loaded.device,
                                  decode_buckets=config.decode_buckets or graphs, max_model_len=config.max_model_len)
        if graphs:  # every bucket, now: nothing is captured while serving
            self.runner.use_graphs(DecodeGraphs.for_device(self.runner.forward_decode, self.lora, loaded.device,
                                                           self.runner.static_tensors), config.scheduler.max_num_seqs)
        vocab_size = model.get_output_embeddings().out_features
        eos_ids = _eos_ids(loaded)
        read = adapter_loader or _no_adapters
        self._assemble(config, EngineParts(
            loaded.tokenizer, vocab_size, eos_ids, loaded.device, pool, self.runner,
            SlotWriter(self.lora, loaded.device), lambda post, wake: HostLoader(read, post, wake),
            _guided_compiler(loaded.tokenizer, vocab_size, eos_ids)))

    @classmethod
    def from_parts(cls, config: EngineConfig, parts: EngineParts) -> LLMEngine:
        """An engine over given parts (the simulation's): no model, no LoRA injection, no KV tensors."""
        engine = cls.__new__(cls)
        engine._assemble(config, parts)
        return engine

    def _assemble(self, config: EngineConfig, parts: EngineParts) -> None:
        """The core every engine shares: requests, scheduler, adapter slots, sampler, postprocessing."""
        self.config = config
        self.tokenizer, self.vocab_size, self.device = parts.tokenizer, parts.vocab_size, parts.device
        self.pool, self.runner, self.slot_writer = parts.pool, parts.runner, parts.slot_writer
        # Adapters: the engine thread owns the SlotTable and writes slots; the host loader only reads files;
        # other threads post messages to the port and read the snapshot published there.
        self.adapter_port = AdapterPort()
        self.host_loader = parts.make_loader(self.adapter_port.put, self.adapter_port.wake)
        self.adapters = SlotTable(num_slots=config.lora.max_loras, max_host=config.lora.max_cpu_loras,
                                  max_host_bytes=config.lora.max_cpu_lora_bytes, request_load=self.host_loader.submit,
                                  clear_slot=self.slot_writer.clear, is_registered=self.adapter_port.registered)
        self.scheduler = Scheduler(config.scheduler, self.pool, self.adapters)
        log.info("prefix caching: %s", "on (full KV blocks reused by prompt prefix, keyed by adapter registration)"
                 if config.scheduler.prefix_caching else "off (--prefix-caching off)")
        # A registration dropped: the blocks computed with it are never found again (and are freed first).
        self.adapters.on_forget = lambda name, epoch: self.pool.forget((name, epoch))
        self.counts = TokenCounts(self.vocab_size, self.device)  # penalties' token counts, kept per request
        self.sampler = Sampler(self.counts)
        self.post = Postprocessor(parts.eos_ids, config.max_model_len)
        self.guided = parts.guided
        self.requests: dict[str, Request] = {}
        self._groups: dict[str, list[Request]] = {}  # n > 1: group id -> its choices that have not ended

    @property
    def prefix_cache_hits(self) -> int:
        """Tokens whose K/V admissions found in the prefix cache instead of computing them (so far)."""
        return self.scheduler.prefix_hits

    def _warm_up_kernels(self, model: torch.nn.Module, loaded: LoadedModel) -> PagedKernel | None:
        """Choose the LoRA and paged-attention kernels, each after a probe against its torch twin that also
        compiles every kernel variant the engine will launch (on CUDA), so nothing compiles while serving."""
        start = time.perf_counter()
        lora = probe_lora_backend(loaded.device, set(self.lora.module_shapes().values()), loaded.dtype,
                                  self.config.lora.max_lora_rank)
        cfg = model.config.get_text_config()
        self.attention_kernel, kernel = select_paged_kernel(
            loaded.device, loaded.dtype, self.config.block_size, cfg.num_attention_heads, *_kv_geometry(cfg)[1:])
        self.lora_probe, self.warm_up_s = lora, time.perf_counter() - start
        log.info("kernel warm-up: %.1f s (LoRA ops %s%s; paged attention %s)", self.warm_up_s, lora.backend,
                 f": {lora.summary()}" if lora.problems else "", self.attention_kernel)
        return kernel

    def _graphs_on(self, device: torch.device, kernel: PagedKernel | None) -> bool:
        """CUDA graphs need a CUDA device and a paged kernel (one shape per bucket, all captured at start)."""
        if not self.config.cuda_graphs or device.type != "cuda":
            return False
        if kernel is None:
            log.warning("CUDA graphs off: no paged attention kernel passed its probe, and the gather path's "
                        "context width changes from step to step (graphs are never captured while serving)")
        return kernel is not None

    def _make_kv(self, model: torch.nn.Module, loaded: LoadedModel, kernel: PagedKernel | None
                 ) -> tuple[BlockPool, PagedKVCache]:
        layers, kv_heads, head_dim = _kv_geometry(model.config.get_text_config())
        per_block = kv_bytes_per_token(layers, kv_heads, head_dim, loaded.dtype) * self.config.block_size
        plan = self._plan_kv(per_block, loaded.device, kernel, (layers, kv_heads, head_dim))
        kv = PagedKVCache(layers, plan.num_blocks, self.config.block_size, kv_heads, head_dim, loaded.dtype,
                          loaded.device)
        kv.kernel = kernel
        self.kv_plan = plan
        log.info("KV pool: %d blocks x %d tokens = %d tokens (%.1f MiB), by %s: %s", plan.num_blocks,
                 self.config.block_size, plan.num_blocks * self.config.block_size, kv.bytes / 2**20, plan.rule,
                 plan.reason)
        return BlockPool(plan.num_blocks, self.config.block_size), kv

    def _plan_kv(self, per_block: int, device: torch.device, kernel: PagedKernel | None,
                 geometry: tuple[int, int, int]) -> KVPlan:
        """The pool's size by the first rule that applies (kv_sizing.py)."""
        cfg = self.config
        plan = plan_fixed(num_blocks=cfg.num_kv_blocks, kv_cache_memory=cfg.kv_cache_memory, bytes_per_block=per_block)
        if plan is None and device.type != "cuda":
            plan = plan_cpu(bytes_per_block=per_block, block_size=cfg.block_size,
                            max_num_seqs=cfg.scheduler.max_num_seqs, max_model_len=cfg.max_model_len)
            warn_if_short(plan.num_blocks, per_block)
        return plan or self._profile_kv(per_block, device, kernel, geometry)

    def _profile_kv(self, per_block: int, device: torch.device, kernel: PagedKernel | None,
                    geometry: tuple[int, int, int]) -> KVPlan:
        """CUDA: vLLM's rule over a profile run (kv_sizing.py), the stand-in's memory released first."""
        snapshot, graph_bytes = self._profile_on_stand_in(device, kernel, geometry)
        torch.cuda.empty_cache()
        return plan_cuda(bytes_per_block=per_block, utilization=self.config.gpu_memory_utilization,
                         snapshot=snapshot, graph_bytes=graph_bytes)

    def _profile_on_stand_in(self, device: torch.device, kernel: PagedKernel | None,
                             geometry: tuple[int, int, int]) -> tuple[MemorySnapshot, int]:
        """The largest step, then the CUDA graphs (their memory), on a one-block stand-in pool (memory_profile.py)."""
        cfg, (layers, kv_heads, head_dim) = self.config, geometry
        stand_in = PagedKVCache(layers, 1, cfg.block_size, kv_heads, head_dim, self.loaded.dtype, device)
        stand_in.kernel = kernel
        runner = ModelRunner(self.loaded.model, stand_in, cfg.block_size, self.lora, device,
                             max_model_len=cfg.max_model_len)
        tokens = min(cfg.scheduler.max_batch_tokens, cfg.max_model_len - 1)
        snapshot = measure_cuda(device, functools.partial(profile_step, runner, tokens))
        if not self._graphs_on(device, kernel):
            return snapshot, 0
        graphs = DecodeGraphs.for_device(runner.forward_decode, self.lora, device, runner.static_tensors)
        runner.use_graphs(graphs, cfg.scheduler.max_num_seqs)
        return snapshot, graphs.memory_bytes

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    adapter: str | None = None, merge: MergeRecipe | None = None, prefix_of: str | None = None,
                    cache_salt: str | None = None) -> None:
        """Queue a request for `adapter` (None: the base model), or for several adapters merged (`merge`).

        `prefix_of`: another choice of the same HTTP request (same prompt and adapter, `n` > 1). The choices
        form a group: each waits while a running sibling computes the prompt, then finds its blocks in the
        prefix cache; should one of them fail, all of them end. `cache_salt`: only requests with the same salt
        share cached KV blocks (vLLM's field)."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if merge is not None and adapter is not None:
            raise ValueError("a request names one adapter or a merge recipe, not both")
        self.check_fits(len(prompt_ids), params)
        try:
            check_vocab(params, self.vocab_size)
            guided = self.compile_grammar(params.guided).new_state() if params.guided is not None else None
        except ValueError as exc:  # GuidedError included (the API compiled it first: normally a cache hit)
            raise RequestRejected(str(exc)) from None
        req = Request(request_id, list(prompt_ids), params, adapter,
                      request_seed(params.seed) if not params.greedy else None,
                      IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens),
                      StopStringMatcher(params.stop), merge=merge, guided=guided, cache_salt=cache_salt)
        leader = self.requests.get(prefix_of) if prefix_of is not None else None
        if leader is not None and _same_prefix(leader, req):
            req.group = leader.group or leader.request_id
            leader.group = req.group
            self._groups.setdefault(req.group, [leader]).append(req)
        self.requests[request_id] = req
        self.scheduler.add(req)

    def compile_grammar(self, spec: GuidedSpec) -> CompiledGrammar:
        """Compile (or find in the cache) a structured-output grammar; any thread (the API calls it first, off
        the engine thread). GuidedError names the request field when the schema or pattern is invalid."""
        if self.guided is None:
            raise GuidedError(spec.field, "structured output is unavailable for this model's tokenizer")
        return self.guided.compile(spec)

    def check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        limit = self.config.max_model_len
        if prompt_len < 1:
            raise RequestRejected("the prompt is empty")
        if prompt_len >= limit:
            raise RequestRejected(f"prompt has {prompt_len} tokens; --max-model-len is {limit} "
                                  "(room is needed for at least one new token)")
        if prompt_len + params.max_tokens > limit:
            raise RequestRejected(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) = "
                                  f"{prompt_len + params.max_tokens} exceeds --max-model-len {limit}")
        capacity = self.pool.num_blocks * self.pool.block_size
        if prompt_len + params.max_tokens > capacity:
            raise RequestRejected(f"prompt + max_tokens = {prompt_len + params.max_tokens} tokens exceeds "
                                  f"the KV cache capacity of {capacity} tokens")

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request at once (its client left); its choice siblings go on (the caller aborts those it
        no longer wants)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._retire(req)
        return self.post.final(req, "abort")

    def fail_adapter(self, adapter: str, reason: str) -> list[RequestOutput]:
        """End every request for `adapter` that has not started (it was unregistered). Requests that started
        hold the adapter's slot, preempted ones included, and finish with it (DESIGN: in-flight ones finish)."""
        doomed = [r for r in self.scheduler.waiting if not r.started and
                  (r.adapter == adapter or (r.merge is not None and adapter in r.merge.names))]
        outputs: list[RequestOutput] = []
        for req in doomed:
            if req.status is not Status.FINISHED:  # a sibling's failure may have ended it already
                outputs += self._fail(req, reason, "request")
        return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_work()  # requests waiting on adapter loads included

    def _retire(self, req: Request) -> None:
        """Take a request out of the engine for good (finished, aborted or failed): blocks and refs return."""
        self.requests.pop(req.request_id, None)
        self.scheduler.finish(req)
        if req.counts_row is not None:
            self.counts.close(req.counts_row)
            req.counts_row = None
        group = self._groups.get(req.group) if req.group is not None else None
        if group is not None:
            group.remove(req)
            if not group:
                del self._groups[req.group]

    # ---- adapters (engine thread) -----------------------------------------------------------------
    def apply_adapter_messages(self) -> bool:
        """Apply what the host loader and admin calls posted, copy weights that reached host memory into their
        reserved slots (the forward waits for the copies), and publish the adapter snapshot. Runs at every
        step start; the AsyncEngine also runs it when it drains its inbox, so admin calls take effect while
        steps are held. True if it applied or copied anything."""
        messages = self.adapter_port.drain()
        for msg in messages:
            try:
                self.adapters.apply(msg)
            except Exception as exc:  # noqa: BLE001 - one bad message must not stop the engine serving everyone
                log.exception("adapter message %s failed", type(msg).__name__)
                if isinstance(msg, Command):  # its caller answers with the failure, not with success
                    msg.fail(f"{type(exc).__name__}: {exc}")
        copied = self.adapters.load_due(self.slot_writer.write)
        self.slot_writer.fence()
        self.adapter_port.publish(self.adapters.snapshot(), messages)
        return bool(messages or copied)

    def publish_adapters(self) -> None:
        """Publish the adapter snapshot as of now (after a step: acquires, releases and evictions moved it)."""
        self.adapter_port.publish(self.adapters.snapshot())

    def adapter_work_pending(self) -> bool:
        """Messages to apply or slot copies due: the next step start has adapter work even if nothing runs."""
        return self.adapter_port.pending() or self.adapters.copies_pending()

    def close(self) -> None:
        """Stop the host loader's threads (queued reads are dropped)."""
        self.host_loader.close()

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> StepResult:
        """One engine step: its outputs and statistics. A fault while running it fails only the requests
        scheduled in it; every terminal output built before the fault is still returned."""
        self.apply_adapter_messages()
        sched = self.scheduler.schedule()
        outputs = self._fail_all(sched.failed)
        if not sched.chunks:
            return StepResult(outputs)
        slots = {s for c in sched.chunks for s in (c.request.merge_slots or (c.request.slot,)) if s >= 0}
        stats = StepStats(sched.num_tokens, len(sched.chunks), len(slots))
        try:
            self._run(sched, outputs)
        except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving the others
            log.exception("engine step failed; failing the %d requests scheduled in it", len(sched.chunks))
            reason = (f"internal engine error in the step that ran this request ({type(exc).__name__}: {exc}); "
                      "other requests are unaffected")
            for c in sched.chunks:
                if c.request.status is not Status.FINISHED:  # a sibling's failure may have ended it already
                    outputs += self._fail(c.request, reason, "internal")
        return StepResult(outputs, stats)

    def _run(self, sched: SchedulerOutput, outputs: list[RequestOutput]) -> None:
        """Forward, sample, postprocess; appends to `outputs` as it goes (a later fault keeps them)."""
        result = self.runner.execute(sched.chunks)
        for chunk in sched.chunks:  # the forward wrote their K/V: completed blocks join the prefix cache
            chunk.request.num_computed = chunk.start + chunk.n
            self.scheduler.publish_computed(chunk.request)
        for chunk, rows in result.prompt_logits:
            _record_prompt_logprobs(chunk.request, chunk.start, rows)
        ends = [c.request for c in sched.chunks if c.samples]
        sampling = [i for i, req in enumerate(ends) if req.params.max_tokens > 0]  # max_tokens 0: scoring only
        logits = result.logits if len(sampling) == len(ends) else result.logits[sampling]
        reqs = [ends[i] for i in sampling]
        picks, bad = self._sample(logits, reqs, self._guided_bitmask(reqs))
        outputs += self._fail_all(list(bad.items()))
        outputs += [self._finish_scored(ends[i]) for i in range(len(ends))
                    if ends[i].params.max_tokens == 0 and ends[i].status is not Status.FINISHED]
        self._postprocess(sched, picks, outputs)

    def _finish_scored(self, req: Request) -> RequestOutput:
        """A request that only scores its prompt (max_tokens 0): done once the prompt is computed."""
        self._retire(req)
        return self._with_prompt_logprobs(req, self.post.final(req, "length"))

    def _with_prompt_logprobs(self, req: Request, out: RequestOutput) -> RequestOutput:
        """Attach the prompt's logprobs to the request's first output (once)."""
        if req.params.prompt_logprobs is None or req.prompt_logprobs_sent:
            return out
        req.prompt_logprobs_sent = True
        return dataclasses.replace(out, prompt_logprobs=[None, *req.prompt_logprobs])

    def _guided_bitmask(self, reqs: list[Request]) -> Bitmask | None:
        """(rows, allowed-token words [M, ceil(V/32)] int32) for the rows under a grammar; None (no work) when
        no row has one. Filled on the CPU after the forward was launched (on CUDA it overlaps the forward)."""
        rows = [i for i, r in enumerate(reqs) if r.guided is not None]
        if not rows:
            return None
        return torch.tensor(rows, dtype=torch.int64), fill_bitmasks([reqs[i].guided for i in rows], self.vocab_size)

    def _sample(self, logits: torch.Tensor, reqs: list[Request], bitmask: Bitmask | None = None
                ) -> tuple[dict[Request, Pick], dict[Request, str]]:
        """logits [N, V] → ({request: its pick}, {request: why it failed}), one host sync.

        A row with non-finite logits (e.g. an adapter whose weights overflow) fails alone: the sampler sees a
        zeroed row in its place, so batch-mates sample exactly as they would without it. So does a row whose
        parameters cannot apply (a logit_bias id past the vocabulary) or whose grammar allows no token.
        """
        lo, hi = torch.aminmax(logits, dim=-1)  # one pass; NaN and inf propagate into them
        finite = torch.isfinite(lo) & torch.isfinite(hi)  # [N]
        logits = torch.where(finite[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        out, errors = self._sample_rows(logits, reqs, bitmask)
        self._record_counts(reqs, out.tokens)
        # One device -> host copy: [N, 4 + 2K] = token, logprob, finite, no allowed token, K top ids, K top logprobs.
        table = torch.stack([out.tokens.double(), out.logprobs.double(), finite.double(), out.no_token.double()], dim=1)
        k_max = 0 if out.top_ids is None else out.top_ids.shape[1]
        if k_max:
            table = torch.cat([table, out.top_ids.double(), out.top_logprobs.double()], dim=1)
        picks: dict[Request, Pick] = {}
        for req, row in zip(reqs, table.tolist(), strict=True):
            token, logprob, ok, no_token = row[:4]
            if req in errors:
                continue
            if not ok:
                errors[req] = _non_finite_message(req)
            elif no_token:
                why = (req.guided and req.guided.dead_end) or "min_tokens may forbid the only ones it allows"
                errors[req] = f"the structured-output grammar allows no token at this position ({why})"
            elif req.guided is not None and not req.guided.accept(int(token)):  # only a masking bug gets here
                errors[req] = f"sampled token {int(token)} breaks the grammar ({req.guided.error})"
            else:
                k = min(req.params.logprobs or 0, k_max)
                top = tuple(zip(map(int, row[4 : 4 + k]), row[4 + k_max : 4 + k_max + k], strict=True))
                picks[req] = Pick(int(token), logprob, top)
        return picks, errors

    def _sample_rows(self, logits: torch.Tensor, reqs: list[Request], bitmask: Bitmask | None
                     ) -> tuple[SampleOutput, dict[Request, str]]:
        """All rows in one batched call; should that raise, row by row, so only the failing rows fail."""
        rows = [self._sample_row(r) for r in reqs]
        try:
            out = self.sampler.sample(logits, rows, bitmask)
            return out, {reqs[i]: reason for i, reason in out.errors.items()}
        except Exception:  # noqa: BLE001 - isolate the culprit below
            log.exception("batched sampling failed; sampling row by row to isolate the failing requests")
        parts: list[SampleOutput] = []
        errors: dict[Request, str] = {}
        for i, (req, row) in enumerate(zip(reqs, rows, strict=True)):
            try:
                parts.append(self.sampler.sample(logits[i : i + 1], [row], bitmask_row(bitmask, i)))
                if parts[-1].errors:
                    errors[req] = parts[-1].errors[0]
            except Exception as exc:  # noqa: BLE001 - this request's parameters broke sampling: it alone fails
                errors[req] = f"sampling failed for this request's parameters ({type(exc).__name__}: {exc})"
                parts.append(_empty_output(logits.device))
        return _concat_outputs(parts), errors

    def _sample_row(self, req: Request) -> SampleRow:
        if req.params.has_penalties and req.counts_row is None:  # counted once, then one token per step
            req.counts_row = self.counts.open(req.prompt_ids, req.output_ids)
        return SampleRow(req.params, req.seed, self.post.eos_ids, req.prompt_ids, req.output_ids, req.counts_row)

    def _record_counts(self, reqs: list[Request], tokens: torch.Tensor) -> None:
        """The penalties' counts learn this step's tokens (one accumulate, on the device)."""
        rows = [i for i, r in enumerate(reqs) if r.counts_row is not None]
        if rows:
            at = torch.tensor(rows, device=tokens.device)
            self.counts.record(torch.tensor([reqs[i].counts_row for i in rows], device=self.counts.device),
                               tokens.index_select(0, at).to(self.counts.device))

    def _postprocess(self, sched: SchedulerOutput, tokens: dict[Request, Pick],
                     outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for chunk in sched.chunks:
            req = chunk.request
            if req not in tokens or req.status is not Status.RUNNING:
                continue
            req.first_token_time = req.first_token_time or now
            pick = tokens[req]
            out = self._with_prompt_logprobs(req, self.post.append(req, pick.token, pick.logprob, pick.top))
            if out.finished:
                self._retire(req)
            outputs.append(out)

    def _fail_all(self, failures: list[tuple[Request, str]]) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for req, reason in failures:
            if req.status is not Status.FINISHED:  # a sibling's failure may have ended it already
                outputs += self._fail(req, reason, "request")
        return outputs

    def _fail(self, req: Request, reason: str, kind: str) -> list[RequestOutput]:
        """End `req` with an error, and every choice of its group with it (one answer for the HTTP request)."""
        siblings = [r for r in self._groups.get(req.group, ()) if r is not req] if req.group is not None else []
        outputs = []
        for r in [req, *siblings]:
            self._retire(r)
            outputs.append(self.post.final(r, "error", error=reason if r is req else
                                           f"another choice of this request failed: {reason}", error_kind=kind))
        return outputs


@dataclass(frozen=True, slots=True)
class Pick:
    """A sampled token, its raw logprob, and the top alternatives the request asked for."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _empty_output(device: torch.device) -> SampleOutput:
    """One failed row's stand-in when sampling row by row."""
    return SampleOutput(torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(1, device=device), None, None,
                        torch.zeros(1, dtype=torch.bool, device=device))


def _concat_outputs(parts: list[SampleOutput]) -> SampleOutput:
    """Row-by-row outputs as one (top alternatives padded to the widest with -inf / token 0)."""
    k = max((p.top_ids.shape[1] for p in parts if p.top_ids is not None), default=0)
    ids = lps = None
    if k:
        device = parts[0].tokens.device
        ids = torch.zeros(len(parts), k, dtype=torch.int64, device=device)
        lps = torch.full((len(parts), k), float("-inf"), device=device)
        for i, p in enumerate(parts):
            if p.top_ids is not None:
                ids[i, : p.top_ids.shape[1]], lps[i, : p.top_ids.shape[1]] = p.top_ids[0], p.top_logprobs[0]
    return SampleOutput(torch.cat([p.tokens for p in parts]), torch.cat([p.logprobs for p in parts]), ids, lps,
                        torch.cat([p.no_token for p in parts]))


def _same_prefix(leader: Request, req: Request) -> bool:
    return leader.prompt_ids == req.prompt_ids and leader.adapter == req.adapter and leader.merge == req.merge


def _record_prompt_logprobs(req: Request, start: int, logits: torch.Tensor) -> None:
    """logits [m, V]: rows start .. start + m - 1 of the prompt, row i predicting prompt token start + i + 1.
    Positions recorded before (a preempted request computes its prompt again) are not recorded twice. One
    device -> host copy: [m, 2 + 2k] = chosen logprob, rank, k top ids, k top logprobs."""
    skip = len(req.prompt_logprobs) - start  # positions 1 .. len(req.prompt_logprobs) are recorded
    if skip >= logits.shape[0]:
        return
    rows = logits[max(skip, 0):]
    first = start + max(skip, 0) + 1  # the prompt position rows[0] predicts
    targets = req.prompt_ids[first : first + rows.shape[0]]
    logprobs = torch.log_softmax(rows, dim=-1)  # [m, V] fp32
    chosen = logprobs.gather(1, torch.tensor(targets, device=rows.device)[:, None])  # [m, 1]
    parts = [chosen.double(), ((logprobs > chosen).sum(dim=-1, keepdim=True) + 1).double()]
    k = req.params.prompt_logprobs or 0
    if k:
        top = logprobs.topk(k, dim=-1)
        parts += [top.indices.double(), top.values.double()]  # ids < 2**53: exact in float64
    for token, row in zip(targets, torch.cat(parts, dim=1).tolist(), strict=True):
        alternatives = tuple(zip(map(int, row[2 : 2 + k]), row[2 + k :], strict=True))
        req.prompt_logprobs.append(TokenLogprob(token, row[0], alternatives, int(row[1])))


def _guided_compiler(tokenizer: object, vocab_size: int, eos_ids: tuple[int, ...]) -> GuidedCompiler | None:
    """The structured-output compiler (building it reads the whole vocabulary once: ~1 s at 50k tokens)."""
    try:
        return GuidedCompiler(tokenizer, vocab_size, eos_token_ids=eos_ids)
    except ValueError as exc:  # e.g. a slow (non-"fast") tokenizer
        log.warning("structured output is unavailable: %s", exc)
        return None


def _non_finite_message(req: Request) -> str:
    source = f"adapter {req.adapter!r}" if req.adapter else (f"merge {req.merge.label}" if req.merge else
                                                              "the base model")
    return (f"the forward pass produced non-finite logits (NaN or inf) for this request with {source}; "
            "its weights may overflow in this dtype. Other requests are unaffected")


def _kv_geometry(cfg: object) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a transformers text config."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


def _eos_ids(loaded: LoadedModel) -> tuple[int, ...]:
    ids: set[int] = set()
    gen = getattr(loaded.model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return tuple(sorted(ids))


def _no_adapters(name: str) -> AdapterWeights:
    raise LookupError(f"no adapter source configured (asked for {name!r})")
