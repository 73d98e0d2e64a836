"""Prefix caching benchmark (BENCHMARK.md: "prefix caching: TTFT p50 of a hit (1,024-token shared prefix) ÷ a miss
<= 0.25" and "prefix caching on ÷ off on a zero-hit workload (throughput) >= 0.97"), in process on bench-small
(SmolLM2-135M-Instruct's real weights, fp32, CPU), 16 seeded S1 adapters.

1. hits vs misses: 16 adapters x 8 requests, each a 1,024-token system prompt of its adapter (real text) then
   a 32-token user turn of its own, 8 new tokens, greedy; interleaved (adapter i % 16), sent one at a time so a
   TTFT is the request's own prefill. A request whose system prompt was computed before (by its adapter: the
   cache is keyed by adapter registration) is a hit. Reported: TTFT p50 / p99 of hits and misses, the ratio,
   tokens found per hit, the hit rate (vllm:prefix_cache_hits / queries).
2. zero hits: 32 requests of distinct 256-token prompts (fresh ones each round), 32 new tokens, 8 at a time
   (closed loop), prefix caching on vs off in interleaved rounds: output tokens/s ratio (the cost of hashing,
   publishing and looking up blocks when nothing is ever found).

Run: .venv/bin/python bench/bench_prefix.py [--repeats 3] [--quick]
Writes bench/results/prefix.json (prefix_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR,
    Measure,
    bench_adapters,
    bench_small_dir,
    bench_small_label,
    interleaved,
    machine_facts,
    median,
    print_facts,
    text_prompts,
    write_json,
)

from loraplex.adapters.weights import load_adapter_dir  # noqa: E402
from loraplex.server.config import LoRAConfig, ModelConfig  # noqa: E402
from loraplex.server.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from loraplex.server.engine.sampling_params import SamplingParams  # noqa: E402
from loraplex.server.engine.scheduler import SchedulerConfig  # noqa: E402
from loraplex.server.model_loader import load_model  # noqa: E402

SYSTEM, TURN, NEW, ADAPTERS, PER_ADAPTER = 1024, 32, 8, 16, 8
ZERO_HIT = {"requests": 32, "prompt": 256, "new": 32, "concurrency": 8}
BLOCK = 16
TARGETS = {"hit_over_miss_ttft_p50": 0.25, "on_over_off_zero_hit": 0.97}


def build(model_dir: Path, adapters: dict[str, Path]) -> LLMEngine:
    loaded = load_model(ModelConfig(path=model_dir, dtype="float32", device="cpu"))
    holder: dict[str, LLMEngine] = {}
    cfg = EngineConfig(
        max_model_len=SYSTEM + TURN + NEW + 16, block_size=BLOCK,
        # every adapter's system prompt stays cached, plus room for the requests in flight
        num_kv_blocks=(ADAPTERS + ZERO_HIT["concurrency"] + 2) * ((SYSTEM + TURN + NEW) // BLOCK + 2),
        scheduler=SchedulerConfig(max_num_seqs=ZERO_HIT["concurrency"], max_batch_tokens=2048),
        lora=LoRAConfig(max_loras=ADAPTERS, max_lora_rank=16, max_cpu_loras=ADAPTERS))
    holder["e"] = LLMEngine(loaded, cfg, lambda n: load_adapter_dir(adapters[n], holder["e"].lora.module_shapes(),
                                                                    max_rank=16))
    return holder["e"]


def caching(engine: LLMEngine, on: bool) -> None:
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, prefix_caching=on)


def one(engine: LLMEngine, rid: str, prompt: list[int], adapter: str | None, new: int) -> tuple[float, int]:
    """(TTFT seconds, cached prompt tokens) of one request run alone to its end."""
    engine.add_request(rid, prompt, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True), adapter)
    t0, ttft, cached = time.perf_counter(), None, 0
    while engine.has_work():
        for out in engine.step().outputs:
            if out.new_token_ids and ttft is None:
                ttft, cached = time.perf_counter() - t0, out.num_cached_tokens
    return ttft, cached


def hits_and_misses(engine: LLMEngine, tokenizer, names: list[str], per_adapter: int, seed: int) -> dict:
    caching(engine, True)
    systems = text_prompts(tokenizer, [SYSTEM] * len(names), seed=seed)
    turns = text_prompts(tokenizer, [TURN] * (len(names) * per_adapter), seed=seed + 1)
    q0, h0 = engine.scheduler.prefix_queries, engine.scheduler.prefix_hits
    hit, miss, found = [], [], []
    for i in range(len(names) * per_adapter):
        a = i % len(names)
        ttft, cached = one(engine, f"hm{seed}-{i}", systems[a] + turns[i], names[a], NEW)
        (hit if cached else miss).append(ttft)
        if cached:
            found.append(cached)
    queries, hits = engine.scheduler.prefix_queries - q0, engine.scheduler.prefix_hits - h0
    return {"hit_ttft_p50": statistics.median(hit), "hit_ttft_p99": max(hit), "miss_ttft_p50": statistics.median(miss),
            "miss_ttft_p99": max(miss), "hits": len(hit), "misses": len(miss),
            "tokens_found_per_hit": statistics.mean(found), "hit_rate_tokens": hits / queries}


def zero_hit(engine: LLMEngine, tokenizer, on: bool, seed: int) -> Measure:
    caching(engine, on)
    z = ZERO_HIT
    prompts = text_prompts(tokenizer, [z["prompt"]] * z["requests"], seed=seed)
    rng = random.Random(seed)
    for p in prompts:  # text_prompts cuts a corpus: make sure no two share a block
        p[0] = rng.randrange(100, 40000)
    pending, live, done = list(prompts), 0, 0
    params = SamplingParams(max_tokens=z["new"], temperature=0.0, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    while done < len(prompts):
        while pending and live < z["concurrency"]:
            engine.add_request(f"z{seed}-{on}-{len(pending)}", pending.pop(), params, None)
            live += 1
        for out in engine.step().outputs:
            if out.finished:
                live, done = live - 1, done + 1
    return Measure(len(prompts) * z["new"], time.perf_counter() - t0, time.process_time() - c0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="4 adapters x 3 requests, 1 round: a smoke run")
    parser.add_argument("--zero-hit-only", action="store_true",
                        help="rerun only the zero-hit on/off comparison; the TTFT part of the results file stays")
    args = parser.parse_args()
    torch.set_num_threads(1)
    facts = machine_facts("cpu")
    print_facts(facts)
    start = time.perf_counter()
    model_dir = bench_small_dir()
    n_adapters, per_adapter = (4, 3) if args.quick else (ADAPTERS, PER_ADAPTER)
    repeats = 1 if args.quick else args.repeats
    dirs = bench_adapters(model_dir, "S1", n_adapters)
    names = [f"a{i}" for i in range(n_adapters)]
    engine = build(model_dir, dict(zip(names, dirs, strict=True)))
    tokenizer = engine.tokenizer
    out_path = RESULTS_DIR / ("prefix_quick.json" if args.quick else "prefix.json")
    rounds = json.loads(out_path.read_text())["rounds"] if args.zero_hit_only else []
    counter = iter(range(10**6))
    for r in range(0 if args.zero_hit_only else repeats):
        rounds.append(hits_and_misses(engine, tokenizer, names, per_adapter, seed=100 + r))
        print(f"round {r}: hit TTFT p50 {rounds[-1]['hit_ttft_p50'] * 1e3:.0f} ms, miss "
              f"{rounds[-1]['miss_ttft_p50'] * 1e3:.0f} ms", flush=True)
    cases = {"on": lambda: zero_hit(engine, tokenizer, True, next(counter)),
             "off": lambda: zero_hit(engine, tokenizer, False, next(counter))}
    samples = interleaved(cases, repeats)
    ratio_ttft = median([r["hit_ttft_p50"] / r["miss_ttft_p50"] for r in rounds])
    ratio_zero = median([a.rate / b.rate for a, b in zip(samples["on"], samples["off"], strict=True)])
    # per CPU-second: what an idle machine's wall clock would show (other processes' load stretches the wall
    # time of whichever case they overlap)
    ratio_zero_cpu = median([a.cpu_rate / b.cpu_rate for a, b in zip(samples["on"], samples["off"], strict=True)])
    verdicts = {"hit_over_miss_ttft_p50": ratio_ttft <= TARGETS["hit_over_miss_ttft_p50"],
                "on_over_off_zero_hit": ratio_zero >= TARGETS["on_over_off_zero_hit"]}
    summary = {k: median([r[k] for r in rounds]) for k in rounds[0]}
    print(f"\nhits {summary['hits']:.0f}, misses {summary['misses']:.0f} per round; tokens found per hit "
          f"{summary['tokens_found_per_hit']:.0f}; hit rate (tokens) {summary['hit_rate_tokens']:.3f}")
    print(f"TTFT p50 hit {summary['hit_ttft_p50'] * 1e3:.0f} ms / miss {summary['miss_ttft_p50'] * 1e3:.0f} ms = "
          f"{ratio_ttft:.3f} (target <= {TARGETS['hit_over_miss_ttft_p50']}: "
          f"{'PASS' if verdicts['hit_over_miss_ttft_p50'] else 'MISS'})")
    print(f"zero-hit throughput on / off = {ratio_zero:.3f} (target >= {TARGETS['on_over_off_zero_hit']}: "
          f"{'PASS' if verdicts['on_over_off_zero_hit'] else 'MISS'}); tok/s on "
          f"{median([m.rate for m in samples['on']]):.1f}, off {median([m.rate for m in samples['off']]):.1f}; "
          f"per CPU-second {ratio_zero_cpu:.3f}")
    facts["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out_path, {
        "machine": facts, "model": bench_small_label(), "settings": vars(args),
        "workload": {"system": SYSTEM, "turn": TURN, "new": NEW, "adapters": n_adapters, "per_adapter": per_adapter,
                     "zero_hit": ZERO_HIT, "block_size": BLOCK},
        "wall_s": round(time.perf_counter() - start, 1), "summary": summary, "rounds": rounds,
        "hit_over_miss_ttft_p50": {"value": round(ratio_ttft, 4), "target": TARGETS["hit_over_miss_ttft_p50"],
                                   "verdict": "PASS" if verdicts["hit_over_miss_ttft_p50"] else "MISS"},
        "zero_hit_on_over_off": {"value": round(ratio_zero, 4), "target": TARGETS["on_over_off_zero_hit"],
                                 "verdict": "PASS" if verdicts["on_over_off_zero_hit"] else "MISS",
                                 "cpu_time_value": round(ratio_zero_cpu, 4),
                                 "on_tok_s": [m.rate for m in samples["on"]],
                                 "off_tok_s": [m.rate for m in samples["off"]]}})


if __name__ == "__main__":
    main()
