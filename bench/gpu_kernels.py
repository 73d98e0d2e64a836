"""gpu_check stage `kernels`: one fused `lora_apply` (decode gather form) against the base layer's `torch.mm`.

For Llama-7B's layer shapes (q/k/v/o 4096x4096, gate/up 4096->11008, down 11008->4096), batches 1/8/32 and 1
or 32 distinct rank-16 adapters (32 device slots), each call is timed alone: `triton.testing.do_bench` (median,
L2 flushed before each call, so the launch gap is hidden behind the flush) on CUDA, the median of a loop on
the CPU. Bandwidth = the bytes a call must move (base: W + x + y; LoRA: A/B of the distinct adapters + x + y
read and written) / its time, over the device's copy bandwidth measured here (a large device-to-device
copy: read + write). The backend is whatever `lora_apply` picks for the device (triton on CUDA).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraplex.adapters.ops import LoRABatchBuffers, get_backend, lora_apply, plan_groups


@dataclass(frozen=True)
class KernelShapes:
    layers: dict[str, tuple[int, int]]  # name -> (in, out)
    batches: tuple[int, ...]
    adapters: tuple[int, ...]
    rank: int
    slots: int
    copy_mib: int  # the bandwidth probe's buffer


FULL = KernelShapes({"q/k/v/o 4096x4096": (4096, 4096), "gate/up 4096->11008": (4096, 11008),
                     "down 11008->4096": (11008, 4096)}, (1, 8, 32), (1, 32), rank=16, slots=32, copy_mib=2048)
DRY = KernelShapes({"q 64x64": (64, 64), "up 64->128": (64, 128), "down 128->64": (128, 64)},
                   (1, 4), (1, 4), rank=8, slots=4, copy_mib=16)


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds per call of `fn` on `device`."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3
    return _cpu_time


def _cpu_time(fn: Callable[[], object], repeats: int = 9) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes/s of a device-to-device copy of `mib` MiB (read + write), the practical peak a decode step meets."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timer(device)(lambda: dst.copy_(src))


def spec_bandwidth(device: torch.device) -> float | None:
    """The memory's nominal bandwidth (bytes/s) where torch reports clock and bus width, else None."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None  # double data rate


def stacks(n_in: int, n_out: int, s: KernelShapes, device: torch.device, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A [S + 1, r, in], B [S + 1, r, out] (null slot S zero) and each slot's rank [S + 1] int32, as
    MultiLoRALinear holds them with --max-loras S --max-lora-rank r, every slot holding a rank-r adapter."""
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(s.slots + 1, s.rank, n_in, generator=gen, device=device, dtype=dtype) * 0.02
    b = torch.randn(s.slots + 1, s.rank, n_out, generator=gen, device=device, dtype=dtype) * 0.02
    a[s.slots], b[s.slots] = 0, 0
    ranks = torch.full((s.slots + 1,), s.rank, dtype=torch.int32, device=device)
    ranks[s.slots] = 0
    return a, b, ranks


def bench_point(n_in: int, n_out: int, tokens: int, adapters: int, s: KernelShapes, device: torch.device,
                dtype: torch.dtype, bandwidth: float) -> dict[str, object]:
    """One (shape, batch, adapters) point: seconds, bytes and bandwidth share of torch.mm and lora_apply."""
    gen = torch.Generator(device).manual_seed(1)
    w_t = torch.randn(n_out, n_in, generator=gen, device=device, dtype=dtype).t()  # x @ W.T, as the layer does
    x = torch.randn(tokens, n_in, generator=gen, device=device, dtype=dtype)
    y = torch.zeros(tokens, n_out, device=device, dtype=dtype)
    a, b, own = stacks(n_in, n_out, s, device, dtype)
    slots = [t % adapters for t in range(tokens)]  # decode: every token its own group (the gather form)
    batch = LoRABatchBuffers(device).fill(slots, plan_groups(slots, gather=True, null_slot=s.slots), {"proj": s.rank})
    time_of = timer(device)
    mm_s = time_of(lambda: torch.mm(x, w_t))
    lora_s = time_of(lambda: lora_apply(y, x, a, b, batch, s.rank, own))
    size = x.element_size()
    mm_bytes = size * (n_in * n_out + tokens * (n_in + n_out))
    lora_bytes = size * (min(adapters, tokens) * s.rank * (n_in + n_out) + tokens * (n_in + 2 * n_out))
    return {"in": n_in, "out": n_out, "tokens": tokens, "adapters": adapters, "mm_us": mm_s * 1e6,
            "lora_us": lora_s * 1e6, "lora_over_mm": lora_s / mm_s, "bytes_ratio": lora_bytes / mm_bytes,
            "mm_bw_share": mm_bytes / mm_s / bandwidth, "lora_bw_share": lora_bytes / lora_s / bandwidth}


def run(dry: bool, device: torch.device) -> dict[str, object]:
    s = DRY if dry else FULL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth, spec = copy_bandwidth(device, s.copy_mib), spec_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (spec {spec and round(spec / 1e9)} GB/s); "
          f"LoRA backend {get_backend(device).name}", flush=True)
    points = []
    with torch.inference_mode():
        for name, (n_in, n_out) in s.layers.items():
            for tokens in s.batches:
                for adapters in s.adapters:
                    points.append({"shape": name} | bench_point(n_in, n_out, tokens, adapters, s, device, dtype,
                                                                 bandwidth))
                    print(_line(points[-1]), flush=True)
    return {"rows": _rows(points, s, bandwidth, spec), "copy_bandwidth_Bps": bandwidth, "spec_bandwidth_Bps": spec,
            "backend": get_backend(device).name, "dtype": str(dtype), "rank": s.rank, "slots": s.slots,
            "points": points}


def _line(p: dict[str, object]) -> str:
    return (f"{p['shape']:<22} B={p['tokens']:<3} adapters={p['adapters']:<3} mm {p['mm_us']:8.1f} us  "
            f"lora {p['lora_us']:8.1f} us  lora/mm {p['lora_over_mm']:.3f} (bytes {p['bytes_ratio']:.3f})  "
            f"BW share mm {p['mm_bw_share']:.2f} lora {p['lora_bw_share']:.2f}")


def _rows(points: list[dict], s: KernelShapes, bandwidth: float, spec: float | None) -> list[dict[str, object]]:
    """Table rows: the copy bandwidth, then per layer shape at the largest batch and adapter count."""
    rows = [{"metric": "device copy bandwidth (measured; limit: spec)", "value": f"{bandwidth / 1e9:.0f} GB/s",
             "limit": f"{spec / 1e9:.0f} GB/s" if spec else None}]
    for p in points:
        if p["tokens"] == max(s.batches) and p["adapters"] == max(s.adapters):
            tag = f"{p['shape']}, B={p['tokens']}, {p['adapters']} adapters"
            rows.append({"metric": f"lora_apply / torch.mm time, {tag} (limit: bytes ratio)",
                         "value": f"{p['lora_over_mm']:.3f}", "limit": f"{p['bytes_ratio']:.3f}"})
            rows.append({"metric": f"bandwidth / copy bandwidth, {tag}",
                         "value": f"lora_apply {p['lora_bw_share']:.2f}, mm {p['mm_bw_share']:.2f}"})
    return rows
