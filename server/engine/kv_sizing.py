"""How many KV blocks to preallocate, and which rule chose that number (the engine logs both).

Rules, the first that applies:
  --num-kv-blocks N         exactly N blocks
  --kv-cache-memory BYTES   BYTES of K and V (all layers), on any device
  CUDA                      vLLM's --gpu-memory-utilization F: F x the device's total memory, less what the engine
                            peaked at in a profile run after the weights, LoRA stacks and kernels were in place (the
                            largest step: --max-batch-tokens tokens with a logit row and its log-softmax for each,
                            as prompt logprobs take; the CUDA graphs captured once on a stand-in pool), less the
                            memory outside torch's allocator (CUDA context, cuBLAS, other processes)
  CPU                       the workload: --max-num-seqs x --max-model-len tokens, capped at CPU_RAM_FRACTION of the
                            machine's total memory. Both are fixed for one machine and one command line, so the
                            pool is the same from start to start (free memory, which moves, is only warned about)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

CPU_RAM_FRACTION = 0.25  # the rest: the model, activations, the host adapter tier, other processes
GiB = 2**30


@dataclass(frozen=True)
class KVPlan:
    """The pool's size in blocks, the rule that chose it (a flag name or "workload") and why, in words."""

    num_blocks: int
    rule: str
    reason: str


@dataclass(frozen=True)
class MemorySnapshot:
    """A CUDA device after the profile run: total and free memory (driver), the peak torch allocated during the
    run and what torch's caching allocator holds now (bytes)."""

    total: int
    free: int
    peak_allocated: int
    reserved: int

    @property
    def outside_torch(self) -> int:
        """Memory in use that torch's allocator does not account for: CUDA context, libraries, other processes."""
        return max(0, self.total - self.free - self.reserved)


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    # K and V, every layer: 2 * layers * kv_heads * head_dim * itemsize
    return 2 * num_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def plan_fixed(*, num_blocks: int, kv_cache_memory: int, bytes_per_block: int) -> KVPlan | None:
    """--num-kv-blocks, else --kv-cache-memory; None when neither is set (0)."""
    if num_blocks:
        return KVPlan(num_blocks, "--num-kv-blocks", f"--num-kv-blocks {num_blocks}")
    if kv_cache_memory:
        blocks = kv_cache_memory // bytes_per_block
        if blocks < 1:
            raise ValueError(f"--kv-cache-memory: {kv_cache_memory} bytes hold no KV block "
                             f"({bytes_per_block} bytes each at this model, dtype and --block-size)")
        return KVPlan(blocks, "--kv-cache-memory", f"--kv-cache-memory {kv_cache_memory} bytes / "
                      f"{bytes_per_block} bytes per block")
    return None


def plan_cpu(*, bytes_per_block: int, block_size: int, max_num_seqs: int, max_model_len: int,
             total_ram: int | None = None) -> KVPlan:
    """The workload's blocks (every sequence at full length), capped at CPU_RAM_FRACTION of the total RAM."""
    per_seq = -(-max_model_len // block_size)
    want = max_num_seqs * per_seq
    total = total_ram if total_ram is not None else _total_ram()
    cap = max(1, int(total * CPU_RAM_FRACTION) // bytes_per_block)
    workload = (f"--max-num-seqs {max_num_seqs} x --max-model-len {max_model_len} "
                f"({per_seq} blocks each) = {want} blocks")
    if want <= cap:
        return KVPlan(want, "workload", workload)
    return KVPlan(cap, "workload, capped by RAM",
                  f"{workload}, capped at {CPU_RAM_FRACTION:g} of {total / GiB:.1f} GiB RAM = {cap} blocks")


def plan_cuda(*, bytes_per_block: int, utilization: float, snapshot: MemorySnapshot, graph_bytes: int = 0
              ) -> KVPlan:
    """vLLM's rule: utilization x total, less the profile's peak, memory outside torch and the graphs."""
    budget = int(snapshot.total * utilization)
    used = snapshot.peak_allocated + snapshot.outside_torch + graph_bytes
    blocks = (budget - used) // bytes_per_block
    detail = (f"--gpu-memory-utilization {utilization:g} x {snapshot.total / GiB:.2f} GiB = {budget / GiB:.2f} GiB, "
              f"less the profile run's peak {snapshot.peak_allocated / GiB:.2f} GiB, "
              f"{snapshot.outside_torch / GiB:.2f} GiB outside torch and {graph_bytes / GiB:.2f} GiB of CUDA graphs")
    if blocks < 1:
        raise RuntimeError(f"no memory left for the KV cache: {detail}. Raise --gpu-memory-utilization, lower "
                           "--max-batch-tokens, or set --kv-cache-memory / --num-kv-blocks")
    return KVPlan(blocks, "--gpu-memory-utilization", f"{detail} = {blocks} blocks")


def measure_cuda(device: torch.device, profile: Callable[[], object]) -> MemorySnapshot:
    """Run `profile` (the engine's largest step) and read the device's memory around it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    profile()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return MemorySnapshot(total, free, torch.cuda.max_memory_allocated(device), torch.cuda.memory_reserved(device))


def check_utilization(device: torch.device, utilization: float) -> None:
    """Refuse at start, as vLLM does, when the device has less free memory than the fraction asks for (another
    process holds it): the pool would otherwise be sized from memory we cannot get."""
    free, total = torch.cuda.mem_get_info(device)
    if free < total * utilization:
        raise RuntimeError(f"--gpu-memory-utilization {utilization:g} asks for {total * utilization / GiB:.2f} GiB "
                           f"of {total / GiB:.2f} GiB, but only {free / GiB:.2f} GiB are free on {device} (another "
                           "process uses the rest): lower it or free the device")


def warn_if_short(num_blocks: int, bytes_per_block: int) -> None:
    """CPU: a pool larger than the memory available now is allocated anyway (its pages are committed as they are
    used), with a warning: the size must not move with free memory."""
    available = _available_ram()
    if available is not None and num_blocks * bytes_per_block > available:
        log.warning("KV pool: %.1f GiB may exceed the %.1f GiB of memory available now; set --kv-cache-memory or "
                    "lower --max-num-seqs / --max-model-len", num_blocks * bytes_per_block / GiB, available / GiB)


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * GiB


def _available_ram() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
