"""Batched multi-adapter LoRA: one fused `lora_apply` per wrapped linear (Punica/vLLM's shrink + expand).

The semantics are stated as a per-token loop in `lora_apply`'s docstring; `reference.py` holds exactly that
loop as the test oracle. The work is done by a `LoRABackend` picked once per device type by `get_backend` and
logged: triton (`triton_ops.py`, each slot's own rank) on CUDA when triton imports, torch (`torch_ops.py`)
otherwise; `LORAPLEX_LORA_BACKEND=torch|triton` overrides. triton_ops is imported only when chosen, so a CPU
run never imports triton. The engine then probes the chosen backend (`probe_lora_backend`, probe.py): each
kernel form that fails or differs from the torch ops falls back to them, per form, with the reason logged.
The layout of the step's tokens (which tokens share one gathered adapter) is planned once per forward by the
runner (`batch.py`), never inside a layer.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from loraplex.adapters.ops.base import LoRABackend
from loraplex.adapters.ops.batch import GroupPlan, LoRABatch, LoRABatchBuffers, TokenMerges, plan_groups, split_passes
from loraplex.adapters.ops.probe import ProbedBackend, ProbeReport, probe_backend
from loraplex.adapters.ops.torch_ops import TorchLoRABackend

__all__ = ["BACKEND_ENV", "GroupPlan", "LoRABackend", "LoRABatch", "LoRABatchBuffers", "ProbeReport", "TokenMerges",
           "get_backend", "get_backend_named", "lora_apply", "plan_groups", "probe_lora_backend", "split_passes"]

logger = logging.getLogger(__name__)

BACKEND_ENV = "LORAPLEX_LORA_BACKEND"
BACKENDS = ("torch", "triton")


def get_backend_named(name: str, device_type: str = "cuda") -> LoRABackend:
    """A new backend `name` ("torch" | "triton") for tensors on `device_type`; not cached, not logged (tests
    and benchmarks pick one directly). Triton runs on CUDA, or on CPU when TRITON_INTERPRET=1 was set before
    triton_ops was first imported (the interpreter is chosen when the kernels are decorated)."""
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "torch":
        return TorchLoRABackend()
    if device_type != "cuda" and not (device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(f"{BACKEND_ENV}=triton needs a CUDA device, or TRITON_INTERPRET=1 to run the kernels on "
                           f"the CPU; tensors here are on {device_type!r}")
    from loraplex.adapters.ops.triton_ops import TritonLoRABackend  # lazily: CPU runs never import triton

    return TritonLoRABackend()


def _default_backend(device_type: str) -> str:
    """triton on CUDA when it imports, torch everywhere else (a CPU run does not even try the import)."""
    if device_type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        logger.warning("triton does not import (%s): the LoRA ops fall back to torch on CUDA", exc)
        return "torch"
    return "triton"


@functools.cache
def _backend_for(device_type: str, requested: str) -> LoRABackend:
    # Keyed by the override too: a test that sets LORAPLEX_LORA_BACKEND (monkeypatch) gets its own entry and
    # the next test, without it, gets the default again.
    backend = get_backend_named(requested or _default_backend(device_type), device_type)
    logger.info("LoRA ops backend for device type %r: %s", device_type, backend.name)
    return backend


# Probed backends, by the same key as _backend_for: what get_backend answers once the engine probed.
_probed: dict[tuple[str, str], LoRABackend] = {}


def _key(device: torch.device | str) -> tuple[str, str]:
    return torch.device(device).type, os.environ.get(BACKEND_ENV, "").strip().lower()


def get_backend(device: torch.device | str) -> LoRABackend:
    """The LoRA kernel backend for `device`; chosen (and logged) once per device type (and override), then
    the probed one (per-form fallbacks) once an engine probed it."""
    key = _key(device)
    return _probed.get(key) or _backend_for(*key)


def probe_lora_backend(device: torch.device, shapes: set[tuple[int, int]], dtype: torch.dtype,
                       max_rank: int) -> ProbeReport:
    """Probe the backend chosen for `device` at the model's layer shapes (in, out), dtype and rank bound, in
    every kernel form (probe.py; on a GPU this also compiles every kernel variant before serving); forms that
    fail or differ fall back to the torch ops from now on. Logs the outcome; the torch ops need no probe."""
    key = _key(device)
    chosen = _backend_for(*key)
    if isinstance(chosen, TorchLoRABackend):
        return ProbeReport(chosen.name, {})
    report = probe_backend(chosen, shapes, dtype, device, max_rank)
    for form, problem in report.problems.items():
        if problem is not None:
            logger.warning("LoRA ops: %s refused for the %s form (%s); that form runs on the torch ops",
                           chosen.name, form, problem)
    previous = _probed.get(key)
    failed = report.failed() | (previous.failed if isinstance(previous, ProbedBackend) else set())
    _probed[key] = ProbedBackend(chosen, failed)
    logger.info("LoRA ops on %s, %s: %s (%s)", key[0], dtype, _probed[key].name, report.summary())
    return report


def lora_apply(y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
               batch: LoRABatch, rank: int, slot_ranks: torch.Tensor) -> None:
    """y += the LoRA delta of one layer for every token, in place. Semantics, as a loop:

        for t in range(T):
            s = batch.token_slots[t]
            if s >= 0:
                y[t] += B[s, :rank].T @ (A[s, :rank] @ x[t])
    and a merged token (a linear merge) adds w_k * B[s_k, :rank].T @ (A[s_k, :rank] @ x[t]) for each of its
    adapters' (slot s_k, weight w_k): the batch's passes (batch.py), run one after the other.
    x: [T, in]; y: [T, out]; a_stack: [S + 1, R_max, in]; b_stack: [S + 1, R_max, out] (B transposed, the
    adapter's scale folded in, zeros past each slot's own rank); rank: the step's bound for this layer;
    slot_ranks: [S + 1] int32, each slot's own rank for this layer (<= rank for the step's slots), where a
    backend may stop instead of computing the zeros up to `rank`. Only host-side shape checks here (no sync).
    """
    t = batch.num_tokens
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != t or y.shape[0] != t:
        raise ValueError(f"expected x [{t}, in] and y [{t}, out], got {tuple(x.shape)} and {tuple(y.shape)}")
    if a_stack.shape[:2] != b_stack.shape[:2] or not 0 < rank <= a_stack.shape[1]:
        raise ValueError(f"stacks A{tuple(a_stack.shape)} B{tuple(b_stack.shape)} do not fit rank {rank}")
    if tuple(slot_ranks.shape) != (a_stack.shape[0],):
        raise ValueError(f"expected slot_ranks [{a_stack.shape[0]}], got {tuple(slot_ranks.shape)}")
    if any(p.num_tokens != t for p in batch.passes):
        raise ValueError(f"every pass of a batch covers the same {t} tokens")
    backend = get_backend(x.device)
    for part in (batch, *batch.passes):
        backend.apply(y, x, a_stack, b_stack, part, rank, slot_ranks)
