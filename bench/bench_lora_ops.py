"""Microbenchmark of one fused `lora_apply` against the base layer's matmul, on bench-small's layer shapes.

In the spirit of vLLM's benchmarks/kernels/benchmark_lora.py: tokens (1, 16, 64, 256) x distinct adapters
(1, 4, 16) x rank (8, 16, 64) on bench-small's shapes (q/o 576x576, gate/up 576->1536). The stacks are what
MultiLoRALinear holds with --max-loras 16 --max-lora-rank 64: A [17, 64, in], B [17, 64, out] (16 slots and
the all-zero null slot; zeros past each slot's rank, as `set_slot` leaves them); every adapter has rank
`rank`, in slots 0..adapters-1. Tokens are spread evenly over the adapters, in two orders: interleaved
(round-robin: decode-like) and grouped (each adapter's tokens in one run: prefill-like). The step's layout
comes from `plan_groups` and `LoRABatchBuffers.fill`, built once per point as the runner does once per step.
Variants, microseconds per call (median of interleaved repeats, min beside it):

  base_mm      F.linear(x, W): the base layer LoRA rides beside
  window_<o>   lora_apply, eager layout as `plan_groups(gather=False)` picks it; here always the window form
               (the slots are a dense range): A/B read in place, at the step's rank bound `rank`
  grouped_<o>  the same grid with A/B gathered per group (window_lo=None): the grouped form, what an eager
               step whose slots are not a dense range runs
  gather_<o>   lora_apply, gather form (`plan_groups(gather=True)`): one group per token, at the adapters'
               rank rounded up to a power of two (the engine bounds a capturable step by its resident adapters)
  torch_<f>_il the torch backend on the same grid as <f>_il, called directly (CUDA only, where lora_apply runs
               the triton backend: the two backends side by side)
  <o>: il = interleaved order, gr = grouped order

Run: OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_lora_ops.py [--device cpu|cuda]
     [--dtype float32|bfloat16|float16] [--repeats N]
Writes bench/results/lora_ops.json (about 1-2 minutes on 2 shared cores with one intra-op thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from common import RESULTS_DIR, machine_facts, print_facts, write_json

from loraplex.adapters.ops import LoRABackend, LoRABatch, LoRABatchBuffers, get_backend, lora_apply, plan_groups
from loraplex.adapters.ops.torch_ops import TorchLoRABackend

SHAPES = {"q/o 576x576": (576, 576), "gate/up 576->1536": (576, 1536)}
TOKENS = (1, 16, 64, 256)
ADAPTERS = (1, 4, 16)
RANKS = (8, 16, 64)
SLOTS, R_MAX = 16, 64
NULL_SLOT = SLOTS
ORDERS = {"il": "interleaved", "gr": "grouped"}
FORMS = ("window", "grouped", "gather")
VARIANTS = ("base_mm", *(f"{f}_{o}" for f in FORMS for o in ORDERS))
TORCH_VARIANTS = tuple(f"torch_{f}_il" for f in FORMS)  # CUDA only: the torch backend beside triton
TARGET_S = 0.002  # each repeat runs a variant enough times to take about this long


def token_slots(n_tokens: int, n_adapters: int, order: str) -> list[int]:
    """Tokens spread evenly over slots 0..n_adapters-1: round-robin (interleaved) or in runs (grouped)."""
    if order == "interleaved":
        return [t % n_adapters for t in range(n_tokens)]
    return [t * n_adapters // n_tokens for t in range(n_tokens)]


def variants(device: torch.device) -> tuple[str, ...]:
    return VARIANTS + (TORCH_VARIANTS if device.type == "cuda" else ())


def make_stacks(n_in: int, n_out: int, rank: int, device: torch.device, dtype: torch.dtype,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A [S + 1, R_max, in], B [S + 1, R_max, out]: rows past `rank` and the null slot zero; each slot's own
    rank [S + 1] int32 (MultiLoRALinear.lora_ranks: `rank`, the null slot 0)."""
    a = torch.zeros(SLOTS + 1, R_MAX, n_in)
    b = torch.zeros(SLOTS + 1, R_MAX, n_out)
    a[:SLOTS, :rank] = torch.randn(SLOTS, rank, n_in, generator=gen) * 0.02
    b[:SLOTS, :rank] = torch.randn(SLOTS, rank, n_out, generator=gen) * 0.02
    ranks = torch.tensor([rank] * SLOTS + [0], dtype=torch.int32, device=device)
    return a.to(device, dtype), b.to(device, dtype), ranks


def make_ops(n_in: int, n_out: int, n_tokens: int, n_adapters: int, rank: int, device: torch.device,
             dtype: torch.dtype) -> tuple[dict[str, Callable[[], object]], dict[str, object]]:
    """One closure per variant over shared tensors, and the layout each eager variant got."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n_out, n_in, generator=gen).to(device, dtype)  # base W: [out, in]
    a, b, own = make_stacks(n_in, n_out, rank, device, dtype, gen)
    x = torch.randn(n_tokens, n_in, generator=gen).to(device, dtype)
    y = torch.zeros(n_tokens, n_out, device=device, dtype=dtype)
    ranks = {"proj": rank}
    fns: dict[str, Callable[[], object]] = {"base_mm": lambda: F.linear(x, weight)}
    layouts: dict[str, object] = {}
    for key, order in ORDERS.items():
        slots = token_slots(n_tokens, n_adapters, order)
        eager = plan_groups(slots, gather=False, null_slot=NULL_SLOT)
        grouped = dataclasses.replace(eager, window_lo=None)
        gather = plan_groups(slots, gather=True, null_slot=NULL_SLOT)
        layouts[key] = {"eager_form": "window" if eager.window_lo is not None else "grouped",
                        "groups": len(eager.group_slots), "depth": eager.depth, "grid_rows": len(eager.rows)}
        for form, plan, bound in (("window", eager, rank), ("grouped", grouped, rank), ("gather", gather, _pow2(rank))):
            # One buffer set per variant: a LoRABatch is views of its buffers, so they must not be shared.
            batch = LoRABatchBuffers(device).fill(slots, plan, ranks)
            fns[f"{form}_{key}"] = _apply(y, x, a, b, batch, bound, own)
            if f"torch_{form}_{key}" in variants(device):
                fns[f"torch_{form}_{key}"] = _apply(y, x, a, b, batch, bound, own, TorchLoRABackend())
    return fns, layouts


def _apply(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch, rank: int,
           own: torch.Tensor, backend: LoRABackend | None = None) -> Callable[[], None]:
    """lora_apply (the device's backend), or one backend's apply called directly."""
    if backend is None:
        return lambda: lora_apply(y, x, a, b, batch, rank, own)
    return lambda: backend.apply(y, x, a, b, batch, rank, own)


def run_batch(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Seconds per call over n back-to-back calls (synchronising around them on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n


def time_variants(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """Median and min microseconds per variant; repeats interleave the variants (rotating order) so drift
    hits them alike. The min is kept beside the median: a shared machine's other load only ever adds time."""
    counts = {}
    for name, fn in fns.items():
        once = run_batch(fn, 2, device)  # also warms up
        counts[name] = max(1, min(2000, int(TARGET_S / max(once, 1e-7))))
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(run_batch(fns[name], counts[name], device))
    return ({n: statistics.median(s) * 1e6 for n, s in samples.items()},
            {n: min(s) * 1e6 for n, s in samples.items()})


def bench_point(shape: str, n_tokens: int, n_adapters: int, rank: int, device: torch.device,
                dtype: torch.dtype, repeats: int) -> dict[str, object]:
    n_in, n_out = SHAPES[shape]
    fns, layouts = make_ops(n_in, n_out, n_tokens, n_adapters, rank, device, dtype)
    us, us_min = time_variants(fns, device, repeats)
    lora = [v for v in variants(device) if v != "base_mm"]
    return {
        "shape": shape, "in": n_in, "out": n_out, "tokens": n_tokens, "adapters": n_adapters,
        "distinct_in_batch": min(n_adapters, n_tokens), "rank": rank, "layouts": layouts,
        "us": {k: round(v, 2) for k, v in us.items()},
        "us_min": {k: round(v, 2) for k, v in us_min.items()},
        "ratio_to_base_mm": {k: round(us[k] / us["base_mm"], 3) for k in lora},
    }


def print_header(names: tuple[str, ...]) -> None:
    print(f"\n{'shape':<18}{'tok':>5}{'ad':>4}{'r':>4}" + "".join(f"{v:>11}" for v in names)
          + f"{'win/mm':>8}{'gath/mm':>8}   (microseconds per call, median)")


def print_row(row: dict[str, object], names: tuple[str, ...]) -> None:
    us, ratio = row["us"], row["ratio_to_base_mm"]
    cells = "".join(f"{us[v]:>11.1f}" for v in names)
    print(f"{row['shape']:<18}{row['tokens']:>5}{row['adapters']:>4}{row['rank']:>4}{cells}"
          f"{ratio['window_il']:>8.2f}{ratio['gather_il']:>8.2f}", flush=True)


def geomean(values: list[float]) -> float:
    return round(statistics.geometric_mean(values), 3) if values else float("nan")


def summarize(rows: list[dict[str, object]], stat: str) -> dict[str, float]:
    """Geometric means of the ratios that decide the design. stat: "us" (medians) or "us_min" (best)."""

    def gm(num: str, den: str, keep: Callable[[dict], bool] = lambda r: True) -> float:
        return geomean([r[stat][num] / r[stat][den] for r in rows if keep(r)])

    def decode(r: dict) -> bool:
        return r["tokens"] in (16, 64)

    return {
        "window_il_over_base_mm": gm("window_il", "base_mm"),
        "grouped_il_over_base_mm": gm("grouped_il", "base_mm"),
        "gather_il_over_base_mm": gm("gather_il", "base_mm"),
        "grouped_over_window_il (what the in-place read saves)": gm("grouped_il", "window_il"),
        "gather_over_window_il (the price of static shapes)": gm("gather_il", "window_il"),
        "gather_over_window_il, tokens 16-64 (decode batches)": gm("gather_il", "window_il", decode),
        "gather_over_window_il, rank 64": gm("gather_il", "window_il", lambda r: r["rank"] == 64),
        "window_il_over_window_gr (token order, eager)": gm("window_il", "window_gr"),
        "gather_il_over_gather_gr (token order, gather)": gm("gather_il", "gather_gr"),
        "window_il rank 8 / rank 64, 256 tokens": round(
            statistics.geometric_mean([r[stat]["window_il"] for r in rows if r["rank"] == 8 and r["tokens"] == 256])
            / statistics.geometric_mean([r[stat]["window_il"] for r in rows
                                         if r["rank"] == 64 and r["tokens"] == 256]), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats per point (median, >= 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "lora_ops.json")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats: the protocol asks for a median of >= 3")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    facts = machine_facts(device) | {"dtype": args.dtype, "backend": get_backend(device).name}
    print_facts(facts)
    print_header(variants(device))
    started, rows = time.perf_counter(), []
    with torch.inference_mode():
        for shape in SHAPES:
            for n_tokens in TOKENS:
                for n_adapters in ADAPTERS:
                    for rank in RANKS:
                        rows.append(bench_point(shape, n_tokens, n_adapters, rank, device, dtype, args.repeats))
                        print_row(rows[-1], variants(device))
    summary = {stat: summarize(rows, stat) for stat in ("us", "us_min")}
    print("\nsummary, geometric means of ratios over all points (us: medians; us_min: best repeats):")
    for key in summary["us"]:
        print(f"  {key:<56}{summary['us'][key]:>8.3f}{summary['us_min'][key]:>8.3f}")
    facts["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out, {
        "machine": facts,
        "settings": {"slots": SLOTS, "r_max": R_MAX, "repeats": args.repeats, "target_s": TARGET_S,
                     "threads": args.threads, "variants": list(variants(device))},
        "seconds": round(time.perf_counter() - started, 1), "summary": summary, "results": rows,
    })


def _pow2(rank: int) -> int:
    """The gather form's rank bound: the resident adapters' rank rounded up to a power of two (inject.py)."""
    return 1 << (rank - 1).bit_length()


if __name__ == "__main__":
    main()
