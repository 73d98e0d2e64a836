"""Ahead-of-time compile of every Triton kernel variant the engine can launch, for sm_80 and sm_90, on a CPU.

    python tests/gpu_aot/aot.py [--sample] [--jobs N] [--out DIR]     (TRITON_INTERPRET must be unset)

1. Record. The real launchers (TritonLoRABackend.apply, triton_paged_attention) run on CPU tensors while
   `JITFunction.run` is replaced by a recorder that lets Triton's own binder derive each launch's
   specialisation (argument types, ints equal to 1 or divisible by 16, pointer alignment, constexprs) for a
   CUDA target, and launches nothing. Device-dependent choices are made as on a GPU (an H100's 132 SMs for
   split-K, tensor-core dots for fp16/bf16). Two sets are recorded:
     warm-up   what the engine launches at start: the LoRA probe's cases (adapters/ops/probe.py) at every
               model family's layer shapes and rank bound, and the paged-attention probe at every head dim,
               GQA ratio, page size and dtype;
     serving   a seeded sweep of the launches steps make while serving (decode buckets, prefill chunks,
               grouped and window forms, merges, rank bounds 1..max, eager block tables of every width).
   Every serving variant must be a warm-up variant: then nothing compiles while serving.
2. Compile each distinct variant with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` (the
   installed triton ships ptxas) and read ptxas's report: registers, spill stores, stack, shared memory.
3. Check: a cubin for every variant and target, spills within SPILL_BUDGET, registers <= 255 and within the
   register file at the launch's warps, shared memory within the target's limit, grids within CUDA's limits.

Results are cached in .cache/gpu_aot/ (git-ignored), one JSON per (triton version, kernel source, variant,
target), so a re-run compiles only what changed. `--sample` compiles one variant per (kernel, dtype, tile
constexprs, warps) group: every distinct code shape, fewer repeats of one shape at other head dims or pages
(the CI test; the full run's table is committed in bench/results/gpu_aot.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "gpu_aot"
TARGETS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block (bytes)
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM (sm_80, sm_90): a block must fit
# Bytes of spill stores per thread allowed: triton 3.7.1 spills 4 B in fp32 attention at head dims 80/96 (sm_90).
SPILL_BUDGET = 16
GRID_LIMITS = (2**31 - 1, 65535, 65535)
H100_SMS = 132

# Model families we serve, at 7B-70B widths (hidden, intermediate, heads, KV heads, head dim); the demo too.
MODELS = {
    "SmolLM2-135M": (576, 1536, 9, 3, 64), "Llama-2-7B": (4096, 11008, 32, 32, 128),
    "Llama-3-8B / Mistral-7B": (4096, 14336, 32, 8, 128), "Qwen2-7B": (3584, 18944, 28, 4, 128),
    "Qwen3-8B": (4096, 12288, 32, 8, 128), "Llama-2-13B": (5120, 13824, 40, 40, 128),
    "Qwen2.5-32B": (5120, 27648, 40, 8, 128), "Llama-3-70B": (8192, 28672, 64, 8, 128),
}
RANKS = (16, 64)  # --max-lora-rank bounds
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
GQA = (1, 4, 8)
PAGES = (1, 8, 16, 32)


def layer_shapes(hidden: int, inter: int, heads: int, kv_heads: int, dim: int) -> set[tuple[int, int]]:
    """(in, out) of q/k/v/o, gate/up and down."""
    return {(hidden, heads * dim), (hidden, kv_heads * dim), (heads * dim, hidden), (hidden, inter),
            (inter, hidden)}


# ---- 1. record -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One specialisation of one kernel: what Triton compiles once (JSON-able)."""

    module: str
    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    attrs: tuple[tuple[str, str], ...]
    num_warps: int

    def label(self) -> str:
        sig = dict(self.signature)
        dtype = next((v[1:] for k, v in sig.items() if k in ("x_ptr", "b_ptr", "q_ptr")), "?")
        consts = {k: v for k, v in self.constexprs if k[0].isupper()}
        return f"{self.kernel} {dtype} {consts} w{self.num_warps}"


class Recorder:
    """Context manager: kernel launches record their Variant (and grid) instead of running."""

    def __init__(self) -> None:
        self.launches: list[tuple[Variant, tuple[int, ...]]] = []

    def __enter__(self) -> Recorder:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        from loraplex.adapters.ops import triton_ops
        from loraplex.server.engine import triton_attention

        backend = make_backend(GPUTarget("cuda", 90, 32))
        recorder = self

        def run(fn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            warps = kwargs.get("num_warps", 4)
            kwargs.setdefault("debug", False)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, options = binder(*args, **kwargs)
            _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
            names = [p.name for p in fn.params]
            variant = Variant(fn.fn.__module__, fn.fn.__name__, tuple(signature.items()),
                              tuple((names[k[0]], _plain(v)) for k, v in sorted(constexprs.items())),
                              tuple((names[k[0]], json.dumps(v)) for k, v in sorted(attrs.items()) if v),
                              warps)
            recorder.launches.append((variant, tuple(grid) + (1,) * (3 - len(grid))))

        self._saved = [(JITFunction, "run", JITFunction.run), (triton_ops, "_sm_count", triton_ops._sm_count),
                       (triton_ops, "_f32_dot", triton_ops._f32_dot),
                       (triton_attention, "_f32_dot", triton_attention._f32_dot)]
        JITFunction.run = run
        triton_ops._sm_count = lambda device: H100_SMS
        triton_ops._f32_dot = lambda dtype, device: str(dtype) == "torch.float32"  # as on a GPU
        triton_attention._f32_dot = lambda q: str(q.dtype) == "torch.float32"
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, value in self._saved:
            setattr(owner, name, value)

    def variants(self) -> set[Variant]:
        return {v for v, _ in self.launches}


def _plain(value: Any) -> Any:
    return value.value if hasattr(value, "value") else value


def record_warm_up(models: dict[str, tuple[int, ...]] = MODELS, *, attention: bool = True) -> Recorder:
    """What engines launch at start: the LoRA probe at each model's layer shapes, dtype and rank bound, and the
    paged-attention probe at each head dim, GQA ratio, page size and dtype."""
    import torch

    from loraplex.adapters.ops.probe import CASES, case_inputs
    from loraplex.adapters.ops.triton_ops import TritonLoRABackend
    from loraplex.server.engine.paged_kernels import probe
    from loraplex.server.engine.triton_attention import triton_paged_attention

    cpu, backend = torch.device("cpu"), TritonLoRABackend()
    with Recorder() as rec:
        for dtype in _dtypes():
            for dims in models.values():
                for rank in RANKS:
                    for n_in, n_out in sorted(layer_shapes(*dims)):
                        for case in CASES:
                            y, x, a, b, batch, ranks = case_inputs(case, n_in, n_out, dtype, cpu, rank, values=False)
                            backend.apply(y, x, a, b, batch, rank, ranks)
            for dim in HEAD_DIMS if attention else ():
                for group in GQA:
                    for page in PAGES:
                        probe(triton_paged_attention, cpu, dtype, page, 2 * group, 2, dim)
    return rec


def record_serving(seed: int = 0, steps: int = 60) -> Recorder:
    """A seeded sweep of what steps launch while serving, at a few model shapes (see the module docstring)."""
    import torch

    from loraplex.adapters.ops import LoRABatchBuffers, plan_groups, split_passes
    from loraplex.adapters.ops.triton_ops import TritonLoRABackend
    from loraplex.server.engine.paged_kernels import paged_metadata
    from loraplex.server.engine.triton_attention import triton_paged_attention

    rng, cpu, backend = random.Random(seed), torch.device("cpu"), TritonLoRABackend()
    models = [MODELS["SmolLM2-135M"], MODELS["Llama-3-8B / Mistral-7B"], MODELS["Llama-3-70B"]]
    with Recorder() as rec:
        for dtype in _dtypes():
            for dims in models:
                shapes = sorted(layer_shapes(*dims))
                for _ in range(steps):
                    _lora_step(rng, backend, shapes, dtype, cpu, LoRABatchBuffers, plan_groups, split_passes)
            for dim in HEAD_DIMS:
                for _ in range(steps // 4):
                    _attention_step(rng, dim, dtype, cpu, paged_metadata, triton_paged_attention)
    return rec


def _lora_step(rng: random.Random, backend: Any, shapes: list[tuple[int, int]], dtype: Any, cpu: Any,
               buffers: Any, plan_groups: Any, split_passes: Any) -> None:
    """One random step's LoRA launches on one layer shape: a decode bucket (gather form) or a mixed step."""
    import torch

    slots, rank = 4, rng.choice(RANKS)
    n_in, n_out = rng.choice(shapes)
    gather = rng.random() < 0.4
    tokens = rng.choice([1, 2, 4, 8, 16, 32, 64]) if gather else rng.randint(1, 300)
    token_slots = [rng.randint(-1, slots - 1) for _ in range(tokens)]
    token_slots[0] = max(token_slots[0], 0)
    merges = {} if gather or rng.random() < 0.6 else {t: [(0, 0.5), (1, 0.5)] for t in range(0, tokens, 3)}
    bound = rank if gather else rng.randint(1, rank)
    a = torch.empty(slots + 1, rank, n_in, dtype=dtype)
    b = torch.empty(slots + 1, rank, n_out, dtype=dtype)
    x, y = torch.empty(tokens, n_in, dtype=dtype), torch.empty(tokens, n_out, dtype=dtype)
    ranks = torch.zeros(slots + 1, dtype=torch.int32)
    for k, (pass_slots, weights) in enumerate(split_passes(token_slots, merges)):
        plan = plan_groups(pass_slots, gather=gather and k == 0, null_slot=slots)
        if plan is not None:
            batch = buffers(cpu).fill(pass_slots, plan, {"x": bound}, weights)
            backend.apply(y, x, a, b, batch, bound, ranks)


def _attention_step(rng: random.Random, dim: int, dtype: Any, cpu: Any, paged_metadata: Any, kernel: Any) -> None:
    """A random eager step (prefill chunks and decodes, block table as wide as its widest context) or a decode
    step at a --max-model-len-wide table, over a pool shaped as the engine's."""
    import torch

    page, group = rng.choice(PAGES), rng.choice(GQA)
    seqs = rng.randint(1, 6)
    queries = [rng.choice([1, 1, rng.randint(1, 64)]) for _ in range(seqs)]
    lengths = [q + rng.randint(0, 200) for q in queries]
    width = -(-max(lengths) // page) if rng.random() < 0.5 else -(-2048 // page)
    if rng.random() < 0.5:
        queries = [1] * seqs
    blocks = width * seqs + 1
    tables = [[rng.randrange(blocks) for _ in range(width)] for _ in range(seqs)]
    meta = paged_metadata(queries, lengths, tables, width=width, device=cpu)
    pool = torch.empty(blocks * page, 2, dim, dtype=dtype).view(blocks, page, 2, dim)
    kernel(torch.empty(sum(queries), 2 * group, dim, dtype=dtype), pool, pool, meta, None)


def _dtypes() -> tuple[Any, ...]:
    import torch

    return (torch.float16, torch.bfloat16, torch.float32)


# ---- 2. compile ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Compiled:
    variant: str
    target: int
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    num_warps: int
    seconds: float
    error: str | None = None


PTXAS = {"regs": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
         "spill_loads": r"(\d+) bytes spill loads", "stack": r"(\d+) bytes stack frame"}


def compile_variant(task: tuple[Variant, int]) -> Compiled:
    """Compile one variant for one target (cached in .cache/gpu_aot); read ptxas's report."""
    variant, cc = task
    path = _cache_path(variant, cc)
    if path.is_file():
        return Compiled(**json.loads(path.read_text()))
    result = _compile(variant, cc)
    if result.error is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(result)))
    return result


def _compile(variant: Variant, cc: int) -> Compiled:
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(variant.module), variant.kernel)
    index = {p.name: p.num for p in fn.params}
    src = ASTSource(fn, dict(variant.signature), {(index[k],): v for k, v in variant.constexprs},
                    {(index[k],): json.loads(v) for k, v in variant.attrs})
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    log, start = io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": variant.num_warps})
    except Exception as exc:  # noqa: BLE001 - reported as this variant's failure
        return Compiled(variant.label(), cc, 0, 0, 0, 0, 0, variant.num_warps, 0.0,
                        f"{type(exc).__name__}: {str(exc)[:300]}")
    seconds = time.perf_counter() - start
    found = {key: int(m.group(1)) if (m := re.search(rx, log.getvalue())) else -1 for key, rx in PTXAS.items()}
    error = None if "cubin" in kernel.asm and found["regs"] >= 0 else "no cubin or no ptxas report"
    return Compiled(variant.label(), cc, found["regs"], found["spill_stores"], found["spill_loads"], found["stack"],
                    kernel.metadata.shared, kernel.metadata.num_warps, round(seconds, 2), error)


def _cache_path(variant: Variant, cc: int) -> Path:
    import importlib

    import triton

    fn = getattr(importlib.import_module(variant.module), variant.kernel)
    key = json.dumps([triton.__version__, fn.cache_key, asdict(variant), cc], sort_keys=True, default=str)
    return CACHE / triton.__version__ / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def compile_all(variants: list[Variant], jobs: int) -> list[Compiled]:
    tasks = [(v, cc) for v in variants for cc in TARGETS]
    if jobs <= 1:
        return [compile_variant(t) for t in tasks]
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(compile_variant, tasks, chunksize=1))


def sample(variants: set[Variant]) -> list[Variant]:
    """One variant per (kernel, tile constexprs, warps, fp32 or half): head dims padded to one DIM and page
    sizes repeat one code shape, and fp16 / bf16 differ only in the tensor-core dot's input type (the sample
    alternates them between code shapes, so both are compiled)."""
    groups: dict[tuple[Any, ...], Variant] = {}
    for v in sorted(variants, key=_order):
        consts = dict(v.constexprs)
        shape = tuple((k, val) for k, val in v.constexprs if k not in ("PAGE", "HEAD_DIM")) if "DIM" in consts \
            else v.constexprs
        groups.setdefault((v.kernel, shape, v.num_warps, "fp32" in v.label()), v)
    picked = sorted(groups.values(), key=_order)
    return [_as_dtype(v, "bf16" if i % 2 else "fp16", variants) for i, v in enumerate(picked)]


def _as_dtype(v: Variant, dtype: str, variants: set[Variant]) -> Variant:
    """`v` in another half dtype when it was recorded in it (the same code shape), else `v`."""
    if "fp32" in v.label():
        return v
    for other in (dtype, "fp16", "bf16"):
        signature = tuple((k, t.replace("fp16", other).replace("bf16", other)) for k, t in v.signature)
        twin = Variant(v.module, v.kernel, signature, v.constexprs, v.attrs, v.num_warps)
        if twin in variants:
            return twin
    return v


def _order(v: Variant) -> str:
    return json.dumps(asdict(v), sort_keys=True, default=str)


# ---- 3. check and report ---------------------------------------------------------------------------------
def problems(results: list[Compiled], launches: list[tuple[Variant, tuple[int, ...]]]) -> list[str]:
    out = [f"{r.variant} sm_{r.target}: {r.error}" for r in results if r.error]
    for r in results:
        if r.error:
            continue
        if r.spill_stores > SPILL_BUDGET:
            out.append(f"{r.variant} sm_{r.target}: spills {r.spill_stores} bytes (budget {SPILL_BUDGET})")
        if r.shared > SHARED_LIMIT[r.target]:
            out.append(f"{r.variant} sm_{r.target}: {r.shared} bytes of shared memory (limit {SHARED_LIMIT[r.target]})")
        if r.regs > 255 or r.regs * r.num_warps * 32 > REGISTER_FILE:
            out.append(f"{r.variant} sm_{r.target}: {r.regs} registers x {r.num_warps} warps do not fit")
    for variant, grid in launches:
        if any(g > limit or g < 1 for g, limit in zip(grid, GRID_LIMITS, strict=True)):
            out.append(f"{variant.label()}: grid {grid} outside CUDA's limits")
    return out


def table(results: list[Compiled], warm: int, serving: int, compiled: int, seconds: float, full: bool) -> str:
    import triton

    lines = [f"# Triton kernels compiled ahead of time (triton {triton.__version__}, no GPU)", "",
             f"{warm} variants launched at engine start (warm-up), {serving} by a seeded sweep of serving steps "
             f"(all among the warm-up's); {'all' if full else 'a sample of'} {compiled} variants compiled for "
             f"sm_80 and sm_90: {sum(r.seconds for r in results):.0f} s of compiling (this run: {seconds:.0f} s, "
             f"reusing .cache/gpu_aot). Spill budget {SPILL_BUDGET} bytes per thread.", ""]
    for cc in TARGETS:
        rows = [r for r in results if r.target == cc and not r.error]
        if rows:
            lines.append(f"- sm_{cc}: {len(rows)} cubins; worst registers {max(r.regs for r in rows)}, spill stores "
                         f"{max(r.spill_stores for r in rows)} B, stack {max(r.stack for r in rows)} B, shared "
                         f"{max(r.shared for r in rows)} B (limit {SHARED_LIMIT[cc]})")
    lines += ["", "| variant | target | regs | spill stores B | stack B | shared B | warps | compile s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r.variant, r.target)):
        cells = (r.variant.replace("|", "/"), f"sm_{r.target}", r.regs, r.spill_stores, r.stack, r.shared,
                 r.num_warps, r.seconds) if not r.error else (r.variant, f"sm_{r.target}", "FAIL", r.error, "", "",
                                                               "", "")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class Run:
    warm: set[Variant]
    serving: set[Variant]
    results: list[Compiled]
    problems: list[str]
    seconds: float
    full: bool

    def report(self) -> str:
        return table(self.results, len(self.warm), len(self.serving), len(self.results) // len(TARGETS),
                     self.seconds, self.full)


def run(full: bool, jobs: int) -> Run:
    start = time.perf_counter()
    warm_rec, serving_rec = record_warm_up(), record_serving()
    warm, serving = warm_rec.variants(), serving_rec.variants()
    chosen = sorted(warm, key=_order) if full else sample(warm)
    results = compile_all(chosen, jobs)
    found = problems(results, warm_rec.launches + serving_rec.launches)
    found += [f"{v.label()}: launched while serving but not at warm-up (it would compile while serving)"
              for v in sorted(serving - warm, key=_order)]
    return Run(warm, serving, results, found, time.perf_counter() - start, full)


@contextlib.contextmanager
def no_interpreter() -> Iterator[None]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the recorder needs triton's JIT, not its interpreter")
    yield


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", action="store_true", help="one variant per code shape (the CI test)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, help="write gpu_aot.md and gpu_aot.json here")
    args = parser.parse_args()
    with no_interpreter():
        result = run(not args.sample, args.jobs)
    text = result.report()
    print(text)
    print("\n".join(result.problems) or "no problems", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_aot.md").write_text(text + "\n" + ("\n".join(f"- {p}" for p in result.problems) or
                                                              "No problems.") + "\n")
        (args.out / "gpu_aot.json").write_text(json.dumps({
            "full": result.full, "seconds": round(result.seconds, 1), "problems": result.problems,
            "warm_up_variants": len(result.warm), "serving_variants": len(result.serving),
            "results": [asdict(r) for r in result.results]}, indent=1) + "\n")
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
