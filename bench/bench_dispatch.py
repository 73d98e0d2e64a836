"""Dispatch benchmark on bench-small (BENCHMARK.md): aten ops per decode step and host syncs per step.

What a CUDA graph needs from a decode step, counted on any machine: the ops its forward dispatches must not
depend on the adapter mix beyond a constant per wrapped linear, and the whole step may read device data on
the host at most once (the sampled tokens). For B = 16 requests brought to pure decode (every one prefilled,
none finished; seeded 32-token prompts, greedy), one decode step is traced with `OpTrace`:

  forward ops   compute ops (views excluded) of `engine.runner.model.forward`, one decode step
  LoRA adds     forward ops - the LoRA-free forward (base-only, eager mode: no wrapped linear runs LoRA)
  per linear    LoRA adds / the wrapped linears an adapter of the step targets (layers of a kind any of its
                adapters targets; S1: q/k/v/o = 120 of bench-small's 30 x 7 = 210; P: all 210). In eager
                mode exactly those run LoRA; in capturable mode (gather form) every kind any *resident*
                adapter targets does (here all 210, at the resident rank bounds; a base-only step runs none),
                so LoRA adds per linear running it is printed beside
  in lora_apply the same, counted directly: ops dispatched inside `lora_apply` calls / the calls, with
                the step's grid layout (batch.py: window, grouped or gather form; groups x depth)
  syncs         host syncs over the whole `engine.step()` of the next decode step (OpTrace(forbid_sync=False))

Cases: base-only; S1 (rank 8 on q/k/v/o) and P (rank 16 on all 7 projections) with 1, 4 or 16 distinct
adapters over the 16 requests, and skewed (Zipf 1.5 over 16); each with `decode_buckets` False (eager,
grouped form) and True (capturable: padded to a batch bucket, gather form). The engine has 32 device slots
(--max-lora-rank 16) and every adapter is loaded into its slot by a warm-up pass before any trace.
Targets, PASS/MISS: ops LoRA adds per targeted wrapped linear the same constant for every mix (strict: the
eager layout form, window 5 ops or gathered 7, depends on whether the step's slots form a dense range, so
this line is MISS whenever both forms occur); per layout form one constant for every mix, <= 7; host syncs
per decode step <= 1; capturable mode: two different 16-request mixes of one preset (4 vs 16 distinct) have
an identical op + shape sequence (the same graph would replay for both). Checked too: no host sync inside
the forward, and every op outside `lora_apply` is one the LoRA-free forward also dispatches.

Run: OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_dispatch.py
Writes bench/results/dispatch.json (about 2-3 minutes on 2 shared cores).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import RESULTS_DIR, bench_adapters, bench_small_dir, machine_facts, print_facts, write_json  # noqa: E402
from synthetic_adapters import PRESETS  # noqa: E402

import loraplex.adapters.layer as lora_layer  # noqa: E402
from loraplex.adapters.ops.trace import OpTrace  # noqa: E402
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
PROMPT_LEN = 32
NEW_TOKENS = 6  # prefill + 2 traced decode steps + slack; nobody finishes before the traces
ZIPF_S = 1.5
FIRST_TOKEN_ID = 3  # ids 0..2 are the special tokens of the bench tokenizer
PRESET_NAMES = ("S1", "P")
MIXES = ("identical", "distinct4", "distinct16", "skewed")
MODES = {"eager": False, "capturable": True}
SAME_GRAPH_PAIR = ("distinct4", "distinct16")  # one bucket (16), different adapters


def adapter_mix(names: list[str], mix: str, seed: int = 0) -> list[str]:
    """Per-request adapter names for BATCH requests; shuffled so slot order never matches request order."""
    rng = random.Random(seed)
    if mix == "identical":
        return [names[0]] * BATCH
    if mix == "skewed":
        weights = [1.0 / (k + 1) ** ZIPF_S for k in range(len(names))]
        return rng.choices(names, weights=weights, k=BATCH)
    n = int(mix.removeprefix("distinct"))
    out = [names[i % n] for i in range(BATCH)]
    rng.shuffle(out)
    return out


@dataclass
class Traced:
    """One decode step of one case: its forward's ops and the host syncs of the next whole step."""

    compute: list[str]
    shapes: list[tuple[str, tuple[int, ...]]]
    forward_syncs: list[str]
    step_syncs: list[str]
    lora_calls: int
    lora_ops: Counter[str]
    layout: dict[str, object]
    slots: list[int]


@contextmanager
def count_lora_apply(trace: OpTrace) -> Iterator[tuple[list[int], list[str], dict[str, object]]]:
    """Attribute the forward's ops to `lora_apply` while the block runs: ([calls], the ops dispatched inside
    the calls, the step's grid layout as the first call saw it: groups x depth, window form or gather)."""
    original = lora_layer.lora_apply
    tally = [0]
    inside: list[str] = []
    layout: dict[str, object] = {}

    def counted(*args: object, **kwargs: object) -> None:
        start = len(trace.compute)
        original(*args, **kwargs)
        tally[0] += 1
        inside.extend(trace.compute[start:])
        batch = kwargs.get("batch", args[4] if len(args) > 4 else None)
        if not layout and batch is not None:
            window = getattr(batch, "window_lo", None)
            layout.update(groups=batch.num_groups, depth=batch.depth, window_lo=window,
                          gathers_ab=window is None)

    lora_layer.lora_apply = counted
    try:
        yield tally, inside, layout
    finally:
        lora_layer.lora_apply = original


class Bench:
    """One LLMEngine (one mode), every adapter resident in a device slot before any trace."""

    def __init__(self, model_dir: Path, adapter_dirs: dict[str, Path], decode_buckets: bool) -> None:
        loaded = load_model(ModelConfig(path=model_dir, dtype="float32", device="cpu"))
        slots = max(1, len(adapter_dirs))
        per_seq = -(-(PROMPT_LEN + NEW_TOKENS) // BLOCK_SIZE)
        cfg = EngineConfig(
            max_model_len=PROMPT_LEN + NEW_TOKENS + 1,
            block_size=BLOCK_SIZE,
            num_kv_blocks=BATCH * per_seq + BATCH,
            scheduler=SchedulerConfig(max_num_seqs=BATCH, max_batch_tokens=BATCH * PROMPT_LEN),
            lora=LoRAConfig(max_loras=slots, max_lora_rank=MAX_RANK, max_cpu_loras=slots),
            decode_buckets=decode_buckets,
        )
        self.engine = LLMEngine(loaded, cfg, self._loader(adapter_dirs))
        rng = random.Random(0)
        vocab = len(self.engine.tokenizer)
        self.prompts = [[rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(PROMPT_LEN)] for _ in range(BATCH)]
        self._n = 0
        self.deadline = time.monotonic() + 120

    def _loader(self, dirs: dict[str, Path]) -> Callable[[str], object]:
        return lambda name: load_adapter_dir(dirs[name], self.engine.lora.module_shapes(), max_rank=MAX_RANK)

    def _add(self, adapters: list[str | None], new_tokens: int) -> list[str]:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        ids = []
        for prompt, adapter in zip(self.prompts, adapters, strict=True):
            self._n += 1
            ids.append(f"r{self._n}")
            self.engine.add_request(ids[-1], prompt, params, adapter)
        return ids

    def _step(self) -> None:
        if time.monotonic() > self.deadline:
            raise RuntimeError("the engine made no progress for 120 s (an adapter load that never lands?)")
        step = self.engine.step()
        for o in step.outputs:
            if o.error:
                raise RuntimeError(f"request {o.request_id} failed: {o.error}")
        if not step.computed:
            time.sleep(0.001)  # everyone waits on an adapter load (warm-up only)

    def drain(self) -> None:
        self.deadline = time.monotonic() + 120
        while self.engine.has_work():
            self._step()

    def warm_up(self, names: list[str]) -> None:
        """Load every adapter into its slot (and run one short request each, base-only included)."""
        for i in range(0, len(names), BATCH):
            group = names[i : i + BATCH]
            self._add((group + [None] * BATCH)[:BATCH], 2)
            self.drain()

    def trace(self, adapters: list[str | None]) -> Traced:
        """Bring BATCH requests to pure decode, trace one decode step's forward, then the next whole step."""
        ids = self._add(adapters, NEW_TOKENS)
        reqs = [self.engine.requests[i] for i in ids]
        self.deadline = time.monotonic() + 120
        while any(not r.output_ids for r in reqs):
            self._step()
        if len(self.engine.requests) != BATCH or any(len(r.output_ids) >= NEW_TOKENS - 2 for r in reqs):
            raise RuntimeError("expected BATCH requests, all prefilled and none about to finish")
        model = self.engine.runner.model
        forward = model.forward
        trace = OpTrace(forbid_sync=False)

        def traced(*args: object, **kwargs: object) -> object:
            with trace, count_lora_apply(trace) as (tally, inside, grid):
                out = forward(*args, **kwargs)
            calls.append(tally[0])
            ops.update(inside)
            layout.update(grid)
            return out

        calls: list[int] = []
        ops: Counter[str] = Counter()
        layout: dict[str, object] = {}
        model.forward = traced
        try:
            self._step()
        finally:
            model.forward = forward
        if len(calls) != 1:
            raise RuntimeError(f"expected one forward in the decode step, saw {len(calls)}")
        slots = sorted({getattr(r, "slot", -1) for r in reqs})
        with OpTrace(forbid_sync=False) as whole:
            self._step()
        self.drain()
        return Traced(trace.compute, trace.shapes, trace.syncs, whole.syncs, calls[0], ops, layout, slots)

    def wrapped_kinds(self) -> list[str]:
        return [layer.kind for layer in self.engine.runner.lora.layers.values()]


def run(repeat_check: bool) -> tuple[dict[str, dict[str, object]], dict[str, object]]:
    model_dir = bench_small_dir()
    dirs = {p: bench_adapters(model_dir, p, NUM_ADAPTERS) for p in PRESET_NAMES}
    named = {p: {f"{p.lower()}-{i:02d}": d for i, d in enumerate(ds)} for p, ds in dirs.items()}
    all_dirs = {n: d for group in named.values() for n, d in group.items()}
    cases: dict[str, list[str | None]] = {"base": [None] * BATCH}
    case_preset: dict[str, str | None] = {"base": None}
    for p in PRESET_NAMES:
        for mix in MIXES:
            cases[f"{p}_{mix}"] = adapter_mix(list(named[p]), mix)
            case_preset[f"{p}_{mix}"] = p
    results: dict[str, dict[str, object]] = {}
    shapes: dict[str, dict[str, list]] = {}
    for mode, buckets in MODES.items():
        print(f"[{mode}] building the engine (decode_buckets={buckets}) and loading {len(all_dirs)} adapters",
              flush=True)
        bench = Bench(model_dir, all_dirs, buckets)
        bench.warm_up(list(all_dirs))
        kinds = bench.wrapped_kinds()
        shapes[mode] = {}
        for case, adapters in cases.items():
            t = bench.trace(adapters)
            if repeat_check and case in ("base", "P_distinct16"):
                again = bench.trace(adapters)
                if again.shapes != t.shapes:
                    print(f"[{mode}] note: {case} traced twice gave different op sequences", flush=True)
            preset = case_preset[case]
            targeted = set(PRESETS[preset].target_modules) if preset else set()
            results[f"{mode}/{case}"] = {
                "mode": mode, "case": case, "preset": preset,
                "distinct_adapters": len({a for a in adapters if a is not None}),
                "adapters": adapters,
                "slots": t.slots,
                "wrapped_linears": len(kinds),
                "targeted_linears": sum(k in targeted for k in kinds),
                "forward_ops": len(t.compute),
                "forward_op_counts": dict(Counter(t.compute)),
                "lora_apply_calls": t.lora_calls,
                "lora_apply_ops": sum(t.lora_ops.values()),
                "lora_apply_op_counts": dict(t.lora_ops),
                "lora_layout": t.layout | ({"form": _form(mode, t.layout)} if t.layout else {}),
                "forward_syncs": t.forward_syncs,
                "step_syncs": t.step_syncs,
            }
            shapes[mode][case] = t.shapes
            print(f"[{mode}] {case:<16} forward ops {len(t.compute):>5}  lora_apply calls {t.lora_calls:>4}"
                  f"  step syncs {len(t.step_syncs)}", flush=True)
        getattr(bench.engine, "close", lambda: None)()  # the host loader's threads, where the engine has them
        del bench
        gc.collect()
    _derive(results)
    checks = targets(results, shapes)
    return results, checks


def _derive(results: dict[str, dict[str, object]]) -> None:
    """Per case: what LoRA adds over the same mode's base-only and over the LoRA-free forward, per linear."""
    free = results["eager/base"]["forward_ops"]  # the LoRA-free forward: no wrapped linear runs LoRA
    free_counts = Counter(results["eager/base"]["forward_op_counts"])
    for r in results.values():
        base = results[f"{r['mode']}/base"]
        r["lora_adds_vs_base_only"] = r["forward_ops"] - base["forward_ops"]
        r["lora_adds"] = r["forward_ops"] - free
        r["lora_added_op_counts"] = dict(Counter(r["forward_op_counts"]) - free_counts)
        running = r["lora_apply_calls"]
        r["linears_running_lora"] = running
        r["per_linear_running_lora"] = r["lora_adds"] / running if running else None
        r["per_targeted_linear"] = r["lora_adds"] / r["targeted_linears"] if r["targeted_linears"] else None
    for r in results.values():
        r["ops_outside_lora_apply"] = r["forward_ops"] - r["lora_apply_ops"]


def _form(mode: str, layout: dict[str, object]) -> str:
    """batch.py's names: gather (capturable), window (eager, A/B read in place), grouped (eager, A/B gathered)."""
    if not layout["gathers_ab"]:
        return "window"
    return "gather" if MODES[mode] else "grouped"


def _grid(layout: dict[str, object]) -> str:
    if not layout:
        return "-"
    return f"{layout['form']}: {layout['groups']} x {layout['depth']}"


def _same(values: list[float | None]) -> bool:
    return bool(values) and None not in values and len(set(values)) == 1


def targets(results: dict[str, dict[str, object]], shapes: dict[str, dict[str, list]]) -> dict[str, object]:
    checks: dict[str, object] = {}
    for mode in MODES:
        rows = [r for r in results.values() if r["mode"] == mode and r["preset"]]
        per_targeted = [r["per_targeted_linear"] for r in rows]
        checks[f"{mode}: ops LoRA adds per targeted wrapped linear: same constant for every mix"] = {
            "values": sorted(set(per_targeted)), "pass": _same(per_targeted)}
        by_form: dict[str, list[float | None]] = {}
        for r in rows:
            by_form.setdefault(r["lora_layout"].get("form", "-"), []).append(r["per_linear_running_lora"])
        checks[f"{mode}: ops per wrapped linear running LoRA: one constant per layout form for every mix, <= 7"] = {
            "values": {form: sorted(set(v)) for form, v in by_form.items()},
            "pass": all(_same(v) and max(v) <= 7 for v in by_form.values())}
        if mode == "capturable":
            base = results[f"{mode}/base"]
            checks[f"{mode}: a base-only step runs no LoRA op"] = {
                "values": [base["lora_apply_calls"]], "pass": base["lora_apply_calls"] == 0}
        syncs = [len(r["step_syncs"]) for r in results.values() if r["mode"] == mode]
        checks[f"{mode}: host syncs per decode step <= 1"] = {
            "values": sorted(set(syncs)), "what": sorted({s for r in results.values() if r["mode"] == mode
                                                          for s in r["step_syncs"]}),
            "pass": max(syncs) <= 1}
    free = results["eager/base"]["forward_ops"]
    outside = sorted({r["ops_outside_lora_apply"] for r in results.values()})
    checks["every case: ops outside lora_apply = the LoRA-free forward (LoRA adds nothing elsewhere)"] = {
        "values": outside, "pass": outside == [free]}
    forward_syncs = sorted({s for r in results.values() for s in r["forward_syncs"]})
    checks["every case: host syncs inside the decode forward = 0"] = {"what": forward_syncs,
                                                                      "pass": not forward_syncs}
    cap = shapes["capturable"]
    a, b = SAME_GRAPH_PAIR
    for p in PRESET_NAMES:
        same = cap[f"{p}_{a}"] == cap[f"{p}_{b}"]
        checks[f"capturable: {p} {a} vs {b} (bucket 16): identical op + shape sequence"] = {"pass": same}
    groups: dict[int, list[str]] = {}
    for case, seq in cap.items():
        groups.setdefault(hash(tuple(seq)), []).append(case)
    checks["capturable: cases with identical op + shape sequences (groups)"] = {
        "groups": list(groups.values()), "pass": len(groups) == 1, "informational": True}
    return checks


def print_report(results: dict[str, dict[str, object]], checks: dict[str, object]) -> None:
    print("\nops per decode step, bench-small, B = 16 (forward compute ops; views excluded)")
    head = (f"{'mode':<11}{'case':<16}{'adapters':>9}{'targeted':>9}{'fwd ops':>8}{'+base':>7}{'+LoRA':>7}"
            f"{'/target':>8}{'running':>8}{'/running':>9}{'in apply':>9}{'syncs':>6}  grid (form: G x D)")
    print(head)
    for r in results.values():
        pt = "-" if r["per_targeted_linear"] is None else f"{r['per_targeted_linear']:.2f}"
        pr = "-" if r["per_linear_running_lora"] is None else f"{r['per_linear_running_lora']:.2f}"
        ia = f"{r['lora_apply_ops'] / r['lora_apply_calls']:.2f}" if r["lora_apply_calls"] else "-"
        print(f"{r['mode']:<11}{r['case']:<16}{r['distinct_adapters']:>9}{r['targeted_linears']:>9}"
              f"{r['forward_ops']:>8}{r['lora_adds_vs_base_only']:>7}{r['lora_adds']:>7}{pt:>8}"
              f"{r['linears_running_lora']:>8}{pr:>9}{ia:>9}{len(r['step_syncs']):>6}  {_grid(r['lora_layout'])}")
    print("+base: forward ops - the same mode's base-only; +LoRA: - the LoRA-free forward (eager base-only);")
    print("/target: +LoRA per wrapped linear an adapter of the step targets; running: wrapped linears that ran")
    print("lora_apply; in apply: ops inside lora_apply per call; syncs: host syncs over the whole next step;")
    print("grid: the step's LoRA layout, G groups x D rows (batch.py: window = A/B read in place from a dense")
    print("slot range; grouped, gather = A/B gathered per group)")
    per_call: dict[str, list[str]] = {}
    for r in results.values():
        if r["lora_apply_calls"]:
            ops = {k.removeprefix("aten."): v / r["lora_apply_calls"] for k, v in r["lora_apply_op_counts"].items()}
            per_call.setdefault(str(ops), []).append(f"{r['mode']}/{r['case']}")
    print("ops per lora_apply call:")
    for ops, where in per_call.items():
        print(f"  {ops}: {', '.join(where)}")
    print()
    for metric, c in checks.items():
        if c.get("informational"):
            print(f"{'INFO':<5} {metric}: {c['groups']}")
            continue
        extra = {k: v for k, v in c.items() if k != "pass"}
        print(f"{'PASS' if c['pass'] else 'MISS':<5} {metric} {extra if extra else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--repeat-check", action="store_true",
                        help="trace base and P_distinct16 twice and note if a case's sequence is not stable")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "dispatch.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = machine_facts("cpu")
    print_facts(facts)
    start = time.perf_counter()
    with torch.inference_mode():
        results, checks = run(args.repeat_check)
    print_report(results, checks)
    facts["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out, {
        "machine": facts,
        "settings": {"batch": BATCH, "prompt_tokens": PROMPT_LEN, "max_lora_rank": MAX_RANK,
                     "slots": 2 * NUM_ADAPTERS, "zipf_s": ZIPF_S, "threads": args.threads},
        "wall_s": round(time.perf_counter() - start, 1), "checks": checks, "results": results,
    })


if __name__ == "__main__":
    main()
