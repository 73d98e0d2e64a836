"""Engine benchmark on bench-small (BENCHMARK.md): our engine against HF `generate` and PEFT mixed batches.

Closed loop, B = 16 requests started together, prompts of 32-128 seeded random tokens (`--quick`: 32),
64 new tokens each (`--quick`: 32), greedy, EOS ignored, for fp32 and nf4 bases. Throughput = output
tokens / seconds from the first `add_request` (or `generate` call) until every request finished.

  base      ours, base model only                    vs  hf        HF `generate`, static left-padded batch
  s1        ours, 16 distinct S1 adapters (r8 q/k/v/o)   (LoRA tax = s1 / base)
  p_*       ours, P adapters (r16, all 7 projections) vs  peft_*    PEFT `generate(adapter_names=[...])`
            mixes: distinct (16 adapters), skewed (Zipf 1.5 over 16), identical (1 adapter)

Every case of one base dtype runs once per round, rounds repeat (median of >= 3), so the ratios compare
measurements taken side by side on this shared, noisy machine. Our engine is built once per base dtype
with 32 device slots, so the 16 S1 and 16 P adapters all stay resident; a warm-up pass loads them.

Run: .venv/bin/python bench/bench_engine.py [--quick] [--repeats N] [--quantize none nf4]
Writes bench/results/engine.json and bench/results/engine.png.
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
    Stopwatch,
    bar_chart,
    bench_adapters,
    bench_small_dir,
    interleaved,
    machine_facts,
    median,
    paired_ratio,
    print_facts,
    write_json,
)
from peft import PeftModel  # noqa: E402

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
FIRST_TOKEN_ID = 3  # ids 0..2 are the special tokens of the bench tokenizer


@dataclass(frozen=True)
class Workload:
    prompt_min: int
    prompt_max: int
    new_tokens: int
    seed: int = 0

    def prompts(self, vocab: int) -> list[list[int]]:
        rng = random.Random(self.seed)
        lengths = [rng.randint(self.prompt_min, self.prompt_max) for _ in range(BATCH)]
        return [[rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(n)] for n in lengths]


def adapter_mixes(names: list[str], seed: int = 0) -> dict[str, list[str]]:
    """Per-request adapter names for the three mixes (BATCH requests each)."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** ZIPF_S for k in range(len(names))]
    return {
        "distinct": [names[i % len(names)] for i in range(BATCH)],
        "skewed": rng.choices(names, weights=weights, k=BATCH),
        "identical": [names[0]] * BATCH,
    }


# ---- our engine -------------------------------------------------------------------------------------------
class OurEngine:
    """One LLMEngine per base dtype, adapters resident in device slots before any timing."""

    def __init__(self, model_dir: Path, quantize: str, adapter_dirs: dict[str, Path], work: Workload) -> None:
        loaded = load_model(ModelConfig(path=model_dir, quantize=quantize, dtype="float32", device="cpu"))
        self.device = loaded.device
        self.work = work
        per_seq = -(-(work.prompt_max + work.new_tokens) // BLOCK_SIZE)
        slots = max(1, len(adapter_dirs))
        cfg = EngineConfig(
            max_model_len=work.prompt_max + work.new_tokens, block_size=BLOCK_SIZE,
            num_kv_blocks=BATCH * per_seq + BATCH,  # every request's whole context, plus slack
            scheduler=SchedulerConfig(max_num_seqs=BATCH, max_batch_tokens=BATCH * work.prompt_max),
            lora=LoRAConfig(max_loras=slots, max_lora_rank=MAX_RANK, max_cpu_loras=slots),
        )
        self.engine = LLMEngine(loaded, cfg, self._loader(adapter_dirs))
        self.params = SamplingParams(max_tokens=work.new_tokens, temperature=0.0, ignore_eos=True)
        self._n = 0

    def _loader(self, dirs: dict[str, Path]) -> Callable[[str], object]:
        return lambda name: load_adapter_dir(dirs[name], self.engine.lora.module_shapes(), max_rank=MAX_RANK)

    def run(self, prompts: list[list[int]], adapters: list[str | None]) -> tuple[float, list[list[int]]]:
        """Tokens/s from the first add_request until every request finished, and each request's tokens."""
        eng, outs = self.engine, {}
        ids = []
        with Stopwatch(self.device) as sw:
            for prompt, adapter in zip(prompts, adapters, strict=True):
                self._n += 1
                ids.append(f"r{self._n}")
                eng.add_request(ids[-1], prompt, self.params, adapter)
            while eng.has_work():
                for o in eng.step():
                    outs.setdefault(o.request_id, []).extend(o.new_token_ids)
                    if o.error:
                        raise RuntimeError(f"request {o.request_id} failed: {o.error}")
                if eng.last_step_tokens == 0:
                    time.sleep(0.001)  # everyone waits on an adapter load (only during warm-up)
        tokens = [outs[i] for i in ids]
        return sum(map(len, tokens)) / sw.seconds, tokens


# ---- HF / PEFT references ---------------------------------------------------------------------------------
class HFGenerate:
    """HF `generate`, one static left-padded batch; wrapped in PEFT when adapters are given."""

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
    def run(self, prompts: list[list[int]], new_tokens: int,
            adapters: list[str] | None = None) -> tuple[float, list[list[int]]]:
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        extra = {"adapter_names": adapters} if adapters is not None else {}
        with Stopwatch(self.device) as sw:
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0, **extra)
        tokens = out[:, width:].tolist()
        return sum(map(len, tokens)) / sw.seconds, tokens


# ---- bandwidth bound --------------------------------------------------------------------------------------
def base_bytes(model: torch.nn.Module) -> int:
    """Bytes of base weights one decode step reads: every parameter once (a tied head counted once), plus
    bitsandbytes' per-block scales (nf4 `absmax`), which live beside the packed weight, not as parameters."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        absmax = getattr(state, "absmax", None)
        if isinstance(absmax, torch.Tensor):
            total += absmax.numel() * absmax.element_size()
    return total


def adapter_bytes(engine: OurEngine, dirs: dict[str, Path]) -> dict[str, int]:
    """Bytes of A and B each adapter adds to a step that uses it (in the LoRA compute dtype, fp32)."""
    shapes = engine.engine.lora.module_shapes()
    return {name: load_adapter_dir(d, shapes, max_rank=MAX_RANK).size_bytes for name, d in dirs.items()}


def bound(base: int, adapters: dict[str, int], mix: list[str | None]) -> float:
    """Best possible (LoRA / base-only) throughput if a step's time were the bytes it must read."""
    extra = sum(adapters[name] for name in set(mix) if name is not None)
    return base / (base + extra)


# ---- one base dtype: every case, interleaved ---------------------------------------------------------------
TARGETS = {  # metric: (numerator case, denominator case, target, bound key or None)
    "base-only: ours / HF generate": ("ours_base", "hf_base", 1.0, None),
    "LoRA tax: 16 distinct S1 / base-only (ours)": ("ours_s1_distinct", "ours_base", 0.85, "s1_distinct"),
    "16 distinct P: ours / PEFT mixed batch": ("ours_p_distinct", "peft_p_distinct", 2.5, None),
}
MIX_ORDER = ("distinct", "skewed", "identical")


def build_cases(quantize: str, work: Workload, model_dir: Path, s1: dict[str, Path], p: dict[str, Path],
                peft_mixes: tuple[str, ...]) -> tuple[dict[str, Callable[[], tuple[float, list]]], dict]:
    """The timed closures (each returns tok/s and the tokens) and the facts needed for bounds."""
    ours = OurEngine(model_dir, quantize, {**s1, **p}, work)
    hf = HFGenerate(model_dir, quantize)
    peft = HFGenerate(model_dir, quantize, p)
    prompts = work.prompts(len(ours.engine.tokenizer))
    mixes = {"s1_distinct": adapter_mixes(list(s1))["distinct"]}
    mixes |= {f"p_{k}": v for k, v in adapter_mixes(list(p)).items()}
    n = work.new_tokens
    cases: dict[str, Callable[[], tuple[float, list]]] = {
        "hf_base": lambda: hf.run(prompts, n),
        "ours_base": lambda: ours.run(prompts, [None] * BATCH),
        "ours_s1_distinct": lambda: ours.run(prompts, mixes["s1_distinct"]),
    }
    for mix in MIX_ORDER:
        names = mixes[f"p_{mix}"]
        cases[f"ours_p_{mix}"] = lambda names=names: ours.run(prompts, names)
        if mix in peft_mixes:
            cases[f"peft_p_{mix}"] = lambda names=names: peft.run(prompts, n, names)
    facts = {"base_bytes": base_bytes(hf.model), "adapter_bytes": adapter_bytes(ours, {**s1, **p}),
             "mixes": mixes, "prompt_lengths": [len(x) for x in prompts]}
    return cases, facts


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of requests whose greedy tokens are identical (a sanity check that both ran the same model)."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def run_config(quantize: str, work: Workload, repeats: int, peft_mixes: tuple[str, ...]) -> dict[str, object]:
    model_dir = bench_small_dir()
    s1 = _named("s1", bench_adapters(model_dir, "S1", NUM_ADAPTERS))
    p = _named("p", bench_adapters(model_dir, "P", NUM_ADAPTERS))
    start = time.perf_counter()
    cases, facts = build_cases(quantize, work, model_dir, s1, p, peft_mixes)
    print(f"[{quantize}] warm-up (loads every adapter into its device slot)", flush=True)
    tokens = {name: fn()[1] for name, fn in cases.items()}
    samples = interleaved({name: (lambda fn=fn: fn()[0]) for name, fn in cases.items()}, repeats,
                          log=lambda line: print(f"[{quantize}]{line}", flush=True))
    result = {"samples_tok_s": samples, "median_tok_s": {k: median(v) for k, v in samples.items()},
              "token_agreement": _agreements(tokens), "wall_s": round(time.perf_counter() - start, 1)}
    result |= _ratios(samples, facts)
    result["facts"] = {k: v for k, v in facts.items() if k != "adapter_bytes"} | {
        "adapter_bytes_each": sorted(set(facts["adapter_bytes"].values()))}
    del cases
    gc.collect()
    return result


def _named(prefix: str, dirs: list[Path]) -> dict[str, Path]:
    return {f"{prefix}-{i:02d}": d for i, d in enumerate(dirs)}


def _agreements(tokens: dict[str, list[list[int]]]) -> dict[str, float]:
    out = {"ours_base vs hf_base": agreement(tokens["ours_base"], tokens["hf_base"])}
    for mix in MIX_ORDER:
        if f"peft_p_{mix}" in tokens:
            out[f"ours_p_{mix} vs peft_p_{mix}"] = agreement(tokens[f"ours_p_{mix}"], tokens[f"peft_p_{mix}"])
    return out


def _ratios(samples: dict[str, list[float]], facts: dict) -> dict[str, object]:
    """Targets (paired per-round ratio medians, PASS/MISS) and every LoRA case's tax with its bound."""
    targets = {}
    for metric, (num, den, target, bound_key) in TARGETS.items():
        value = paired_ratio(samples[num], samples[den])
        targets[metric] = {"value": value, "target": target, "pass": value >= target,
                           "ratio_of_medians": median(samples[num]) / median(samples[den])}
        if bound_key:
            targets[metric]["bandwidth_bound"] = bound(facts["base_bytes"], facts["adapter_bytes"],
                                                       facts["mixes"][bound_key])
    taxes = {}
    for case in samples:
        if case.startswith("ours_") and case != "ours_base":
            key = case.removeprefix("ours_")
            taxes[case] = {"over_ours_base": paired_ratio(samples[case], samples["ours_base"]),
                           "bandwidth_bound": bound(facts["base_bytes"], facts["adapter_bytes"], facts["mixes"][key])}
    return {"targets": targets, "lora_tax": taxes}


# ---- report -----------------------------------------------------------------------------------------------
def print_report(results: dict[str, dict]) -> None:
    configs = list(results)
    cases = list(dict.fromkeys(c for r in results.values() for c in r["median_tok_s"]))
    print("\nthroughput, output tok/s: median [min, max] of the interleaved rounds")
    print(f"{'case':<20}" + "".join(f"{c:>26}" for c in configs))
    for case in cases:
        cells = []
        for c in configs:
            s = results[c]["samples_tok_s"].get(case)
            cells.append(f"{median(s):8.1f} [{min(s):6.1f},{max(s):6.1f}]" if s else "-")
        print(f"{case:<20}" + "".join(f"{x:>26}" for x in cells))
    print(f"\n{'config':<7}{'metric':<46}{'value':>7}{'target':>8}{'bound':>7}  result")
    for c in configs:
        for metric, t in results[c]["targets"].items():
            b = f"{t['bandwidth_bound']:.3f}" if "bandwidth_bound" in t else "-"
            verdict = "PASS" if t["pass"] else "MISS"
            print(f"{c:<7}{metric:<46}{t['value']:>7.3f}{'>= ' + str(t['target']):>8}{b:>7}  {verdict}")
    print(f"\n{'config':<7}{'adapter mix (P unless s1)':<26}{'ours/base':>10}{'bound':>7}{'ours/PEFT':>10}")
    for c in configs:
        r = results[c]
        for case, tax in r["lora_tax"].items():
            peft = case.replace("ours_", "peft_")
            vs = (f"{paired_ratio(r['samples_tok_s'][case], r['samples_tok_s'][peft]):10.2f}"
                  if peft in r["samples_tok_s"] else f"{'-':>10}")
            print(f"{c:<7}{case.removeprefix('ours_'):<26}{tax['over_ours_base']:>10.3f}"
                  f"{tax['bandwidth_bound']:>7.3f}{vs}")
    for c in configs:
        print(f"{c}: greedy token agreement {results[c]['token_agreement']}; wall {results[c]['wall_s']} s")


def plot(results: dict[str, dict], title: str) -> None:
    cases = list(dict.fromkeys(c for r in results.values() for c in r["median_tok_s"]))
    bar_chart(RESULTS_DIR / "engine.png", f"bench-small, B={BATCH}: output tok/s ({title})",
              {case: {c: r["median_tok_s"].get(case, 0.0) for c, r in results.items()} for case in cases},
              "tok/s (median)")
    ratios = {metric.split(":")[0]: {c: r["targets"][metric]["value"] for c, r in results.items()}
              for metric in TARGETS}
    lines = {f"target {t[2]}": t[2] for t in TARGETS.values()}
    bar_chart(RESULTS_DIR / "engine_ratios.png", f"bench-small, B={BATCH}: target ratios ({title})",
              ratios, "ratio (median of paired rounds)", hlines=lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 prompt tokens, 32 new tokens")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median of these)")
    parser.add_argument("--quantize", nargs="+", default=["none", "nf4"], choices=["none", "nf4"])
    parser.add_argument("--peft-mixes", nargs="*", default=list(MIX_ORDER), choices=MIX_ORDER,
                        help="which adapter mixes also run through PEFT (distinct is needed for a target)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "engine.json")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats: the protocol asks for a median of >= 3")
    if "distinct" not in args.peft_mixes:
        parser.error("--peft-mixes must include 'distinct' (the P target compares against it)")
    work = Workload(32, 32, 32) if args.quick else Workload(32, 128, 64)
    facts = machine_facts("cpu")
    print_facts(facts)
    start = time.perf_counter()
    results = {("fp32" if q == "none" else q): run_config(q, work, args.repeats, tuple(args.peft_mixes))
               for q in args.quantize}
    facts["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print_report(results)
    title = f"{'quick ' if args.quick else ''}{work.prompt_min}-{work.prompt_max} in / {work.new_tokens} out"
    write_json(args.out, {"machine": facts, "workload": vars(args) | {"out": str(args.out)} | {
        "batch": BATCH, "prompt_tokens": [work.prompt_min, work.prompt_max], "new_tokens": work.new_tokens},
        "wall_s": round(time.perf_counter() - start, 1), "results": results})
    plot(results, title)


if __name__ == "__main__":
    main()
