"""gpu_check stages `adapters`, `engine_bf16`, `engine_nf4`: the serving engine on a Llama-7B-shaped model.

Model (`bench-7b`, BENCHMARK.md): LlamaConfig hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000,
seeded random weights, built in memory on the device in bf16 (nf4: saved once to a scratch dir and loaded with
`load_model(quantize="nf4")`, the server's own path). Adapters: 32 distinct seeded rank-16 PEFT adapters on all
7 projections (preset P), written once to the bench cache by the `adapters` stage (CPU work, run beside the
first stages). Workload: batch 32 closed loop, 128-token prompts, 128 new tokens, greedy, EOS ignored;
32 device slots, every adapter resident (loaded by a warm-up pass) before any timing.

Cases, interleaved over rounds (median of per-round ratios, BENCHMARK.md): base-only and 32 distinct adapters,
each with CUDA graphs on and off (bf16; nf4: graphs as the server defaults, on). Per case: output tok/s,
TTFT p50 (all requests arrive together), TPOT p50, and the median full-batch decode step. Limits printed beside
the targets: the LoRA tax's bandwidth bound, adapters' A/B bytes / (base + adapters' bytes), and the decode
step's weight-bandwidth time, base weight bytes / the measured copy bandwidth.
"""

from __future__ import annotations

import gc
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_engine import base_bytes
from common import Measure, Stopwatch, bench_adapters, bench_config_dir, interleaved, median, paired_ratio
from gpu_kernels import copy_bandwidth
from tiny_models import train_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from loraplex.adapters.ops import get_backend
from loraplex.adapters.weights import load_adapter_dir
from loraplex.server.config import LoRAConfig, ModelConfig
from loraplex.server.engine.engine import EngineConfig, LLMEngine
from loraplex.server.engine.sampling_params import SamplingParams
from loraplex.server.engine.scheduler import SchedulerConfig
from loraplex.server.model_loader import LoadedModel, load_model, targetable_modules

BLOCK_SIZE = 16
RANK = 16  # preset P
TAX_TARGET = 0.10
DECODE_TARGET = 1.5


@dataclass(frozen=True)
class EngineShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    adapters: int
    batch: int
    prompt: int
    new_tokens: int
    rounds: int
    warmup_tokens: int = 4


FULL = EngineShape(4096, 11008, 32, 32, 32000, adapters=32, batch=32, prompt=128, new_tokens=128, rounds=3)
DRY = EngineShape(64, 128, 2, 4, 512, adapters=4, batch=4, prompt=16, new_tokens=8, rounds=1, warmup_tokens=2)


def llama_config(s: EngineShape) -> LlamaConfig:
    return LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                       num_attention_heads=s.heads, num_key_value_heads=s.heads, vocab_size=s.vocab,
                       max_position_embeddings=4096, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def shape_dir(s: EngineShape) -> Path:
    """Config + tokenizer (no weights) in the bench cache: what the adapters are shaped from."""
    return bench_config_dir(f"llama-h{s.hidden}-l{s.layers}-v{s.vocab}", llama_config(s))


def adapter_dirs(s: EngineShape) -> dict[str, Path]:
    return {f"p-{i:02d}": d for i, d in enumerate(bench_adapters(shape_dir(s), "P", s.adapters))}


def prepare(dry: bool) -> dict[str, object]:
    """The `adapters` stage: write the seeded PEFT adapters once (the engine stages find them cached)."""
    dirs = adapter_dirs(DRY if dry else FULL)
    return {"rows": [{"metric": f"{len(dirs)} seeded PEFT adapters (r{RANK}, all 7 projections) on disk",
                      "value": f"{_bytes_on_disk(dirs) / 2**20:.0f} MiB"}],
            "adapters": {k: str(v) for k, v in dirs.items()}}


def _bytes_on_disk(dirs: dict[str, Path]) -> int:
    return sum(f.stat().st_size for d in dirs.values() for f in d.iterdir())


# ---- the base model ------------------------------------------------------------------------------------
def random_model(s: EngineShape, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """Seeded random weights, allocated and initialised on `device` (no host copy of 13 GB)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(s), dtype=dtype)
    return model.eval().requires_grad_(False)


def dtype_name(device: torch.device) -> str:
    """The compute dtype: bf16 on CUDA, fp32 on the CPU (dry run)."""
    return "bfloat16" if device.type == "cuda" else "float32"


def load_base(s: EngineShape, device: torch.device, quantize: str) -> LoadedModel:
    """bf16 (fp32 on the CPU) in memory; a quantized base through a scratch dir and `load_model`."""
    dtype = getattr(torch, dtype_name(device))
    if quantize == "none":
        return LoadedModel(random_model(s, device, dtype), train_tokenizer(), device, dtype, shape_dir(s), "none")
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-model-", dir=_scratch_root(s)))
    try:
        model = random_model(s, device, dtype)
        model.save_pretrained(scratch)
        train_tokenizer(scratch)
        del model
        _free(device)
        return load_model(ModelConfig(path=scratch, quantize=quantize, dtype=dtype_name(device), device=device.type))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _scratch_root(s: EngineShape) -> str | None:
    """/dev/shm (RAM) when it has room for the bf16 weights twice over, else the default temp dir."""
    need = 2 * 2 * 12 * s.layers * s.hidden**2
    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > need else None
    except OSError:
        return None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the engine ----------------------------------------------------------------------------------------
def make_engine(loaded: LoadedModel, s: EngineShape, adapters: dict[str, Path], graphs: bool) -> LLMEngine:
    """32 slots, room for every request's whole context; graphs off = the eager engine (no padded buckets)."""
    per_seq = -(-(s.prompt + s.new_tokens) // BLOCK_SIZE)
    cfg = EngineConfig(
        max_model_len=s.prompt + s.new_tokens, block_size=BLOCK_SIZE, num_kv_blocks=s.batch * (per_seq + 1),
        scheduler=SchedulerConfig(max_num_seqs=s.batch, max_batch_tokens=s.batch * s.prompt),
        lora=LoRAConfig(max_loras=s.adapters, max_lora_rank=RANK, max_cpu_loras=s.adapters,
                        max_cpu_lora_bytes=2 * _bytes_on_disk(adapters)),  # the host tier holds them all
        decode_buckets=graphs, cuda_graphs=graphs)  # buckets: on the CPU "on" still runs the padded steps
    engine = LLMEngine(loaded, cfg, lambda name: load_adapter_dir(adapters[name], engine.lora.module_shapes(),
                                                                  max_rank=RANK))
    return engine


@dataclass
class Trace:
    """One closed-loop run: per request TTFT and TPOT (s), and the wall time of every full-batch decode step."""

    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    decode_steps: list[float] = field(default_factory=list)


def drive(engine: LLMEngine, prompts: list[list[int]], names: list[str | None], new_tokens: int,
          tag: str) -> tuple[Measure, Trace]:
    """All requests arrive at once; step until every one finished (timed from the first add_request)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    firsts: dict[str, float] = {}
    lasts: dict[str, float] = {}
    trace, count = Trace(), 0
    with Stopwatch(engine.loaded.device) as sw:
        start = time.perf_counter()
        for i, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
            engine.add_request(f"{tag}-{i}", prompt, params, name)
        while engine.has_work():
            count += _step(engine, firsts, lasts, trace, len(prompts))
    trace.ttft = [firsts[r] - start for r in firsts]
    trace.tpot = [(lasts[r] - firsts[r]) / (new_tokens - 1) for r in firsts if new_tokens > 1]
    return sw.measure(count), trace


def _step(engine: LLMEngine, firsts: dict[str, float], lasts: dict[str, float], trace: Trace, batch: int) -> int:
    """One engine step; records token times and, for a full-batch decode step, its duration. Returns tokens."""
    before = time.perf_counter()
    step = engine.step()
    now = time.perf_counter()
    if step.stats.num_tokens == step.stats.num_seqs == batch:
        trace.decode_steps.append(now - before)
    if not step.computed:
        time.sleep(0.001)  # everyone waits on an adapter load (warm-up only)
    tokens = 0
    for out in step.outputs:
        if out.error:
            raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        if out.new_token_ids:
            firsts.setdefault(out.request_id, now)
            lasts[out.request_id] = now
            tokens += len(out.new_token_ids)
    return tokens


# ---- one stage -----------------------------------------------------------------------------------------
@dataclass
class Bench:
    """Everything the cases run on, and the bytes the limits are computed from."""

    name: str  # the base's dtype or quantization: bf16 | fp32 | nf4
    engines: dict[str, LLMEngine]  # label -> engine
    mixes: dict[str, list[str | None]]  # "base" | "lora" -> per-request adapter
    prompts: list[list[int]]
    base_bytes: int
    adapter_bytes: int  # one adapter's A/B in the compute dtype
    traces: dict[str, list[Trace]] = field(default_factory=dict)


def setup(s: EngineShape, device: torch.device, quantize: str) -> Bench:
    adapters = adapter_dirs(s)
    labels = {"graphs on": True} if quantize != "none" else {"graphs on": True, "graphs off": False}
    engines, weights, per_adapter = {}, 0, 0
    for label, graphs in labels.items():
        loaded = load_base(s, device, quantize)
        weights = base_bytes(loaded.model)  # before injection adds the slot stacks
        per_adapter = RANK * sum(i + o for i, o in targetable_modules(loaded.model).values()) * loaded.dtype.itemsize
        engines[label] = make_engine(loaded, s, adapters, graphs)
    rng = random.Random(0)
    names = [list(adapters)[i % len(adapters)] for i in range(s.batch)]
    rng.shuffle(names)  # slot order never lines up with request order
    prompts = [[rng.randrange(3, len(engines["graphs on"].tokenizer)) for _ in range(s.prompt)] for _ in names]
    name = quantize if quantize != "none" else {"bfloat16": "bf16", "float32": "fp32"}[dtype_name(device)]
    return Bench(name, engines, {"base": [None] * s.batch, "lora": names}, prompts, weights, per_adapter)


def warm_up(b: Bench, s: EngineShape) -> None:
    """Load every adapter into its slot, compile kernels; with graphs, run whole lengths once so that every
    graph a measured run needs is captured first."""
    for label, engine in b.engines.items():
        for mix, names in b.mixes.items():
            n = s.new_tokens if label == "graphs on" else s.warmup_tokens
            drive(engine, b.prompts, names, n, f"warm-{label}-{mix}")
            print(f"warm-up done: {label} {mix}", flush=True)


def make_cases(b: Bench, s: EngineShape) -> dict[str, Callable[[], Measure]]:
    runs = {"n": 0}

    def case(label: str, mix: str) -> Callable[[], Measure]:
        def run() -> Measure:
            runs["n"] += 1
            measure, trace = drive(b.engines[label], b.prompts, b.mixes[mix], s.new_tokens, f"r{runs['n']}")
            b.traces.setdefault(f"{label}/{mix}", []).append(trace)
            return measure
        return run

    return {f"{label}/{mix}": case(label, mix) for label in b.engines for mix in b.mixes}


def run(quantize: str, dry: bool, device: torch.device, budget_s: float) -> dict[str, object]:
    deadline = time.monotonic() + 0.8 * budget_s
    s = DRY if dry else FULL
    bandwidth = copy_bandwidth(device, 16 if dry else 2048)
    b = setup(s, device, quantize)
    warm_up(b, s)
    samples = interleaved(make_cases(b, s), s.rounds, log=lambda line: print(line, flush=True), deadline=deadline)
    result = summarize(b, samples, bandwidth, s)
    for engine in b.engines.values():
        engine.close()
    return result


# ---- summary -------------------------------------------------------------------------------------------
def summarize(b: Bench, samples: dict[str, list[Measure]], bandwidth: float, s: EngineShape) -> dict[str, object]:
    rates = {case: [m.rate for m in ms] for case, ms in samples.items()}
    configs = {label: _config_summary(b, rates, label, bandwidth) for label in b.engines}
    rows = [row for label, c in configs.items() for row in _config_rows(f"{b.name} {label}", c, s, b.name)]
    if "graphs off" in configs:
        on, off = configs["graphs on"], configs["graphs off"]
        rows.append({"metric": f"{b.name} tok/s, CUDA graphs on / off",
                     "value": f"base {on['base_tok_s'] / off['base_tok_s']:.2f}x, "
                              f"LoRA {on['lora_tok_s'] / off['lora_tok_s']:.2f}x"})
    return {"rows": rows, "configs": configs, "tok_s": rates, "rounds": min(map(len, rates.values())),
            "base_bytes": b.base_bytes, "adapter_bytes": b.adapter_bytes, "copy_bandwidth_Bps": bandwidth,
            "shape": s.__dict__, "model": b.name}


def _config_summary(b: Bench, rates: dict[str, list[float]], label: str, bandwidth: float) -> dict[str, object]:
    traces = {mix: b.traces[f"{label}/{mix}"] for mix in b.mixes}
    adapters = b.adapter_bytes * len({n for n in b.mixes["lora"] if n})
    limit_s = b.base_bytes / bandwidth
    steps = [t for tr in traces["base"] for t in tr.decode_steps]
    step_s = median(steps) if steps else float("nan")
    return {
        "base_tok_s": median(rates[f"{label}/base"]), "lora_tok_s": median(rates[f"{label}/lora"]),
        "lora_tax": 1 - paired_ratio(rates[f"{label}/lora"], rates[f"{label}/base"]),
        "lora_tax_bound": adapters / (b.base_bytes + adapters),
        "ttft_p50_ms": {mix: 1e3 * median([x for tr in ts for x in tr.ttft]) for mix, ts in traces.items()},
        "tpot_p50_ms": {mix: 1e3 * median([x for tr in ts for x in tr.tpot]) for mix, ts in traces.items()},
        "decode_step_ms": 1e3 * step_s, "weight_bandwidth_ms": 1e3 * limit_s, "decode_over_limit": step_s / limit_s,
        "graph_memory_mib": _graph_memory(b.engines[label]) / 2**20,
        "attention_kernel": b.engines[label].attention_kernel,
        "lora_backend": get_backend(b.engines[label].loaded.device).name,
    }


def _graph_memory(engine: LLMEngine) -> float:
    """Device memory the CUDA graphs captured at start hold (0 without graphs)."""
    return float(getattr(engine.runner.graphs, "memory_bytes", 0))


def _config_rows(name: str, c: dict, s: EngineShape, model: str) -> list[dict[str, object]]:
    mix = f"{s.adapters} distinct r{RANK} all-7"
    decode = {"metric": f"{name}: base-only decode step / weight-bandwidth time (limit: that time)",
              "value": f"{c['decode_over_limit']:.2f}", "limit": f"{c['weight_bandwidth_ms']:.2f} ms"}
    if model != "nf4":  # nf4 dequantizes every weight per step: the weight-bandwidth target is a bf16 one
        decode |= {"target": f"<= {DECODE_TARGET}", "pass": c["decode_over_limit"] <= DECODE_TARGET}
    rows = [
        {"metric": f"{name}: kernels chosen", "value": f"attention {c['attention_kernel']}, LoRA {c['lora_backend']}"},
        {"metric": f"{name}: output tok/s, B={s.batch}", "value": _pair(c, "tok_s", "")},
        {"metric": f"{name}: LoRA tax, B={s.batch}, {mix} (limit: bandwidth bound)",
         "value": f"{100 * c['lora_tax']:.1f} %", "target": f"<= {100 * TAX_TARGET:.0f} %",
         "limit": f"{100 * c['lora_tax_bound']:.1f} %", "pass": c["lora_tax"] <= TAX_TARGET},
        {"metric": f"{name}: TTFT p50", "value": _pair(c["ttft_p50_ms"], "", " ms")},
        {"metric": f"{name}: TPOT p50", "value": _pair(c["tpot_p50_ms"], "", " ms")},
        decode,
    ]
    if c["graph_memory_mib"]:
        rows.append({"metric": f"{name}: memory held by the CUDA graphs", "value": f"{c['graph_memory_mib']:.0f} MiB"})
    return rows


def _pair(values: dict[str, float], key: str, unit: str) -> str:
    """The text `base X, LoRA Y<unit>`, X and Y being values["base_<key>"] and values["lora_<key>"] (or
    values["base"] and values["lora"] when key is empty)."""
    key = key and f"_{key}"
    return f"base {values['base' + key]:.1f}, LoRA {values['lora' + key]:.1f}{unit}"
