"""Sampler benchmark (BENCHMARK.md: "sampler: 64 seeded sampled rows ÷ 64 greedy rows, time per step <= 2").

`Sampler.sample` on logits [64, 49152] (bench-small's vocabulary) in fp32 on the CPU, interleaved rounds:

  greedy     64 rows, temperature 0
  seeded     64 rows, temperature 0.8, top_p 0.95, top_k 50, each its own seed (one batched inverse-CDF draw)
  penalised  the seeded rows, half with repetition/frequency/presence penalties over 2,200 tokens of prompt and
             output each, read from per-request TokenCounts (the engine's incremental counts)
  recount    the same penalties counted from the token lists every step (the plain twin; what the engine did
             before TokenCounts), shown for reference

Also checks, and prints: a seeded row gives the same tokens alone and in a batch of 32 (over 20 steps).

Run: .venv/bin/python bench/bench_sampler.py [--repeats 7] [--steps 20]
Writes bench/results/sampler.json.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from common import RESULTS_DIR, Measure, interleaved, machine_facts, median, print_facts, write_json  # noqa: E402

from loraplex.server.engine.sampler import Sampler, SampleRow, TokenCounts  # noqa: E402
from loraplex.server.engine.sampling_params import SamplingParams  # noqa: E402

VOCAB, ROWS, HISTORY = 49152, 64, 2200
TARGET = 2.0


def _rows(kind: str, rng: random.Random, counts: TokenCounts | None) -> list[SampleRow]:
    rows = []
    for i in range(ROWS):
        if kind == "greedy":
            rows.append(SampleRow(SamplingParams(temperature=0.0), None, (0,)))
            continue
        penalised = kind in ("penalised", "recount") and i % 2 == 0
        params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=i,
                                **({"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.3}
                                   if penalised else {}))
        prompt = [rng.randrange(VOCAB) for _ in range(HISTORY // 2)] if penalised else []
        output = [rng.randrange(VOCAB) for _ in range(HISTORY // 2)] if penalised else []
        row = SampleRow(params, i, (0,), prompt, output)
        if penalised and kind == "penalised":
            row.counts_row = counts.open(prompt, output)
        rows.append(row)
    return rows


def case(kind: str, steps: int) -> callable:
    counts = TokenCounts(VOCAB, "cpu")
    sampler = Sampler(counts)
    rows = _rows(kind, random.Random(1), counts)
    logits = [torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(s)) * 3 for s in range(steps)]

    def run() -> Measure:
        t0, c0 = time.perf_counter(), time.process_time()
        for step_logits in logits:
            sampler.sample(step_logits, rows).tokens.tolist()  # the engine's one host sync per step
        return Measure(steps, time.perf_counter() - t0, time.process_time() - c0)
    return run


def batch_invariance(steps: int) -> bool:
    """A seeded row's tokens alone == in a batch of 32 (other rows: seeded, unseeded, greedy)."""
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=77)
    sampler = Sampler()
    alone, batched = [], []
    for s in range(steps):
        logits = torch.randn(32, VOCAB, generator=torch.Generator().manual_seed(100 + s))
        out: list[int] = []
        mine = SampleRow(params, 77, (0,), output_ids=list(range(s)))
        alone.append(int(sampler.sample(logits[5:6], [mine]).tokens[0]))
        others = [SampleRow(SamplingParams(temperature=(0.0, 0.7, 1.2)[j % 3]), j if j % 2 else None, (0,), [], out)
                  for j in range(32)]
        others[5] = mine
        batched.append(int(sampler.sample(logits, others).tokens[5]))
    return alone == batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "sampler.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    facts = machine_facts("cpu")
    print_facts(facts)
    cases = {k: case(k, args.steps) for k in ("greedy", "seeded", "penalised", "recount")}
    samples = interleaved(cases, args.repeats)
    per_step = {k: median([m.wall_s / m.work for m in v]) * 1e3 for k, v in samples.items()}
    cpu_per_step = {k: median([m.cpu_s / m.work for m in v]) * 1e3 for k, v in samples.items()}
    ratio = median([s.wall_s / g.wall_s for s, g in zip(samples["seeded"], samples["greedy"], strict=True)])
    penal = median([s.wall_s / g.wall_s for s, g in zip(samples["penalised"], samples["greedy"], strict=True)])
    invariant = batch_invariance(args.steps)
    print(f"\n{'case':10s} {'ms/step':>8s} {'cpu ms/step':>12s}   (64 rows x {VOCAB}, median of {args.repeats})")
    for k in cases:
        print(f"{k:10s} {per_step[k]:8.2f} {cpu_per_step[k]:12.2f}")
    verdict = "PASS" if ratio <= TARGET else "MISS"
    print(f"seeded / greedy: {ratio:.2f} (target <= {TARGET:g}: {verdict}); penalised / greedy: {penal:.2f}")
    print(f"same seed, same tokens alone and in a batch of 32: {invariant}")
    facts["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    settings = {**vars(args), "out": str(args.out)}
    write_json(args.out, {"machine": facts, "settings": settings, "rows": ROWS, "vocab": VOCAB,
                          "ms_per_step": per_step, "cpu_ms_per_step": cpu_per_step,
                          "seeded_over_greedy": {"value": round(ratio, 3), "target": TARGET, "verdict": verdict},
                          "penalised_over_greedy": round(penal, 3), "batch_invariant": invariant})


if __name__ == "__main__":
    main()
