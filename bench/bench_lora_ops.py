"""Microbenchmark of the batched LoRA ops against the base layer's plain matmul (the roofline).

In the spirit of vLLM's benchmarks/kernels/benchmark_lora.py: tokens x distinct adapters x rank on the
bench-small hidden sizes (hidden 576: q/o 576x576, gate/up 576->1536). For each point it times, in
microseconds (median of interleaved repeats):
  base_mm     x @ W.T of the base layer                          (what one LoRA layer rides beside)
  sgmv        lora_shrink + lora_expand, mode="sgmv", grouped token order (prefill-like)
  bgmv        lora_shrink + lora_expand, mode="bgmv", interleaved token order (decode-like)
  sgmv_frag   mode="sgmv" on the interleaved order (what auto avoids by gathering)
  apply_sgmv  lora_apply, mode="sgmv", grouped order (the backend's fused path)
  apply_bgmv  lora_apply, mode="bgmv", interleaved order
Stacks are allocated at r_max = 64 with 16 slots, as a server with --max-lora-rank 64 --max-loras 16
would; every adapter has rank `rank`, so small ranks show whether slicing to the own rank pays.

Run: .venv/bin/python bench/bench_lora_ops.py [--device cpu|cuda] [--dtype float32|bfloat16]
Writes bench/results/lora_ops.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from loraplex.adapters.ops import get_backend, lora_apply, lora_expand, lora_shrink
from loraplex.adapters.ops.meta import LoRAMeta

SHAPES = {"q/o 576x576": (576, 576), "gate/up 576->1536": (576, 1536)}
TOKENS = (1, 16, 64, 256)
ADAPTERS = (1, 4, 16)
RANKS = (8, 16, 64)
SLOTS, R_MAX = 16, 64
REPEATS = 9
TARGET_S = 0.001  # each repeat runs the op enough times to take about this long
VARIANTS = ("base_mm", "sgmv", "bgmv", "sgmv_frag", "apply_sgmv", "apply_bgmv")
RESULTS = Path(__file__).parent / "results" / "lora_ops.json"


def machine_facts(device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    facts: dict[str, object] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": get_backend(device).name,
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def token_layouts(n_tokens: int, n_adapters: int) -> tuple[list[int], list[int]]:
    """Tokens spread evenly over the adapters (slots 0..n-1): grouped runs, and round-robin interleaved."""
    grouped = [t * n_adapters // n_tokens for t in range(n_tokens)]
    interleaved = [t % n_adapters for t in range(n_tokens)]
    return grouped, interleaved


def make_ops(
    n_in: int, n_out: int, n_tokens: int, n_adapters: int, rank: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Callable[[], object]]:
    """One closure per variant over shared tensors; metadata is built once, as the runner does per step."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n_out, n_in, generator=gen).to(device, dtype)  # base W: [out, in]
    a = (torch.randn(SLOTS, R_MAX, n_in, generator=gen) * 0.02).to(device, dtype)  # [S, R_max, in]
    b = (torch.randn(SLOTS, n_out, R_MAX, generator=gen) * 0.02).to(device, dtype)  # [S, out, R_max]
    ranks = [rank] * SLOTS
    x = torch.randn(n_tokens, n_in, generator=gen).to(device, dtype)
    y = torch.zeros(n_tokens, n_out, device=device, dtype=dtype)
    grouped, interleaved = (LoRAMeta.from_slots(s, device) for s in token_layouts(n_tokens, n_adapters))

    def two_ops(meta: LoRAMeta, mode: str) -> Callable[[], None]:
        return lambda: lora_expand(y, lora_shrink(x, a, ranks, meta, mode=mode), b, ranks, meta, mode=mode)

    def fused(meta: LoRAMeta, mode: str) -> Callable[[], None]:
        return lambda: lora_apply(y, x, a, b, ranks, meta, mode=mode)

    return {
        "base_mm": lambda: torch.mm(x, weight.t()),
        "sgmv": two_ops(grouped, "sgmv"),
        "bgmv": two_ops(interleaved, "bgmv"),
        "sgmv_frag": two_ops(interleaved, "sgmv"),
        "apply_sgmv": fused(grouped, "sgmv"),
        "apply_bgmv": fused(interleaved, "bgmv"),
    }


def run_batch(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Seconds per call over n back-to-back calls (synchronising around them on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n


def time_variants(
    fns: dict[str, Callable[[], object]], device: torch.device
) -> tuple[dict[str, float], dict[str, float]]:
    """Median and min microseconds per variant; repeats interleave the variants so drift hits them alike.

    The min is kept beside the median because a shared machine's other load only ever adds time.
    """
    counts = {}
    for name, fn in fns.items():
        once = run_batch(fn, 3, device)  # also warms up
        counts[name] = max(1, min(2000, int(TARGET_S / max(once, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            samples[name].append(run_batch(fn, counts[name], device))
    median = {name: statistics.median(s) * 1e6 for name, s in samples.items()}
    return median, {name: min(s) * 1e6 for name, s in samples.items()}


def bench_point(shape: str, n_tokens: int, n_adapters: int, rank: int, device, dtype) -> dict[str, object]:
    n_in, n_out = SHAPES[shape]
    us, us_min = time_variants(make_ops(n_in, n_out, n_tokens, n_adapters, rank, device, dtype), device)
    lora = ("sgmv", "bgmv", "sgmv_frag", "apply_sgmv", "apply_bgmv")
    return {
        "shape": shape,
        "in": n_in,
        "out": n_out,
        "tokens": n_tokens,
        "adapters": n_adapters,
        "distinct_in_batch": min(n_adapters, n_tokens),
        "rank": rank,
        "us": {k: round(v, 2) for k, v in us.items()},
        "us_min": {k: round(v, 2) for k, v in us_min.items()},
        "ratio_to_base_mm": {k: round(us[k] / us["base_mm"], 3) for k in lora},
        "ratio_to_base_mm_min": {k: round(us_min[k] / us_min["base_mm"], 3) for k in lora},
    }


def print_row(row: dict[str, object]) -> None:
    us, ratio = row["us"], row["ratio_to_base_mm"]
    cells = " ".join(f"{us[v]:>10.1f}" for v in VARIANTS)
    print(
        f"{row['shape']:<18} {row['tokens']:>4} {row['adapters']:>3} {row['rank']:>3} {cells}"
        f"  {ratio['sgmv']:>6.2f} {ratio['bgmv']:>6.2f}"
    )


def geomean(values: list[float]) -> float:
    return statistics.geometric_mean(values) if values else float("nan")


def summarize(rows: list[dict[str, object]], stat: str) -> dict[str, float]:
    """Geometric means of the ratios that decide the design: fused vs two ops, auto's rule, LoRA vs base.

    stat: "us" (medians) or "us_min".
    """

    def gm(num: str, den: str, keep: Callable[[dict], bool] = lambda r: True) -> float:
        return round(geomean([r[stat][num] / r[stat][den] for r in rows if keep(r)]), 3)

    def fragmented(row: dict) -> bool:
        return row["distinct_in_batch"] > 1  # the interleaved order has more segments than slots only then

    return {
        "apply_sgmv_over_sgmv": gm("apply_sgmv", "sgmv"),
        "apply_bgmv_over_bgmv": gm("apply_bgmv", "bgmv"),
        "bgmv_over_sgmv_frag_when_fragmented": gm("bgmv", "sgmv_frag", fragmented),
        "bgmv_over_sgmv_single_adapter": gm("bgmv", "sgmv", lambda r: r["distinct_in_batch"] == 1),
        "sgmv_over_base_mm": gm("sgmv", "base_mm"),
        "bgmv_over_base_mm": gm("bgmv", "base_mm"),
        "rank8_over_rank64_sgmv_tokens256": round(
            geomean([r[stat]["sgmv"] for r in rows if r["rank"] == 8 and r["tokens"] == 256])
            / geomean([r[stat]["sgmv"] for r in rows if r["rank"] == 64 and r["tokens"] == 256]),
            3,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    facts = machine_facts(device, dtype)
    print(" ".join(f"{k}={v}" for k, v in facts.items()))
    print(
        f"{'shape':<18} {'tok':>4} {'ad':>3} {'r':>3} "
        + " ".join(f"{v:>10}" for v in VARIANTS)
        + "  sg/mm  bg/mm   (microseconds, median)"
    )
    started, rows = time.perf_counter(), []
    with torch.inference_mode():
        for shape in SHAPES:
            for n_tokens in TOKENS:
                for n_adapters in ADAPTERS:
                    for rank in RANKS:
                        rows.append(bench_point(shape, n_tokens, n_adapters, rank, device, dtype))
                        print_row(rows[-1])
    summary = {stat: summarize(rows, stat) for stat in ("us", "us_min")}
    print("summary (geometric means of ratios; us = medians, us_min = best repeats):")
    print(json.dumps(summary, indent=1))
    report = {"machine": facts, "seconds": round(time.perf_counter() - started, 1), "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
