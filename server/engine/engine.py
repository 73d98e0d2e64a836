"""LLMEngine: the synchronous core. `step()` = schedule -> run -> sample -> postprocess.

It knows adapter names and slots, never HTTP. Thread-unsafe by design: the AsyncEngine drives it from one
thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraplex.adapters.host_loader import HostLoader
from loraplex.adapters.inject import LoRAInjection, inject_multi_lora
from loraplex.adapters.ops import get_backend
from loraplex.adapters.port import AdapterPort
from loraplex.adapters.slot_table import SlotTable
from loraplex.adapters.slot_writer import SlotWriter
from loraplex.adapters.weights import AdapterWeights
from loraplex.server.config import LoRAConfig
from loraplex.server.engine.attention import PagedKVCache, register_paged_attention
from loraplex.server.engine.block_pool import BlockPool
from loraplex.server.engine.cuda_graphs import DecodeGraphs
from loraplex.server.engine.detokenizer import IncrementalDetokenizer
from loraplex.server.engine.kv_sizing import auto_num_blocks, kv_bytes_per_token
from loraplex.server.engine.model_runner import ModelRunner
from loraplex.server.engine.paged_kernels import select_paged_kernel
from loraplex.server.engine.postprocess import Postprocessor
from loraplex.server.engine.request import Request, RequestOutput, Status, StepResult, StepStats
from loraplex.server.engine.sampler import Sampler, SampleRow, make_generator
from loraplex.server.engine.sampling_params import SamplingParams
from loraplex.server.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from loraplex.server.engine.stop import StopStringMatcher
from loraplex.server.model_loader import LoadedModel

log = logging.getLogger(__name__)


class RequestRejected(ValueError):
    """The request can never run (too long for the context or the KV pool); says why with numbers."""


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = 2048
    block_size: int = 16
    num_kv_blocks: int = 0  # 0 = size from free memory
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


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig,
                 adapter_loader: Callable[[str], AdapterWeights] | None = None) -> None:
        self.config, self.loaded = config, loaded
        self.tokenizer = loaded.tokenizer
        model = loaded.model
        self.lora: LoRAInjection = inject_multi_lora(
            model, num_slots=config.lora.max_loras, max_rank=config.lora.max_lora_rank, dtype=loaded.dtype)
        get_backend(loaded.device)  # choose and log the LoRA kernels now, not at the first adapter's step
        model.set_attn_implementation(register_paged_attention())
        self.pool, kv = self._make_kv(model, loaded)
        # Adapters: the engine thread owns the SlotTable and writes slots; the host loader only reads files;
        # other threads post messages to the port and read the snapshot published there.
        self.adapter_port = AdapterPort()
        self.slot_writer = SlotWriter(self.lora, loaded.device)
        self.host_loader = HostLoader(adapter_loader or _no_adapters, self.adapter_port.put, self.adapter_port.wake)
        self.adapters = SlotTable(num_slots=config.lora.max_loras, max_host=config.lora.max_cpu_loras,
                                  max_host_bytes=config.lora.max_cpu_lora_bytes, request_load=self.host_loader.submit,
                                  clear_slot=self.slot_writer.clear, is_registered=self.adapter_port.registered)
        self.scheduler = Scheduler(config.scheduler, self.pool, self.adapters)
        graphs = config.cuda_graphs and loaded.device.type == "cuda"
        self.runner = ModelRunner(model, kv, config.block_size, self.lora, loaded.device,
                                  decode_buckets=config.decode_buckets or graphs, max_model_len=config.max_model_len)
        if graphs:
            self.runner.use_graphs(DecodeGraphs.for_device(self.runner.forward_decode, self.lora, loaded.device),
                                   config.scheduler.max_num_seqs)
        self.sampler = Sampler()
        self.post = Postprocessor(_eos_ids(loaded), config.max_model_len)
        self.requests: dict[str, Request] = {}

    def _make_kv(self, model: torch.nn.Module, loaded: LoadedModel) -> tuple[BlockPool, PagedKVCache]:
        cfg = model.config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = cfg.num_key_value_heads
        n = self.config.num_kv_blocks or auto_num_blocks(
            bytes_per_token=kv_bytes_per_token(cfg.num_hidden_layers, kv_heads, head_dim, loaded.dtype),
            block_size=self.config.block_size, max_num_seqs=self.config.scheduler.max_num_seqs,
            max_model_len=self.config.max_model_len, device=loaded.device)
        kv = PagedKVCache(cfg.num_hidden_layers, n, self.config.block_size, kv_heads, head_dim,
                          loaded.dtype, loaded.device)
        self.attention_kernel, kv.kernel = select_paged_kernel(
            loaded.device, loaded.dtype, self.config.block_size, cfg.num_attention_heads, kv_heads, head_dim)
        log.info("KV pool: %d blocks x %d tokens (%.1f MiB)", n, self.config.block_size, kv.bytes / 2**20)
        return BlockPool(n, self.config.block_size), kv

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    adapter: str | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.check_fits(len(prompt_ids), params)
        req = Request(request_id, list(prompt_ids), params, adapter,
                      make_generator(params.seed, self.loaded.device) if not params.greedy else None,
                      IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens),
                      StopStringMatcher(params.stop))
        self.requests[request_id] = req
        self.scheduler.add(req)

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
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req)
        return self.post.final(req, "abort")

    def fail_adapter(self, adapter: str, reason: str) -> list[RequestOutput]:
        """End every request for `adapter` that has not started (it was unregistered). Requests that started
        hold the adapter's slot, preempted ones included, and finish with it (DESIGN: in-flight ones finish)."""
        doomed = [r for r in self.scheduler.waiting if r.adapter == adapter and not r.holds_adapter]
        return [self._fail(r, reason, "request") for r in doomed]

    def has_work(self) -> bool:
        return self.scheduler.has_work()  # requests waiting on adapter loads included

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
            except Exception:  # noqa: BLE001 - one bad message must not stop the engine serving everyone
                log.exception("adapter message %s failed", type(msg).__name__)
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
        outputs = [self._fail(req, reason, "request") for req, reason in sched.failed]
        if not sched.chunks:
            return StepResult(outputs)
        stats = StepStats(sched.num_tokens, len(sched.chunks),
                          len({c.request.slot for c in sched.chunks if c.request.slot >= 0}))
        try:
            self._run(sched, outputs)
        except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving the others
            log.exception("engine step failed; failing the %d requests scheduled in it", len(sched.chunks))
            reason = (f"internal engine error in the step that ran this request ({type(exc).__name__}: {exc}); "
                      "other requests are unaffected")
            outputs += [self._fail(c.request, reason, "internal") for c in sched.chunks
                        if c.request.status is not Status.FINISHED]
        return StepResult(outputs, stats)

    def _run(self, sched: SchedulerOutput, outputs: list[RequestOutput]) -> None:
        """Forward, sample, postprocess; appends to `outputs` as it goes (a later fault keeps them)."""
        logits = self.runner.execute(sched.chunks)
        sampling = [c.request for c in sched.chunks if c.samples]
        picks, bad = self._sample(logits, sampling)
        outputs += [self._fail(req, reason, "request") for req, reason in bad.items()]
        self._postprocess(sched, picks, outputs)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]
                ) -> tuple[dict[Request, tuple[int, float]], dict[Request, str]]:
        """logits [N, V] → ({request: (token, logprob)}, {request: why it failed}), one host sync.

        A row with non-finite logits (e.g. an adapter whose weights overflow) fails alone: the sampler sees a
        zeroed row in its place, so batch-mates sample exactly as they would without it.
        """
        lo, hi = torch.aminmax(logits, dim=-1)  # one pass; NaN and inf propagate into them
        finite = torch.isfinite(lo) & torch.isfinite(hi)  # [N]
        logits = torch.where(finite[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        tokens, errors = self._sample_rows(logits, reqs)
        # [N] log p(token) under the raw distribution (before temperature/top-k/top-p), as vLLM reports it;
        # logit - logsumexp, not a full [N, V] log_softmax.
        raw = logits.float()
        logprobs = raw.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(raw, dim=-1)
        host = torch.stack([tokens.double(), logprobs.double(), finite.double()], dim=1).tolist()  # [N, 3]
        picks: dict[Request, tuple[int, float]] = {}
        for req, (token, logprob, ok) in zip(reqs, host, strict=True):
            if req in errors:
                continue
            if not ok:
                errors[req] = _non_finite_message(req)
                continue
            picks[req] = (int(token), logprob)
        return picks, errors

    def _sample_rows(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[torch.Tensor, dict[Request, str]]:
        """All rows in one batched call; should that raise, row by row, so only the failing rows fail."""
        rows = [self._sample_row(r) for r in reqs]
        try:
            return self.sampler.sample(logits, rows), {}
        except Exception:  # noqa: BLE001 - isolate the culprit below
            log.exception("batched sampling failed; sampling row by row to isolate the failing requests")
        tokens = torch.zeros(len(reqs), dtype=torch.int64, device=logits.device)
        errors: dict[Request, str] = {}
        for i, (req, row) in enumerate(zip(reqs, rows, strict=True)):
            try:
                tokens[i] = self.sampler.sample(logits[i : i + 1], [row])[0]
            except Exception as exc:  # noqa: BLE001 - this request's parameters broke sampling: it alone fails
                errors[req] = f"sampling failed for this request's parameters ({type(exc).__name__}: {exc})"
        return tokens, errors

    def _sample_row(self, req: Request) -> SampleRow:
        return SampleRow(req.params, req.generator, len(req.output_ids), self.post.eos_ids)

    def _postprocess(self, sched: SchedulerOutput, tokens: dict[Request, tuple[int, float]],
                     outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for chunk in sched.chunks:
            req = chunk.request
            req.num_computed = chunk.start + chunk.n
            if req not in tokens or req.status is not Status.RUNNING:
                continue
            req.first_token_time = req.first_token_time or now
            out = self.post.append(req, *tokens[req])
            if out.finished:
                self.requests.pop(req.request_id, None)
                self.scheduler.finish(req)
            outputs.append(out)

    def _fail(self, req: Request, reason: str, kind: str) -> RequestOutput:
        self.requests.pop(req.request_id, None)
        self.scheduler.finish(req)
        return self.post.final(req, "error", error=reason, error_kind=kind)


def _non_finite_message(req: Request) -> str:
    source = f"adapter {req.adapter!r}" if req.adapter else "the base model"
    return (f"the forward pass produced non-finite logits (NaN or inf) for this request with {source}; "
            "its weights may overflow in this dtype. Other requests are unaffected")


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
