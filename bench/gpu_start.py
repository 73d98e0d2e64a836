"""gpu_check stage `start`: what the engine does at start on the device, and that serving then compiles nothing.

On bench-7b in bf16 (gpu_engine.py's model and adapters; the CPU dry run: its tiny shape in fp32), one engine
built as the server builds it: `--num-kv-blocks 0` (the pool sized by --gpu-memory-utilization 0.9 over a
profile run; on the CPU by the workload), CUDA graphs on. Reported: the kernel warm-up's time and outcome
(the LoRA probe per form, the paged attention kernel), the KV pool's rule and size, the CUDA graphs' memory,
then a short mixed workload (prefills, decodes in every bucket, 8 adapters, a linear merge) with:
  Triton variants compiled while serving (target 0: every variant was compiled by the warm-up),
  decode graph replays (> 0: the graphs serve) and steps run eagerly,
  the device's peak while serving against --gpu-memory-utilization x total (target: within).
"""

from __future__ import annotations

import time

import torch
from gpu_engine import BLOCK_SIZE, DRY, FULL, RANK, EngineShape, adapter_dirs, load_base

from loraplex.adapters.merge import MergeRecipe
from loraplex.adapters.weights import load_adapter_dir
from loraplex.server.config import LoRAConfig
from loraplex.server.engine.engine import EngineConfig, LLMEngine
from loraplex.server.engine.sampling_params import SamplingParams
from loraplex.server.engine.scheduler import SchedulerConfig

UTILIZATION = 0.9
SLOTS = 8


def triton_variants() -> int:
    """Compiled variants held by our Triton kernels' JIT caches (0 where triton never ran: the CPU)."""
    try:
        from loraplex.adapters.ops import triton_ops
        from loraplex.server.engine import triton_attention
    except ImportError:
        return 0
    kernels = (triton_ops._shrink_kernel, triton_ops._expand_kernel, triton_attention._paged_attention_kernel)
    return sum(len(cache[0]) for k in kernels for cache in getattr(k, "device_caches", {}).values())


def build(s: EngineShape, device: torch.device) -> LLMEngine:
    loaded = load_base(s, device, "none")
    adapters = adapter_dirs(s)
    cfg = EngineConfig(max_model_len=s.prompt + s.new_tokens + 64, block_size=BLOCK_SIZE, num_kv_blocks=0,
                       gpu_memory_utilization=UTILIZATION,
                       scheduler=SchedulerConfig(max_num_seqs=s.batch, max_batch_tokens=s.batch * s.prompt),
                       lora=LoRAConfig(max_loras=SLOTS, max_lora_rank=RANK, max_cpu_loras=SLOTS), cuda_graphs=True)
    engine = LLMEngine(loaded, cfg, lambda name: load_adapter_dir(adapters[name], engine.lora.module_shapes(),
                                                                  max_rank=RANK))
    return engine


def serve(engine: LLMEngine, s: EngineShape) -> dict[str, int]:
    """Requests of every batch size up to the bucket of --max-num-seqs, adapters mixed, one linear merge."""
    names = [f"p-{i:02d}" for i in range(SLOTS)]
    params = SamplingParams(max_tokens=s.new_tokens // 2, temperature=0.0, ignore_eos=True)
    n = 0
    for batch in (1, 3, s.batch):
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", [3 + (i * 7 + j) % 200 for j in range(s.prompt - i % 5)], params,
                               names[i % SLOTS] if i % 4 else None)
            n += 1
        if batch == 3:
            engine.add_request("merge", list(range(3, 3 + s.prompt)), params,
                               merge=MergeRecipe(((names[0], 0.5), (names[1], 0.5))))
            n += 1
        failed = []
        while engine.has_work():
            step = engine.step()
            failed += [o.error for o in step.outputs if o.error]
            if not step.computed:
                time.sleep(0.001)
        if failed:
            raise RuntimeError(f"{len(failed)} requests failed: {failed[0]}")
    return {"requests": n}


def run(dry: bool, device: torch.device, budget_s: float) -> dict[str, object]:
    s = DRY if dry else FULL
    engine = build(s, device)
    compiled_at_start = triton_variants()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    served = serve(engine, s)
    compiled = triton_variants() - compiled_at_start
    graphs = engine.runner.graphs
    plan, probe = engine.kv_plan, engine.lora_probe
    rows = [
        {"metric": "kernel warm-up at start", "value": f"{engine.warm_up_s:.1f} s; LoRA {probe.backend}"
         f"{' (' + probe.summary() + ')' if probe.problems else ''}; attention {engine.attention_kernel}; "
         f"{compiled_at_start} Triton variants compiled"},
        {"metric": "KV pool", "value": f"{plan.num_blocks} blocks ({engine.runner.kv.bytes / 2**30:.2f} GiB), by "
         f"{plan.rule}"},
        {"metric": f"Triton variants compiled while serving {served['requests']} requests",
         "value": str(compiled), "target": "0", "pass": compiled == 0},
        {"metric": "decode graphs captured at start / replays while serving",
         "value": f"{len(graphs.graphs)} / {graphs.replays}" if graphs else "graphs off (CPU)",
         **({"target": "replays > 0", "pass": graphs.replays > 0} if graphs else {})},
    ]
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        peak = torch.cuda.max_memory_reserved(device) + (total - free - torch.cuda.memory_reserved(device))
        rows.append({"metric": "device memory in use at peak while serving", "value": f"{peak / 2**30:.1f} GiB",
                     "target": f"<= {UTILIZATION} x {total / 2**30:.1f} GiB", "pass": peak <= UTILIZATION * total})
    engine.close()
    return {"rows": rows, "kv_plan": plan.__dict__, "warm_up_s": engine.warm_up_s,
            "lora_probe": probe.problems, "compiled_while_serving": compiled}
