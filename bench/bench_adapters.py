"""Adapter-cache benchmark on bench-small, fp32, CPU (BENCHMARK.md, issue "Adapter store and hot swap").

1. cold   Cold load of one P adapter (rank 16, all 7 projections) per tier, p50/p99 over `--repeats-load`
          (the adapter is evicted between repeats): disk->host (`load_adapter_dir`: read + validate + fp32),
          host->device (`LoRAInjection.load_slot`), disk->device through the engine's own path (a host-loader
          read, then the slot copy at the engine's step start);
          against PEFT `load_adapter` on the same base. Target: disk->device p50 <= 20 ms. A stage profile
          (config, header, safetensors read, fp32 copy, finiteness check, slot write) says where time goes,
          next to two measured alternatives (one read + one finiteness pass; a copy-only slot write).
          "Disk" means a file in the page cache (warm) and "device" is CPU memory on this machine.
2. scale  Closed-loop throughput with n = 1000 registered S1 adapters (32 device slots, popularity
          floor(power(alpha) * n), alpha = 0.3) divided by the same request stream over n = 5.
          Target >= 0.95. Two host tiers for n = 1000: all 1000 in host memory (seeded as registration
          seeds it) and 128 (most misses read the disk). Tiers are counted per request at arrival.
3. ttft   TTFT p99 of requests for pinned (resident) adapters while the other requests need cold P loads,
          divided by the same with the other requests on resident adapters (same arrivals, same compute).
          AsyncEngine: reads run on the host loader's threads, the engine step never waits for them; the engine
          copies landed weights into slots at its step start. Target <= 1.2.
4. swap   Over HTTP (a real server, bench/adapter_swap.py): a training loop pushes a new version of a P adapter
          once per second (PUT /v1/adapters/{name}/weights, 19.5 MB) and asks for it: the time from the PUT to
          the new version's first token; and the hot adapters' TTFT p99 meanwhile, divided by the same with the
          same requests but no replace. Target <= 1.2.

Every case pair runs side by side per round (median of the per-round ratios). The 1000 S1 adapters and the
cold-pool P adapters are written directly as PEFT-format safetensors (same keys, shapes, init, config as
`save_pretrained` writes; they load through our validator) and cached under ~/.cache/loraplex/bench.

Run: .venv/bin/python bench/bench_adapters.py [--quick] [--parts cold scale ttft swap]
Writes bench/results/adapters.json and bench/results/adapters.png (adapters_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread unless OMP_NUM_THREADS says otherwise, set before torch loads (it reads it at start,
# for every thread, the cache's load threads included). The development machine is shared (load average
# 5-7 on 2 cores while other jobs ran): with 2 threads, OpenMP's barrier waits on a descheduled partner made
# one B=32 decode step of bench-small take 7 s instead of 0.4 s, which would swamp every ratio here.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import adapter_swap as swap  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR,
    _build_once,
    bench_adapters,
    bench_small_dir,
    cache_root,
    command_line,
    git_commit,
    machine_facts,
    median,
    paired_ratio,
    print_facts,
    pyplot,
    write_json,
)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from loraplex.adapters.peft_config import parse_adapter_config  # noqa: E402
from loraplex.adapters.slot_table import SlotState  # noqa: E402
from loraplex.adapters.weights import WEIGHTS_NAME, load_adapter_dir, read_safetensors_header  # noqa: E402
from loraplex.server.config import LoRAConfig, ModelConfig  # noqa: E402
from loraplex.server.engine.async_engine import AsyncEngine  # noqa: E402
from loraplex.server.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from loraplex.server.engine.sampling_params import SamplingParams  # noqa: E402
from loraplex.server.engine.scheduler import SchedulerConfig  # noqa: E402
from loraplex.server.model_loader import load_model  # noqa: E402

MAX_RANK = 16
BLOCK_SIZE = 16
ALPHA = 0.3
FIRST_TOKEN_ID = 3  # ids 0..2 are the special tokens of the bench tokenizer
TARGETS = {"cold_p50_ms": 20.0, "scale_ratio": 0.95, "ttft_ratio": 1.2, "swap_ratio": 1.2}
_ids = itertools.count()


# ---- assets ---------------------------------------------------------------------------------------------
def synth_adapters(base_dir: Path, preset: str, count: int, seed0: int = 50_000) -> list[Path]:
    """`count` seeded adapters in PEFT's on-disk format, written directly (ms each instead of ~0.5 s).

    A template adapter saved by PEFT gives the config and the tensor keys/shapes; each copy draws its own
    tensors with nn.Linear's default init as `init_lora_weights=False` leaves it: U(+-1/sqrt(fan_in)),
    fan_in = shape[1] for A [r, in] and B [out, r] alike.
    """
    template = bench_adapters(base_dir, preset, 1)[0]
    root = cache_root() / "adapters" / base_dir.name / f"{preset}-synth-{count}-s{seed0}"

    def build(tmp: Path) -> None:
        with safe_open(template / WEIGHTS_NAME, "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        for i in range(count):
            out = tmp / f"{i:04d}"
            out.mkdir()
            shutil.copy(template / "adapter_config.json", out / "adapter_config.json")
            gen = torch.Generator().manual_seed(seed0 + i)
            tensors = {k: (torch.rand(s, generator=gen) * 2 - 1) / math.sqrt(s[1]) for k, s in shapes.items()}
            save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})

    _build_once(root, build)
    return [root / f"{i:04d}" for i in range(count)]


def build_engine(model_dir: Path, dirs: dict[str, Path], *, slots: int, host: int, seqs: int,
                 batch_tokens: int, max_len: int) -> LLMEngine:
    """An LLMEngine whose adapter loader reads `dirs[name]` through our validator."""
    loaded = load_model(ModelConfig(path=model_dir, dtype="float32", device="cpu"))
    cfg = EngineConfig(
        max_model_len=max_len, block_size=BLOCK_SIZE,
        num_kv_blocks=seqs * -(-max_len // BLOCK_SIZE) + seqs,  # every sequence's whole context, plus slack
        scheduler=SchedulerConfig(max_num_seqs=seqs, max_batch_tokens=batch_tokens),
        lora=LoRAConfig(max_loras=slots, max_lora_rank=MAX_RANK, max_cpu_loras=host),
    )
    holder: list[LLMEngine] = []
    engine = LLMEngine(loaded, cfg, lambda name: load_adapter_dir(
        dirs[name], holder[0].lora.module_shapes(), max_rank=MAX_RANK))
    holder.append(engine)
    return engine


def random_prompt(rng: random.Random, lo: int, hi: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(rng.randint(lo, hi))]


def popular(u: float, n: int, alpha: float = ALPHA) -> int:
    """floor(power(alpha) * n) from a uniform u: numpy's power(a) has CDF x**a, so x = u**(1/a)."""
    return min(n - 1, int(u ** (1.0 / alpha) * n))


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation (q in [0, 100])."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms_summary(seconds: list[float]) -> dict[str, float]:
    ms = [1e3 * s for s in seconds]
    return {"p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "mean_ms": statistics.fmean(ms), "n": len(ms)}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ---- 1. cold load per tier ------------------------------------------------------------------------------
def cache_cold_load(engine: LLMEngine, name: str) -> tuple[float, float]:
    """Evict `name`, acquire it, apply the host loader's result and copy it into the slot as a step start does;
    -> (load seconds as the slot table records them, acquire->ready wall)."""
    table, port = engine.adapters, engine.adapter_port
    table.forget(name)  # drops the host copy and frees the (unused) slot: the next acquire reads the disk
    t0 = time.perf_counter()
    if table.acquire(name).state is not SlotState.LOADING:
        raise RuntimeError(f"{name} was expected to start a cold load")
    while True:
        if not engine.adapter_work_pending() and not port.wait_for_message(30):
            raise RuntimeError(f"cold load of {name} did not finish in 30 s")
        engine.apply_adapter_messages()  # what the engine's step start does first
        got = table.acquire(name)
        if got.state is SlotState.READY:
            break
        if got.state is SlotState.ERRORED:
            raise RuntimeError(f"cold load of {name} failed: {got.reason}")
    wall = time.perf_counter() - t0
    table.release(name)
    return table.load_info(name)["last_load_seconds"], wall


def peft_load_times(model_dir: Path, adapter_dir: Path, repeats: int) -> list[float]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(ModelConfig(path=model_dir, dtype="float32", device="cpu")).model,
                                      str(adapter_dir), adapter_name="first")
    out = []
    for i in range(repeats):
        seconds, _ = timed(lambda i=i: model.load_adapter(str(adapter_dir), adapter_name=f"r{i}"))
        model.delete_adapter(f"r{i}")
        out.append(seconds)
    return out


def stage_profile(engine: LLMEngine, adapter_dir: Path, repeats: int) -> dict[str, float]:
    """Median ms of each stage `load_adapter_dir` + `load_slot` go through, and two measured alternatives."""
    file, shapes = adapter_dir / WEIGHTS_NAME, engine.lora.module_shapes()
    weights = load_adapter_dir(adapter_dir, shapes, max_rank=MAX_RANK)
    tensors = load_file(file)
    layers, slot = engine.lora.layers, engine.lora.num_slots - 1
    prescaled = [(layer, m.a, m.b * m.scale) for n, layer in layers.items() if (m := weights.modules.get(n))]
    stages: dict[str, Callable[[], object]] = {
        "config_parse": lambda: parse_adapter_config(adapter_dir),
        "header_parse_check": lambda: read_safetensors_header(file, 2**31),
        "safetensors_load_file": lambda: load_file(file),
        "fp32_copy": lambda: [t.to(torch.float32, copy=True).contiguous() for t in tensors.values()],
        "isfinite_per_tensor": lambda: [bool(torch.isfinite(t).all()) for t in tensors.values()],
        "aminmax_per_tensor": lambda: [torch.aminmax(t) for t in tensors.values()],
        "slot_write": lambda: engine.lora.load_slot(slot, weights),
        "alt_one_read_one_isfinite": lambda: _one_pass_read(file),
        "alt_slot_write_copy_only": lambda: [_copy_slot(layer, slot, a, b) for layer, a, b in prescaled],
    }
    samples: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(repeats):
        for name, fn in stages.items():
            samples[name].append(timed(fn)[0])
    return {k: 1e3 * median(v) for k, v in samples.items()}


def _one_pass_read(file: Path) -> dict[str, torch.Tensor]:
    """Alternative disk->host for an all-F32 file: one readinto, views at the validated offsets, and a
    single finiteness pass over the whole data section (instead of load_file + copy + 2 ops per tensor).
    aminmax is one pass and propagates NaN (min/max of a NaN are NaN; an inf shows up as min or max);
    isfinite().all() makes three passes and two bool tensors."""
    header = read_safetensors_header(file, 2**31)
    buf = torch.empty(file.stat().st_size, dtype=torch.uint8)
    with file.open("rb") as f:
        f.readinto(buf.numpy())
    data = buf[8 + int.from_bytes(bytes(buf[:8].tolist()), "little"):]
    lo, hi = torch.aminmax(data.view(torch.float32))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("non-finite values")
    return {k: data[h.start:h.end].view(torch.float32).view(h.shape) for k, h in header.items()}


def _copy_slot(layer: torch.nn.Module, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
    r = a.shape[0]
    layer.lora_a[slot, :r].copy_(a)
    layer.lora_b[slot, :r].copy_(b.t())  # lora_b holds B transposed: [slots + 1, r_max, out]


def part_cold(model_dir: Path, repeats: int) -> dict[str, object]:
    p_dir = bench_adapters(model_dir, "P", 1)[0]
    engine = build_engine(model_dir, {"p": p_dir}, slots=2, host=2, seqs=1, batch_tokens=64, max_len=64)
    shapes, spare = engine.lora.module_shapes(), engine.lora.num_slots - 1
    samples: dict[str, list[float]] = {"disk_host": [], "host_device": [], "disk_device": [], "acquire_ready": []}
    for i in range(repeats + 1):  # round 0 warms allocators and the page cache; dropped
        t_dh, weights = timed(lambda: load_adapter_dir(p_dir, shapes, max_rank=MAX_RANK))
        t_hd, _ = timed(lambda w=weights: engine.lora.load_slot(spare, w))
        t_job, t_wall = cache_cold_load(engine, "p")
        if i:
            for key, val in zip(samples, (t_dh, t_hd, t_job, t_wall), strict=True):
                samples[key].append(val)
    size = weights.size_bytes
    profile = stage_profile(engine, p_dir, max(5, repeats // 2))
    engine.close()
    print("  PEFT load_adapter ...", flush=True)
    samples["peft_load_adapter"] = peft_load_times(model_dir, p_dir, max(5, repeats // 2))
    summary = {k: ms_summary(v) for k, v in samples.items()}
    p50 = summary["disk_device"]["p50_ms"]
    return {"adapter": str(p_dir), "size_bytes": size, "repeats": repeats, "tiers": summary, "profile_ms": profile,
            "target_p50_ms": TARGETS["cold_p50_ms"], "pass": p50 <= TARGETS["cold_p50_ms"],
            "speedup_vs_peft": summary["peft_load_adapter"]["p50_ms"] / p50}


# ---- 2. throughput at n = 1000 vs n = 5 ----------------------------------------------------------------
@dataclass(frozen=True)
class ScaleWork:
    requests: int
    concurrency: int
    prompt_lo: int
    prompt_hi: int
    new_tokens: int


def closed_loop(engine: LLMEngine, reqs: list[tuple[list[int], str]], work: ScaleWork) -> dict[str, object]:
    """Keep `concurrency` requests in flight until all ran; tokens/s and the tier each adapter was in."""
    params = SamplingParams(max_tokens=work.new_tokens, temperature=0.0, ignore_eos=True)
    cache, pending, tiers = engine.adapters, deque(reqs), Counter()
    misses0, bytes0, inflight, tokens = dict(cache.stats.misses), cache.stats.bytes_loaded, 0, 0
    batches: list[tuple[int, int]] = []  # (sequences, distinct adapters) of each step that ran
    t0 = time.perf_counter()
    while pending or engine.has_work():
        while pending and inflight < work.concurrency:
            prompt, adapter = pending.popleft()
            tiers[cache.tier(adapter)] += 1
            engine.add_request(f"s{next(_ids)}", prompt, params, adapter)
            inflight += 1
        step = engine.step()
        for out in step.outputs:
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            tokens += len(out.new_token_ids)
            inflight -= out.finished
        if not step.computed:
            time.sleep(0.001)  # every runnable request waits on an adapter load
        else:
            batches.append((step.stats.num_seqs, step.stats.num_adapters))
    seconds = time.perf_counter() - t0
    return {"tok_s": tokens / seconds, "seconds": seconds, "tier_at_arrival": dict(tiers),
            "mean_batch": statistics.fmean(b[0] for b in batches),
            "mean_distinct_adapters": statistics.fmean(b[1] for b in batches),
            "loads": {t: cache.stats.misses[t] - misses0[t] for t in misses0},
            "mb_loaded_per_s": (cache.stats.bytes_loaded - bytes0) / seconds / 2**20}


def scale_stream(seed: int, work: ScaleWork, vocab: int) -> list[tuple[list[int], float]]:
    rng = random.Random(seed)
    return [(random_prompt(rng, work.prompt_lo, work.prompt_hi, vocab), rng.random()) for _ in range(work.requests)]


# (n registered adapters, host tier size): the target compares each n=1000 case with n=5. With the host
# tier holding all 1000 (3.5 GiB here; S-LoRA's setting) a miss is a host->device copy; with 128 most misses
# read the disk, since alpha=0.3 is flat in the tail (P(index < 128) = 0.128**0.3 = 54 %).
SCALE_CASES = {"n=5": (5, 32), "n=1000 host=1000": (1000, 1000), "n=1000 host=128": (1000, 128)}


def scale_engine(model_dir: Path, dirs: list[Path], n: int, host: int, work: ScaleWork) -> LLMEngine:
    engine = build_engine(model_dir, {f"a{i:04d}": dirs[i] for i in range(n)}, slots=32, host=host,
                          seqs=work.concurrency, batch_tokens=work.concurrency * work.prompt_hi,
                          max_len=work.prompt_hi + work.new_tokens)
    if host >= n > 32:  # as registration does: the validation read seeds the host tier (AdapterStore)
        shapes = engine.lora.module_shapes()
        for i in range(n):
            engine.adapters.put_host(f"a{i:04d}", load_adapter_dir(dirs[i], shapes, max_rank=MAX_RANK))
    return engine


def part_scale(model_dir: Path, work: ScaleWork, repeats: int) -> dict[str, object]:
    s1 = synth_adapters(model_dir, "S1", 1000)
    engines = {case: scale_engine(model_dir, s1, n, host, work) for case, (n, host) in SCALE_CASES.items()}
    vocab = engines["n=5"].loaded.model.config.vocab_size
    rounds: dict[str, list[dict[str, object]]] = {case: [] for case in SCALE_CASES}
    for r in range(repeats + 1):  # round 0 warms up: loads n=5's adapters, fills the n=1000 caches
        stream = scale_stream(r, work, vocab)
        shift = r % len(SCALE_CASES)
        for case in list(SCALE_CASES)[shift:] + list(SCALE_CASES)[:shift]:
            n = SCALE_CASES[case][0]
            res = closed_loop(engines[case], [(p, f"a{popular(u, n):04d}") for p, u in stream], work)
            print(f"  round {r}{' (warm-up)' if r == 0 else ''} {case}: {res['tok_s']:.1f} tok/s, "
                  f"tiers {res['tier_at_arrival']}, loads {res['loads']}", flush=True)
            if r:
                rounds[case].append(res)
    stats = {case: engines[case].adapters.stats for case in engines}
    for e in engines.values():
        e.close()
    base = [x["tok_s"] for x in rounds["n=5"]]
    ratios = {case: paired_ratio([x["tok_s"] for x in rounds[case]], base) for case in SCALE_CASES if case != "n=5"}
    return {"work": work.__dict__, "device_slots": 32, "alpha": ALPHA,
            "bytes_bound": _bytes_bound(engines["n=5"], s1[0], rounds),
            "cases": {case: {"n": n, "host_adapters": h} for case, (n, h) in SCALE_CASES.items()},
            "rounds": rounds, "tok_s": {case: median([x["tok_s"] for x in v]) for case, v in rounds.items()},
            "hit_rate_at_arrival": {case: _hit_rates(v) for case, v in rounds.items()},
            "cache_counters": {case: {"hits": s.hits, "misses": s.misses, "evictions": s.evictions}
                               for case, s in stats.items()},
            "ratio": ratios, "target": TARGETS["scale_ratio"],
            "pass": {case: r >= TARGETS["scale_ratio"] for case, r in ratios.items()}}


def _bytes_bound(engine: LLMEngine, adapter_dir: Path, rounds: dict[str, list[dict[str, object]]]) -> dict:
    """BENCHMARK.md's limit: a decode step reads the base weights plus A/B of each distinct adapter in the
    batch, so throughput(n=1000)/throughput(n=5) <= (W + d5 * a) / (W + d1000 * a) if steps are bandwidth-bound
    (d = mean distinct adapters per step, measured)."""
    w = sum(p.numel() * p.element_size() for p in engine.loaded.model.parameters())
    a = (adapter_dir / WEIGHTS_NAME).stat().st_size  # fp32 on disk = fp32 in the slots (header: ~30 KB)
    d = {case: median([x["mean_distinct_adapters"] for x in v]) for case, v in rounds.items()}
    return {"base_bytes": w, "adapter_bytes": a, "mean_distinct_adapters": d,
            "ratio_bound": {c: (w + d["n=5"] * a) / (w + d[c] * a) for c in d if c != "n=5"}}


def _hit_rates(rounds: list[dict[str, object]]) -> dict[str, float]:
    """Share of requests whose adapter was already on the device / in host memory / only on disk."""
    total = Counter()
    for res in rounds:
        total.update(res["tier_at_arrival"])
    n = sum(total.values())
    return {tier: total[tier] / n for tier in ("device", "host", "disk")}


# ---- 3. hot-adapter TTFT with concurrent cold loads --------------------------------------------------------
@dataclass(frozen=True)
class TtftWork:
    seconds: float
    hot_rate: float  # requests/s for the pinned hot adapters (the measured class)
    other_rate: float  # requests/s for the others: cold adapters, or resident ones in the baseline
    prompt_lo: int = 8
    prompt_hi: int = 24
    new_tokens: int = 4


def ttft_plan(seed: int, work: TtftWork, vocab: int) -> list[tuple[float, list[int], str]]:
    """Poisson arrivals of both classes: (arrival s, prompt, class 'hot' or 'other')."""
    rng, plan = random.Random(seed), []
    for cls, rate in (("hot", work.hot_rate), ("other", work.other_rate)):
        t = rng.expovariate(rate)
        while t < work.seconds:
            plan.append((t, random_prompt(rng, work.prompt_lo, work.prompt_hi, vocab), cls))
            t += rng.expovariate(rate)
    return sorted(plan, key=lambda x: x[0])


async def _timed_request(engine: AsyncEngine, at: float, t0: float, prompt: list[int], adapter: str,
                         params: SamplingParams) -> float:
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    start, ttft = time.perf_counter(), None
    async for out in engine.generate(prompt, params, adapter):  # drain it all: leaving early would abort
        if out.error:
            raise RuntimeError(f"request for {adapter} failed: {out.error}")
        if ttft is None and out.new_token_ids:
            ttft = time.perf_counter() - start
    return ttft


async def run_ttft_case(engine: AsyncEngine, plan: list[tuple[float, list[int], str]],
                        other_names: Callable[[int], str], work: TtftWork) -> dict[str, list[float]]:
    params = SamplingParams(max_tokens=work.new_tokens, temperature=0.0, ignore_eos=True)
    t0, jobs, classes, k_hot, k_other = time.perf_counter(), [], [], 0, 0
    for at, prompt, cls in plan:
        if cls == "hot":
            name, k_hot = f"hot{k_hot % 2}", k_hot + 1
        else:
            name, k_other = other_names(k_other), k_other + 1
        jobs.append(_timed_request(engine, at, t0, prompt, name, params))
        classes.append(cls)
    ttfts = await asyncio.gather(*jobs)
    return {cls: [t for t, c in zip(ttfts, classes, strict=True) if c == cls] for cls in ("hot", "other")}


def part_ttft(model_dir: Path, work: TtftWork, repeats: int) -> dict[str, object]:
    pool = synth_adapters(model_dir, "P", 40)
    dirs = {"hot0": pool[0], "hot1": pool[1], "warm0": pool[2], "warm1": pool[3]}
    cold = {f"cold{i:02d}": d for i, d in enumerate(pool[4:])}  # 36 > host + slots: each use reads the disk
    sync = build_engine(model_dir, dirs | cold, slots=8, host=8, seqs=16, batch_tokens=512,
                        max_len=work.prompt_hi + work.new_tokens)
    for name in dirs:
        sync.adapters.pin(name)  # before the engine thread starts: this thread still owns the slot table
    engine = AsyncEngine(sync)
    engine.start()
    cases = {"resident": lambda k: f"warm{k % 2}", "cold": lambda k: f"cold{k % len(cold):02d}"}
    vocab = sync.loaded.model.config.vocab_size

    def run(r: int, case: str) -> tuple[dict[str, object], str]:
        plan = ttft_plan(r, work if r else replace(work, seconds=work.seconds / 4), vocab)  # round 0: a quarter
        loads0 = engine.adapters.stats.misses["device"]  # the snapshot the engine thread published
        got = asyncio.run(run_ttft_case(engine, plan, cases[case], work))
        res = {"hot": ms_summary(got["hot"]), "other": ms_summary(got["other"]),
               "cold_loads": engine.adapters.stats.misses["device"] - loads0}
        return res, f"other p50 {res['other']['p50_ms']:.0f} ms; loads {res['cold_loads']}"

    try:
        _wait_resident(engine, list(dirs))
        rounds = alternating_rounds(repeats, list(cases), run)
    finally:
        engine.stop()
    p99 = {c: [x["hot"]["p99_ms"] for x in v] for c, v in rounds.items()}
    ratio = paired_ratio(p99["cold"], p99["resident"])
    return {"work": work.__dict__, "slots": 8, "host_adapters": 8, "rounds": rounds,
            "hot_p99_ms": {c: median(v) for c, v in p99.items()},
            "ratio": ratio, "target": TARGETS["ttft_ratio"], "pass": ratio <= TARGETS["ttft_ratio"]}


def alternating_rounds(repeats: int, cases: list[str],
                       run: Callable[[int, str], tuple[dict[str, object], str]]) -> dict[str, list[dict[str, object]]]:
    """Round 0 warms up (dropped), then `repeats` rounds of every case, the order alternating per round; `run(round,
    case)` -> (its result with a "hot" TTFT summary, a note to print). The per-case lists of results."""
    rounds: dict[str, list[dict[str, object]]] = {c: [] for c in cases}
    for r in range(repeats + 1):
        for case in (cases if r % 2 == 0 else cases[::-1]):
            res, note = run(r, case)
            print(f"  round {r}{' (warm-up)' if r == 0 else ''} {case}: hot TTFT p50 {res['hot']['p50_ms']:.0f} p99 "
                  f"{res['hot']['p99_ms']:.0f} ms; {note}", flush=True)
            if r:
                rounds[case].append(res)
    return rounds


def _wait_resident(engine: AsyncEngine, names: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(engine.adapters.view(n).tier != "device" for n in names):  # the published snapshot
        if time.monotonic() > deadline:
            raise RuntimeError(f"pinned adapters {names} not resident after {timeout} s")
        time.sleep(0.05)


# ---- 4. shipping versions over HTTP: PUT …/weights once per second ---------------------------------------
def part_swap(model_dir: Path, work: swap.SwapWork, repeats: int) -> dict[str, object]:
    pool = synth_adapters(model_dir, "P", 11)  # hot0, hot1, trained's first version, then 8 pushed checkpoints
    bodies = swap.distinct_bodies(pool[3:], 8)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        server = swap.start(model_dir, pool[:3], Path(tmp))

        def run(r: int, case: str) -> tuple[dict[str, object], str]:
            w = work if r else replace(work, seconds=work.seconds / 3)  # round 0: a third as long
            res = _swap_summary(asyncio.run(swap.run_case(server, bodies, case == "replace", w, r, vocab)))
            return res, (f"{res['hot']['n']} hot requests; trainer: PUT answered p50 {res['put_answer']['p50_ms']:.0f}"
                         f" ms, first token after the PUT p50 {res['put_to_first_token']['p50_ms']:.0f} ms")

        try:
            rounds = alternating_rounds(repeats, ["replace", "steady"], run)
        finally:
            server.stop()
    p99 = {c: [x["hot"]["p99_ms"] for x in v] for c, v in rounds.items()}
    ratio = paired_ratio(p99["replace"], p99["steady"])
    pushes = [x for res in rounds["replace"] for x in res["raw_pushes"]]
    return {"work": work.__dict__, "adapter_bytes": len(bodies[0]), "rounds": rounds,
            "hot_p99_ms": {c: median(v) for c, v in p99.items()},
            "put_to_first_token": ms_summary([p["first_token"] - p["sent"] for p in pushes]),
            "put_answer": ms_summary([p["answered"] - p["sent"] for p in pushes]),
            "ttft_after_put": ms_summary([p["first_token"] - p["answered"] for p in pushes]),
            "versions_pushed": len(pushes), "ratio": ratio, "target": TARGETS["swap_ratio"],
            "pass": ratio <= TARGETS["swap_ratio"]}


def _swap_summary(got: dict[str, object]) -> dict[str, object]:
    pushes = got["pushes"]
    return {"hot": ms_summary(got["hot_ttft_s"]),
            "put_answer": ms_summary([p["answered"] - p["sent"] for p in pushes]),
            "put_to_first_token": ms_summary([p["first_token"] - p["sent"] for p in pushes]),
            "raw_pushes": pushes}


# ---- report ----------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_machine(res: dict[str, object], parts: list[str]) -> None:
    """Each part's machine facts (load average before -> after): on a shared machine they explain the noise."""
    for part in (p for p in parts if p in res):
        m = res[part].get("machine") or res.get("machine", {})
        print(f"  [{part}] {m.get('processor')}, {m.get('cpus_usable')} cpus, torch {m.get('torch')} "
              f"({m.get('torch_threads')} thread), load avg {m.get('load_avg_1_5_15')} -> {m.get('load_avg_end')}")


def print_report(res: dict[str, object]) -> None:
    print("\n== adapter cache benchmark (bench-small, fp32, CPU) ==")
    print_machine(res, ["cold", "scale", "ttft", "swap"])
    if "cold" in res:
        c = res["cold"]
        print(f"cold load of one P adapter ({c['size_bytes'] / 2**20:.1f} MiB fp32), {c['repeats']} repeats:")
        print(f"  {'stage':<22}{'p50 ms':>10}{'p99 ms':>10}")
        for tier, s in c["tiers"].items():
            print(f"  {tier:<22}{s['p50_ms']:>10.1f}{s['p99_ms']:>10.1f}")
        print(f"  disk->device p50 {c['tiers']['disk_device']['p50_ms']:.1f} ms (target <= 20 ms): "
              f"{verdict(c['pass'])}; {c['speedup_vs_peft']:.1f}x faster than PEFT load_adapter")
        print("  stage profile (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in c["profile_ms"].items()))
    if "scale" in res:
        s = res["scale"]
        print(f"throughput, closed loop at {s['work']['concurrency']}, 32 device slots, alpha {ALPHA} (tok/s):")
        for case, tok_s in s["tok_s"].items():
            rates = ", ".join(f"{t} {v:.0%}" for t, v in s["hit_rate_at_arrival"][case].items())
            ratio = s["ratio"].get(case)
            tail = (f"ratio {ratio:.3f} (target >= 0.95): {verdict(s['pass'][case])}" if ratio is not None
                    else "(reference)")
            bound = s["bytes_bound"]["ratio_bound"].get(case)
            limit = f" (bytes bound {bound:.3f} if steps were bandwidth-bound)" if bound is not None else ""
            print(f"  {case:<18}{tok_s:>7.1f}  tier at arrival: {rates};  {tail}{limit}")
        d = s["bytes_bound"]["mean_distinct_adapters"]
        print("  mean distinct adapters per step: " + ", ".join(f"{c} {v:.1f}" for c, v in d.items()))
    if "ttft" in res:
        t = res["ttft"]
        print(f"hot-adapter TTFT p99 with cold loads / without: {t['hot_p99_ms']['cold']:.0f} / "
              f"{t['hot_p99_ms']['resident']:.0f} ms = {t['ratio']:.2f} (target <= 1.2): {verdict(t['pass'])}")
    if "swap" in res:
        w = res["swap"]
        print(f"shipping versions over HTTP, PUT …/weights ({w['adapter_bytes'] / 1e6:.1f} MB) once per second, "
              f"{w['versions_pushed']} versions pushed:")
        for key, label in (("put_to_first_token", "PUT sent -> first token of the new version"),
                           ("put_answer", "PUT sent -> PUT answered (registered, host tier)"),
                           ("ttft_after_put", "PUT answered -> first token (slot load + prefill)")):
            print(f"  {label:<52} p50 {w[key]['p50_ms']:7.1f} ms  p99 {w[key]['p99_ms']:7.1f} ms")
        print(f"  hot-adapter TTFT p99 with a replace per second / without: {w['hot_p99_ms']['replace']:.0f} / "
              f"{w['hot_p99_ms']['steady']:.0f} ms = {w['ratio']:.2f} (target <= 1.2): {verdict(w['pass'])}")


def plot(path: Path, res: dict[str, object]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    if "cold" in res:
        tiers = res["cold"]["tiers"]
        axes[0].bar(list(tiers), [v["p50_ms"] for v in tiers.values()], label="p50")
        axes[0].scatter(list(tiers), [v["p99_ms"] for v in tiers.values()], color="k", marker="_", s=300, label="p99")
        axes[0].axhline(TARGETS["cold_p50_ms"], linestyle="--", color="gray", linewidth=1)
        axes[0].set(yscale="log", ylabel="ms", title="cold load, one P adapter (log scale; dashed: 20 ms)")
        axes[0].tick_params(axis="x", labelrotation=20, labelsize=8)
        axes[0].legend(fontsize=8)
    if "scale" in res:
        s = res["scale"]
        for case, rounds in s["rounds"].items():
            axes[1].plot(range(1, len(rounds) + 1), [x["tok_s"] for x in rounds], marker="o", label=case)
        ratios = ", ".join(f"{r:.2f}" for r in s["ratio"].values())
        axes[1].set(xlabel="round", ylabel="output tok/s", title=f"closed loop; n=1000/n=5: {ratios} (target 0.95)")
        axes[1].legend(fontsize=8)
    if "ttft" in res:
        t = res["ttft"]
        for case, rounds in t["rounds"].items():
            axes[2].plot(range(1, len(rounds) + 1), [x["hot"]["p99_ms"] for x in rounds], marker="o",
                         label=f"hot p99, others {case}")
        axes[2].set(xlabel="round", ylabel="ms", title=f"hot-adapter TTFT p99, ratio {t['ratio']:.2f} (target 1.2)")
        axes[2].legend(fontsize=8)
    if "swap" in res:
        w = res["swap"]
        for case, rounds in w["rounds"].items():
            axes[3].plot(range(1, len(rounds) + 1), [x["hot"]["p99_ms"] for x in rounds], marker="o",
                         label=f"hot p99, {case}")
        axes[3].set(xlabel="round", ylabel="ms", title=f"PUT weights 1/s: hot TTFT p99 ratio {w['ratio']:.2f}; "
                                                       f"PUT->token p50 {w['put_to_first_token']['p50_ms']:.0f} ms")
        axes[3].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def run_parts(parts: dict[str, Callable[[], dict[str, object]]], chosen: list[str], json_path: Path,
              header: dict[str, object]) -> dict[str, object]:
    """Run the chosen parts in order, each stamped with the machine's facts (load average before and after)
    and its wall time. The results file is rewritten after each part (a later part's failure keeps the earlier
    ones), and a partial run merges into it so the other parts' numbers stay, each with the commit and command
    it ran with (the file's top-level pair names the latest run)."""
    res: dict[str, object] = {}
    if set(chosen) != set(parts) and json_path.is_file():
        res = json.loads(json_path.read_text())
        for kept in (p for p in parts if p in res):
            res[kept].setdefault("commit", res.get("commit"))
            res[kept].setdefault("command", res.get("command"))
    res |= header
    for i, name in enumerate(p for p in parts if p in chosen):
        print(f"[{i + 1}/{len(chosen)}] {name}", flush=True)
        facts, t0, commit = machine_facts("cpu"), time.perf_counter(), git_commit()  # the code that runs
        print_facts(facts)
        res[name] = parts[name]() | {"commit": commit, "command": command_line()}
        res[name]["machine"] = facts | {"load_avg_end": [round(x, 2) for x in os.getloadavg()]}
        res[name]["wall_s"] = time.perf_counter() - t0
        res = json.loads(json.dumps(res, default=str))
        write_json(json_path, res)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests and shorter runs (same protocol)")
    ap.add_argument("--parts", nargs="+", default=["cold", "scale", "ttft", "swap"],
                    choices=["cold", "scale", "ttft", "swap"])
    ap.add_argument("--repeats", type=int, default=3, help="rounds per ratio (median of per-round ratios)")
    ap.add_argument("--repeats-load", type=int, default=30, help="cold-load repeats (p50/p99)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = bench_small_dir()
    parts: dict[str, Callable[[], dict[str, object]]] = {
        "cold": lambda: part_cold(model_dir, 20 if args.quick else args.repeats_load),
        "scale": lambda: part_scale(model_dir, ScaleWork(96 if args.quick else 192, 32, 8, 32, 16), args.repeats),
        "ttft": lambda: part_ttft(model_dir, TtftWork(40.0 if args.quick else 90.0, 1.0, 0.5), args.repeats),
        "swap": lambda: part_swap(model_dir, swap.SwapWork(20.0 if args.quick else 60.0, 2.0), args.repeats),
    }
    stem = "adapters_quick" if args.quick else "adapters"
    res = run_parts(parts, args.parts, RESULTS_DIR / f"{stem}.json",
                    {"model": "bench-small", "dtype": "float32", "quick": args.quick})
    print_report(res)
    plot(RESULTS_DIR / f"{stem}.png", res)


if __name__ == "__main__":
    main()
