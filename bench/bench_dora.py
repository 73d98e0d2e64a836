"""DoRA beside LoRA on bench_engine's workload (issue 26): what a DoRA row costs a step, and that a step without
one pays nothing.

bench_engine's engine and closed loop (bench-small, B = 16 requests of 32-128 prompt tokens of real text, 64 new
tokens each, greedy, EOS ignored; `--quick`: 32 / 32), for an fp32 and an nf4 base, one engine per base with
every adapter resident (32 device slots), cases interleaved per round (median of >= 3 rounds):

  ours_p_distinct   16 distinct P adapters (r16 LoRA on all 7 projections): bench_engine's P mix
  ours_d_distinct   16 distinct D adapters (P as DoRA: r16, all 7 projections, use_dora)
                    (target: ours_d_distinct / ours_p_distinct >= 0.9)
  ours_pd_half      8 P + 8 D in every step (the mixed batch: every row of a DoRA step is scaled)

The op count: one decode step of the 16 requests traced (adapters/ops/trace.py) on the fp32 engine for the base
model, the P mix (before any DoRA adapter was ever in a slot), the D mix, the half mix, and the P mix again with
the 16 DoRA adapters resident: LoRA's ops per wrapped linear ((P - base) / wrapped linears), DoRA's extra ops
per wrapped linear ((D - P) / wrapped linears), and whether the P step's op sequence (names and shapes) with
DoRA adapters resident is exactly the one before (a step without a DoRA row pays nothing;
tests/server/test_dora_engine.py checks the same against an engine that never had a DoRA adapter). On a CPU
the torch ops run (DoRA: a gather of the rows' factors and a multiply per layer, an add more with a bias); on
CUDA the triton expand applies the factors in its store (no extra launch), which this CPU-only bench cannot time.

Run: .venv/bin/python bench/bench_dora.py [--quick] [--repeats N] [--quantize none nf4] [--threads N]
Writes bench/results/dora.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_engine import BATCH, NUM_ADAPTERS, OurEngine, Workload, _named, adapter_mixes  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR,
    Measure,
    bench_adapters,
    bench_small_dir,
    interleaved,
    machine_facts,
    median,
    paired_ratio,
    print_facts,
    write_json,
)

from loraplex.adapters.ops.trace import OpTrace, traced_forward  # noqa: E402
from loraplex.adapters.targets import TARGET_MODULES  # noqa: E402
from loraplex.server.engine.sampling_params import SamplingParams  # noqa: E402

TARGET = 0.9  # ours_d_distinct / ours_p_distinct
WARMUP_TOKENS = 2
CASES = ("ours_p_distinct", "ours_d_distinct", "ours_pd_half")


def mixes(p: list[str], d: list[str]) -> dict[str, list[str | None]]:
    """Per-request adapter names: bench_engine's distinct mixes, and half P half D (shuffled as they are)."""
    half = adapter_mixes(p[: NUM_ADAPTERS // 2] + d[: NUM_ADAPTERS // 2], seed=1)["distinct"]
    return {"ours_p_distinct": adapter_mixes(p)["distinct"], "ours_d_distinct": adapter_mixes(d)["distinct"],
            "ours_pd_half": half}


# ---- timing -----------------------------------------------------------------------------------------------
def run_config(quantize: str, work: Workload, repeats: int) -> dict[str, object]:
    label = "fp32" if quantize == "none" else quantize
    start = time.perf_counter()
    model_dir = bench_small_dir()
    p = _named("p", bench_adapters(model_dir, "P", NUM_ADAPTERS))
    d = _named("d", bench_adapters(model_dir, "D", NUM_ADAPTERS))
    ours = OurEngine(model_dir, quantize, p | d, work)
    prompts = work.prompts(ours.engine.tokenizer)
    by_case = mixes(list(p), list(d))
    seen: dict[str, list[list[int]]] = {}
    ops = op_counts(ours, by_case) if quantize == "none" else None  # also loads every adapter into its slot
    if ops is not None:
        print(f"[{label}] op counts: {ops}", flush=True)

    def case(name: str, n: int = work.new_tokens) -> Measure:
        measure, seen[name] = ours.run(prompts, by_case[name], n)
        return measure

    print(f"[{label}] warm-up: {WARMUP_TOKENS} new tokens per case (loads every adapter into its slot)", flush=True)
    for name in CASES:
        case(name, WARMUP_TOKENS)
    samples = interleaved({name: (lambda n=name: case(n)) for name in CASES}, repeats,
                          log=lambda line: print(f"[{label}]{line}", flush=True))
    wall = {k: [m.rate for m in v] for k, v in samples.items()}
    cpu = {k: [m.cpu_rate for m in v] for k, v in samples.items()}
    value = paired_ratio(wall["ours_d_distinct"], wall["ours_p_distinct"])
    result: dict[str, object] = {
        "tok_s": wall, "cpu_tok_s": cpu, "median_tok_s": {k: median(v) for k, v in wall.items()},
        "target": {"metric": "16 distinct D / 16 distinct P (ours)", "value": value, "target": TARGET,
                   "pass": value >= TARGET,
                   "cpu_time_value": paired_ratio(cpu["ours_d_distinct"], cpu["ours_p_distinct"])},
        "pd_half_over_p": paired_ratio(wall["ours_pd_half"], wall["ours_p_distinct"]),
        "mixes": by_case,
    }
    if ops is not None:
        result["op_counts"] = ops
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


# ---- the op count -----------------------------------------------------------------------------------------
def traced_decode_step(ours: OurEngine, adapters: list[str | None]) -> OpTrace:
    """Bring BATCH requests of `adapters` to decode, trace one decode step's forward, then abort them."""
    eng = ours.engine
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    ids = []
    for adapter in adapters:
        ours._n += 1
        ids.append(f"t{ours._n}")
        eng.add_request(ids[-1], [7, 19, 23, 42, 5, 11], params, adapter)
    while any(not eng.requests[i].output_ids for i in ids):
        eng.step()
    with traced_forward(eng.runner.model, forbid_sync=False) as trace:
        eng.step()
    for i in ids:
        eng.abort(i)
    while eng.has_work():
        eng.step()
    return trace


def op_counts(ours: OurEngine, by_case: dict[str, list[str | None]]) -> dict[str, object]:
    """Traced decode steps, in this order: base, the P mix while no DoRA adapter has ever been in a slot (today's
    engine), the D mix, the mixed step, then the P mix again with 16 DoRA adapters resident beside it. Each mix
    is run once before its trace, so the traced step's requests all reach decode together."""
    layers = ours.engine.runner.model.config.num_hidden_layers * len(TARGET_MODULES)

    def settled(adapters: list[str | None]) -> OpTrace:
        # The first run loads the mix's adapters one by one, so its requests reach decode at different lengths
        # (other attention shapes); the second starts with them resident: every request at the same length.
        traced_decode_step(ours, adapters)
        return traced_decode_step(ours, adapters)

    steps = {"base": settled([None] * BATCH), **{name: settled(by_case[name]) for name in CASES}}
    beside = traced_decode_step(ours, by_case["ours_p_distinct"])
    total = {name: len(t.compute) for name, t in steps.items()}
    extra = Counter(steps["ours_d_distinct"].compute) - Counter(steps["ours_p_distinct"].compute)
    return {
        "wrapped_linears": layers,
        "ops_per_decode_step": total,
        "lora_ops_per_wrapped_linear": (total["ours_p_distinct"] - total["base"]) / layers,
        "dora_extra_ops_per_wrapped_linear": (total["ours_d_distinct"] - total["ours_p_distinct"]) / layers,
        "dora_extra_ops": {op: n / layers for op, n in extra.items()},
        # 8 P + 8 D use slots 0-7 and 16-23: not one dense window, so the step also takes the grouped form
        "pd_half_extra_ops_per_wrapped_linear": (total["ours_pd_half"] - total["ours_p_distinct"]) / layers,
        "p_step_same_ops_with_dora_resident": beside.shapes == steps["ours_p_distinct"].shapes,
        "syncs": {name: len(t.syncs) for name, t in steps.items()},
    }


# ---- report -----------------------------------------------------------------------------------------------
def print_report(results: dict[str, dict]) -> None:
    print("\noutput tok/s: median [min, max] of the rounds, wall clock | per CPU-second")
    for config, r in results.items():
        for name in CASES:
            wall, cpu = r["tok_s"][name], r["cpu_tok_s"][name]
            print(f"{config:<6}{name:<18}{median(wall):8.1f} [{min(wall):6.1f},{max(wall):6.1f}] | {median(cpu):6.1f}")
    print(f"\n{'config':<7}{'metric':<40}{'value':>7}{'(cpu)':>7}{'target':>8}  result")
    for config, r in results.items():
        t = r["target"]
        print(f"{config:<7}{t['metric']:<40}{t['value']:>7.3f}{t['cpu_time_value']:>7.3f}{'>= ' + str(TARGET):>8}"
              f"  {'PASS' if t['pass'] else 'MISS'}")
        print(f"{config:<7}{'8 P + 8 D / 16 distinct P (reference)':<40}{r['pd_half_over_p']:>7.3f}")
    ops = results.get("fp32", {}).get("op_counts")
    if ops:
        print(f"\nops per decode step (B={BATCH}, {ops['wrapped_linears']} wrapped linears): "
              f"{ops['ops_per_decode_step']}")
        print(f"LoRA ops per wrapped linear {ops['lora_ops_per_wrapped_linear']:.2f}; DoRA's extra ops per wrapped "
              f"linear in a step with a DoRA row {ops['dora_extra_ops_per_wrapped_linear']:.2f} "
              f"({ops['dora_extra_ops']}); 8 P + 8 D: {ops['pd_half_extra_ops_per_wrapped_linear']:.2f}")
        same = ops["p_step_same_ops_with_dora_resident"]
        print(f"a step without a DoRA row runs exactly the ops it ran before any DoRA adapter was loaded: {same} "
              f"({'PASS' if same else 'MISS'})")
    for config, r in results.items():
        print(f"{config}: wall {r['wall_s']} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 prompt tokens, 32 new tokens")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median of these, >= 3)")
    parser.add_argument("--quantize", nargs="+", default=["none", "nf4"], choices=["none", "nf4"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "dora.json")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats: the protocol asks for a median of >= 3 rounds")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Workload(32, 32, 32) if args.quick else Workload(32, 128, 64)
    facts = machine_facts("cpu")
    print_facts(facts)
    start = time.perf_counter()
    results = {}
    for q in args.quantize:  # one engine at a time: the previous one is collected first
        gc.collect()
        results["fp32" if q == "none" else q] = run_config(q, work, args.repeats)
    facts["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print_report(results)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out, {"machine": facts, "settings": settings, "batch": BATCH,
                          "prompt_tokens": [work.prompt_min, work.prompt_max], "new_tokens": work.new_tokens,
                          "wall_s": round(time.perf_counter() - start, 1), "results": results})


if __name__ == "__main__":
    main()
