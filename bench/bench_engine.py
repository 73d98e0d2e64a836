"""Engine benchmark on bench-small (BENCHMARK.md): our engine against HF `generate` and PEFT mixed batches.

Closed loop: B = 16 requests start together, prompts of 32-128 tokens of real text at seeded offsets
(`--quick`: 32), 64 new tokens each (`--quick`: 32), greedy, EOS ignored; for an fp32 and an nf4 base.
Throughput = output tokens / seconds from the first `add_request` (or the `generate` call) until every
request has finished.

  hf_base           HF `generate`, one static left-padded batch, no adapter
  ours_base         our engine, base model only                      (target: ours_base / hf_base >= 1.1)
  ours_s1_distinct  our engine, 16 distinct S1 adapters (r8 q/k/v/o) (LoRA tax: / ours_base >= 0.90)
  ours_p_<mix>      our engine, P adapters (r16, all 7 projections)
  peft_p_<mix>      PEFT `generate(..., adapter_names=[...])`, same mix (target: distinct ours / PEFT >= 2.5)
  mixes: distinct (16 adapters), skewed (Zipf 1.5 over 16), identical (1 adapter)

Every case of one base dtype runs once per round and the rounds repeat (median of >= 3), so each ratio
compares runs taken close together on this shared, noisy machine; ratios are medians of per-round ratios.
The PEFT skewed / identical mixes are reference numbers (no target) and run in the first round only, to
keep a full run near 15 minutes. Beside each wall-clock rate the table shows the rate per second of
process CPU time, which excludes time the machine gave to other tenants. Our engine is built once per
base dtype with 32 device slots, so all 16 S1 and 16 P adapters stay resident; a short warm-up pass loads
them before any timing.

Threads: torch runs 1 intra-op thread by default (`--threads 0` keeps torch's own default). On the shared
2-core development machine, 2 threads ran 3-10x *slower* and far noisier than 1 (bench-small, B=16, 64
new tokens: ours 3.6-8.2 tok/s with 2 threads vs 43.5-44.7 with 1; HF generate 6.5-15.0 vs 39.3-46.6):
whenever another tenant holds a core, each OpenMP barrier waits for the descheduled thread. Every case
runs with the same setting, so the ratios stay like for like.

Run: .venv/bin/python bench/bench_engine.py [--quick] [--repeats N] [--quantize none nf4] [--threads N]
Writes bench/results/engine.json, engine.png (tok/s per case) and engine_ratios.png (targets), engine_quick.*
with --quick; the PNGs when matplotlib (the `bench` extra) is installed.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import (  # noqa: E402
    RESULTS_DIR,
    Measure,
    Stopwatch,
    bar_chart,
    bench_adapters,
    bench_small_dir,
    interleaved,
    machine_facts,
    median,
    paired_ratio,
    print_facts,
    text_prompts,
    write_json,
)
from peft import PeftModel  # noqa: E402
from transformers import PreTrainedTokenizerBase  # noqa: E402

from loraplex.adapters.weights import load_adapter_dir  # noqa: E402
from loraplex.server.config import LoRAConfig, ModelConfig  # noqa: E402
from loraplex.server.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from loraplex.server.engine.sampling_params import SamplingParams  # noqa: E402
from loraplex.server.engine.scheduler import SchedulerConfig  # noqa: E402
from loraplex.server.model_loader import load_model  # noqa: E402

BATCH = 16
NUM_ADAPTERS = 16
MAX_RANK = 16
BLOCK_SIZE = 16
ZIPF_S = 1.5
WARMUP_TOKENS = 2
MIX_ORDER = ("distinct", "skewed", "identical")
TARGETS = {  # metric: (numerator case, denominator case, target, mix whose bandwidth bound applies)
    "base-only: ours / HF generate": ("ours_base", "hf_base", 1.1, None),
    "LoRA tax: 16 distinct S1 / base-only (ours)": ("ours_s1_distinct", "ours_base", 0.90, "s1_distinct"),
    "16 distinct P: ours / PEFT mixed batch": ("ours_p_distinct", "peft_p_distinct", 2.5, None),
}

Tokens = list[list[int]]


@dataclass(frozen=True)
class Workload:
    prompt_min: int
    prompt_max: int
    new_tokens: int
    seed: int = 0

    def prompts(self, tokenizer: PreTrainedTokenizerBase) -> Tokens:
        """Seeded lengths; real text (cut from a corpus) so the real model's detokenizer sees words."""
        rng = random.Random(self.seed)
        lengths = [rng.randint(self.prompt_min, self.prompt_max) for _ in range(BATCH)]
        return text_prompts(tokenizer, lengths, self.seed)


def adapter_mixes(names: list[str], seed: int = 0) -> dict[str, list[str]]:
    """Per-request adapter names (BATCH requests) for each mix; request order is shuffled so that slot
    order never lines up with request order (the engine must not get contiguous slots for free)."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** ZIPF_S for k in range(len(names))]
    distinct = [names[i % len(names)] for i in range(BATCH)]
    rng.shuffle(distinct)
    return {"distinct": distinct, "skewed": rng.choices(names, weights=weights, k=BATCH),
            "identical": [names[0]] * BATCH}


# ---- our engine -------------------------------------------------------------------------------------------
class OurEngine:
    """One LLMEngine per base dtype, every adapter resident in a device slot before any timing."""

    def __init__(self, model_dir: Path, quantize: str, adapter_dirs: dict[str, Path], work: Workload) -> None:
        loaded = load_model(ModelConfig(path=model_dir, quantize=quantize, dtype="float32", device="cpu"))
        self.device = loaded.device
        per_seq = -(-(work.prompt_max + work.new_tokens) // BLOCK_SIZE)
        slots = max(1, len(adapter_dirs))
        cfg = EngineConfig(
            max_model_len=work.prompt_max + work.new_tokens,
            block_size=BLOCK_SIZE,
            num_kv_blocks=BATCH * per_seq + BATCH,  # every request's whole context, plus slack
            scheduler=SchedulerConfig(max_num_seqs=BATCH, max_batch_tokens=BATCH * work.prompt_max),
            lora=LoRAConfig(max_loras=slots, max_lora_rank=MAX_RANK, max_cpu_loras=slots),
        )
        self.engine = LLMEngine(loaded, cfg, self._loader(adapter_dirs))
        self._n = 0

    def _loader(self, dirs: dict[str, Path]) -> Callable[[str], object]:
        return lambda name: load_adapter_dir(dirs[name], self.engine.lora.module_shapes(), max_rank=MAX_RANK)

    def run(self, prompts: Tokens, adapters: list[str | None], new_tokens: int) -> tuple[Measure, Tokens]:
        """Timed from the first add_request until every request finished; returns each request's tokens."""
        eng, outs, ids = self.engine, {}, []
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        with Stopwatch(self.device) as sw:
            for prompt, adapter in zip(prompts, adapters, strict=True):
                self._n += 1
                ids.append(f"r{self._n}")
                eng.add_request(ids[-1], prompt, params, adapter)
            while eng.has_work():
                step = eng.step()
                for o in step.outputs:
                    if o.error:
                        raise RuntimeError(f"request {o.request_id} failed: {o.error}")
                    outs.setdefault(o.request_id, []).extend(o.new_token_ids)
                if not step.computed:
                    time.sleep(0.001)  # everyone waits on an adapter load (warm-up only)
        tokens = [outs[i] for i in ids]
        return sw.measure(sum(map(len, tokens))), tokens


# ---- HF / PEFT references ---------------------------------------------------------------------------------
class HFGenerate:
    """HF `generate` on one static left-padded batch; wrapped in PEFT when adapters are given."""

    def __init__(self, model_dir: Path, quantize: str, adapter_dirs: dict[str, Path] | None = None) -> None:
        loaded = load_model(ModelConfig(path=model_dir, quantize=quantize, dtype="float32", device="cpu"))
        self.device = loaded.device
        self.model = loaded.model
        if adapter_dirs:
            names = list(adapter_dirs)
            self.model = PeftModel.from_pretrained(loaded.model, str(adapter_dirs[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                self.model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
            self.model.eval()

    @torch.inference_mode()
    def run(self, prompts: Tokens, new_tokens: int, adapters: list[str] | None = None) -> tuple[Measure, Tokens]:
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        extra = {"adapter_names": adapters} if adapters is not None else {}
        with Stopwatch(self.device) as sw:
            # min_new_tokens = max_new_tokens: exactly `new_tokens` each, EOS never ends a row early.
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
        tokens = out[:, width:].tolist()
        return sw.measure(sum(map(len, tokens))), tokens


# ---- bandwidth bound --------------------------------------------------------------------------------------
def base_bytes(model: torch.nn.Module) -> int:
    """Bytes of base weights one decode step reads: every parameter once (a tied head counted once), plus
    bitsandbytes' per-block scales (nf4 `absmax`), which live beside the packed weight, not as parameters."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        absmax = getattr(getattr(p, "quant_state", None), "absmax", None)
        if isinstance(absmax, torch.Tensor):
            total += absmax.numel() * absmax.element_size()
    return total


def bound(base: int, adapter_bytes: dict[str, int], mix: list[str | None]) -> float:
    """Best possible (with adapters / base-only) throughput if a step's time were the bytes it must read:
    the base weights plus A and B of each distinct adapter in the batch."""
    return base / (base + sum(adapter_bytes[name] for name in set(mix) if name is not None))


# ---- one base dtype: every case, interleaved ---------------------------------------------------------------
@dataclass
class Config:
    """Everything one base dtype's cases run on."""

    ours: OurEngine
    hf: HFGenerate
    peft: HFGenerate
    prompts: Tokens
    mixes: dict[str, list[str | None]]
    adapter_bytes: dict[str, int]


def setup(quantize: str, work: Workload) -> Config:
    model_dir = bench_small_dir()
    s1 = _named("s1", bench_adapters(model_dir, "S1", NUM_ADAPTERS))
    p = _named("p", bench_adapters(model_dir, "P", NUM_ADAPTERS))
    ours = OurEngine(model_dir, quantize, s1 | p, work)
    shapes = ours.engine.lora.module_shapes()
    mixes: dict[str, list[str | None]] = {"base": [None] * BATCH, "s1_distinct": adapter_mixes(list(s1))["distinct"]}
    mixes |= {f"p_{k}": v for k, v in adapter_mixes(list(p)).items()}
    return Config(ours, HFGenerate(model_dir, quantize), HFGenerate(model_dir, quantize, p),
                  work.prompts(ours.engine.tokenizer), mixes,
                  {n: load_adapter_dir(d, shapes, max_rank=MAX_RANK).size_bytes for n, d in (s1 | p).items()})


def _named(prefix: str, dirs: list[Path]) -> dict[str, Path]:
    return {f"{prefix}-{i:02d}": d for i, d in enumerate(dirs)}


def make_cases(cfg: Config, new_tokens: int, peft_mixes: tuple[str, ...],
               seen: dict[str, Tokens]) -> dict[str, Callable[[int], Measure]]:
    """Closures(new_tokens) -> Measure; each leaves its last tokens in `seen` (for the agreement check)."""

    def keep(name: str, run: Callable[[int], tuple[Measure, Tokens]]) -> Callable[[int], Measure]:
        def case(n: int = new_tokens) -> Measure:
            measure, seen[name] = run(n)
            return measure
        return case

    cases = {"hf_base": keep("hf_base", lambda n: cfg.hf.run(cfg.prompts, n))}
    for mix in ("base", "s1_distinct", *(f"p_{m}" for m in MIX_ORDER)):
        names = cfg.mixes[mix]
        cases[f"ours_{mix}"] = keep(f"ours_{mix}", lambda n, a=names: cfg.ours.run(cfg.prompts, a, n))
        if mix.removeprefix("p_") in peft_mixes and mix.startswith("p_"):
            cases[f"peft_{mix}"] = keep(f"peft_{mix}", lambda n, a=names: cfg.peft.run(cfg.prompts, n, a))
    return cases


def run_config(quantize: str, work: Workload, repeats: int, peft_mixes: tuple[str, ...]) -> dict[str, object]:
    label = "fp32" if quantize == "none" else quantize
    start = time.perf_counter()
    cfg = setup(quantize, work)
    seen: dict[str, Tokens] = {}
    cases = make_cases(cfg, work.new_tokens, peft_mixes, seen)
    print(f"[{label}] warm-up: {WARMUP_TOKENS} new tokens per case (loads every adapter into its slot)", flush=True)
    for case in cases.values():
        case(WARMUP_TOKENS)
    reference = frozenset(f"peft_p_{m}" for m in MIX_ORDER if m != "distinct")
    samples = interleaved({name: (lambda c=c: c()) for name, c in cases.items()}, repeats,
                          log=lambda line: print(f"[{label}]{line}", flush=True), once=reference)
    result = summarize(samples, cfg, _agreements(seen))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    del cfg, cases
    gc.collect()
    return result


def _agreements(seen: dict[str, Tokens]) -> dict[str, float]:
    """Fraction of requests whose greedy tokens are identical: a check that both sides ran the same model."""

    def agree(a: str, b: str) -> float:
        return sum(x == y for x, y in zip(seen[a], seen[b], strict=True)) / len(seen[a])

    pairs = [("ours_base", "hf_base")] + [(f"ours_p_{m}", f"peft_p_{m}") for m in MIX_ORDER]
    return {f"{a} vs {b}": agree(a, b) for a, b in pairs if a in seen and b in seen}


def summarize(samples: dict[str, list[Measure]], cfg: Config, agreement: dict[str, float]) -> dict[str, object]:
    """Rates, target ratios with PASS/MISS, and every LoRA case's tax beside its bandwidth bound."""
    wall = {k: [m.rate for m in v] for k, v in samples.items()}
    cpu = {k: [m.cpu_rate for m in v] for k, v in samples.items()}
    base = base_bytes(cfg.hf.model)
    targets = {}
    for metric, (num, den, target, mix) in TARGETS.items():
        value = paired_ratio(wall[num], wall[den])
        targets[metric] = {"value": value, "target": target, "pass": value >= target,
                           "cpu_time_value": paired_ratio(cpu[num], cpu[den])}
        if mix:
            targets[metric]["bandwidth_bound"] = bound(base, cfg.adapter_bytes, cfg.mixes[mix])
        elif num.startswith("ours_p_"):  # the limit: what the ratio would be if our LoRA cost nothing
            targets[metric]["free_lora_ceiling"] = paired_ratio(wall["ours_base"], wall[den])
    taxes = {case: {"over_ours_base": paired_ratio(wall[case], wall["ours_base"]),
                    "cpu_time_over_ours_base": paired_ratio(cpu[case], cpu["ours_base"]),
                    "bandwidth_bound": bound(base, cfg.adapter_bytes, cfg.mixes[case.removeprefix("ours_")])}
             for case in wall if case.startswith("ours_") and case != "ours_base"}
    vs_peft = {case: paired_ratio(wall[case][: len(wall[peft])], wall[peft])  # reference mixes: round 1 only
               for case in wall if case.startswith("ours_") and (peft := case.replace("ours_", "peft_")) in wall}
    return {"tok_s": wall, "cpu_tok_s": cpu, "median_tok_s": {k: median(v) for k, v in wall.items()},
            "targets": targets, "lora_tax": taxes, "ours_over_peft": vs_peft, "token_agreement": agreement,
            "base_bytes": base, "adapter_bytes": sorted(set(cfg.adapter_bytes.values())),
            "mixes": cfg.mixes, "prompt_lengths": [len(p) for p in cfg.prompts]}


# ---- report -----------------------------------------------------------------------------------------------
def print_report(results: dict[str, dict]) -> None:
    configs = list(results)
    cases = list(dict.fromkeys(c for r in results.values() for c in r["tok_s"]))
    print("\noutput tok/s: median [min, max] of the rounds, wall clock | per CPU-second")
    print(f"{'case':<20}" + "".join(f"{c:>34}" for c in configs))
    for case in cases:
        cells = [_cell(results[c]["tok_s"].get(case), results[c]["cpu_tok_s"].get(case)) for c in configs]
        print(f"{case:<20}" + "".join(f"{x:>34}" for x in cells))
    print(f"\n{'config':<7}{'metric':<46}{'value':>7}{'(cpu)':>7}{'target':>8}{'limit':>7}  result")
    for c in configs:
        for metric, t in results[c]["targets"].items():
            limit = t.get("bandwidth_bound", t.get("free_lora_ceiling"))
            b = "-" if limit is None else f"{limit:.3f}"
            print(f"{c:<7}{metric:<46}{t['value']:>7.3f}{t['cpu_time_value']:>7.3f}{'>= ' + str(t['target']):>8}"
                  f"{b:>7}  {'PASS' if t['pass'] else 'MISS'}")
    print(f"\n{'config':<7}{'ours, adapter mix':<18}{'/ ours_base':>12}{'(cpu)':>7}{'bound':>7}{'/ PEFT':>8}")
    for c in configs:
        r = results[c]
        for case, tax in r["lora_tax"].items():
            vs = f"{r['ours_over_peft'][case]:8.2f}" if case in r["ours_over_peft"] else f"{'-':>8}"
            print(f"{c:<7}{case.removeprefix('ours_'):<18}{tax['over_ours_base']:>12.3f}"
                  f"{tax['cpu_time_over_ours_base']:>7.3f}{tax['bandwidth_bound']:>7.3f}{vs}")
    print("limit: LoRA tax -> bandwidth bound base/(base + adapters' A/B bytes); P vs PEFT -> the ratio if our")
    print("LoRA cost nothing (ours_base / PEFT). (cpu): the same ratio from process-CPU-time rates.")
    for c in configs:
        print(f"{c}: greedy token agreement {results[c]['token_agreement']}; wall {results[c]['wall_s']} s")


def _cell(wall: list[float] | None, cpu: list[float] | None) -> str:
    if not wall or not cpu:
        return "-"
    return f"{median(wall):6.1f} [{min(wall):5.1f},{max(wall):5.1f}] | {median(cpu):6.1f}"


def plot(out: Path, results: dict[str, dict], title: str) -> None:
    """`out`.png: tok/s per case; `out`_ratios.png: the target ratios (beside the JSON `out`)."""
    cases = list(dict.fromkeys(c for r in results.values() for c in r["median_tok_s"]))
    bar_chart(out.with_suffix(".png"), f"bench-small, B={BATCH}: output tok/s, median ({title})",
              {case: {c: r["median_tok_s"].get(case, 0.0) for c, r in results.items()} for case in cases},
              "tok/s (wall clock)")
    ratios = {metric.split(":")[0]: {c: r["targets"][metric]["value"] for c, r in results.items()}
              for metric in TARGETS}
    bar_chart(out.with_name(f"{out.stem}_ratios.png"), f"bench-small, B={BATCH}: target ratios ({title})",
              ratios, "ratio (median of per-round ratios)",
              marks={metric.split(":")[0]: t[2] for metric, t in TARGETS.items()})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 prompt tokens, 32 new tokens")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median of these, >= 3)")
    parser.add_argument("--quantize", nargs="+", default=["none", "nf4"], choices=["none", "nf4"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--peft-mixes", nargs="+", default=list(MIX_ORDER), choices=MIX_ORDER,
                        help="adapter mixes that also run through PEFT (distinct is needed for a target)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path, PNGs beside it (default bench/results/engine[_quick].json)")
    args = parser.parse_args()
    if args.out is None:  # a quick run never overwrites the committed full run
        args.out = RESULTS_DIR / ("engine_quick.json" if args.quick else "engine.json")
    if args.repeats < 3:
        parser.error("--repeats: the protocol asks for a median of >= 3 rounds")
    if "distinct" not in args.peft_mixes:
        parser.error("--peft-mixes must include 'distinct' (the P target compares against it)")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Workload(32, 32, 32) if args.quick else Workload(32, 128, 64)
    facts = machine_facts("cpu")
    print_facts(facts)
    start = time.perf_counter()
    results = {("fp32" if q == "none" else q): run_config(q, work, args.repeats, tuple(args.peft_mixes))
               for q in args.quantize}
    facts["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print_report(results)
    title = f"{'quick, ' if args.quick else ''}{work.prompt_min}-{work.prompt_max} in / {work.new_tokens} out"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out, {"machine": facts, "settings": settings, "batch": BATCH,
                          "prompt_tokens": [work.prompt_min, work.prompt_max], "new_tokens": work.new_tokens,
                          "wall_s": round(time.perf_counter() - start, 1), "results": results})
    plot(args.out, results, title)


if __name__ == "__main__":
    main()
