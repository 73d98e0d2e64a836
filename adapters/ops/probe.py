"""Start-up probe of a LoRA kernel backend, per kernel form, against the torch ops; the fallback per form.

A backend other than torch (triton on CUDA) is run at engine start on small random inputs at the model's real
layer widths, in every kernel form the engine can launch, and compared with `TorchLoRABackend`. A form that
raises (it does not compile for this GPU, the driver refuses it) or differs is logged with the reason and runs
on the torch ops from then on; the others keep the fast kernels. No request ever fails for it.

Forms (what a step's `LoRABatch` looks like; each is a set of kernel variants):
  decode    grid depth 1: the gather form of padded decode steps (CUDA graphs), and grouped steps whose
            slots hold one token each (BLOCK_M 16, the long K/N tiles)
  segments  depth > 1, no row weights: prefill chunks and mixed steps (BLOCK_M 16 / 32 / 64 by depth)
  weighted  row weights (the passes of linear merges), at any depth
The probe's cases cover every constexpr of every form (depths 1, 2, 17, 33) at each distinct layer shape, so
on a GPU it also compiles every variant the engine will launch before the first request (the runtime ints do
not specialise: triton_ops.py), which tests/gpu_aot checks on the CPU by recording the launches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from loraplex.adapters.ops.base import LoRABackend
from loraplex.adapters.ops.batch import GroupPlan, LoRABatch, LoRABatchBuffers, plan_groups
from loraplex.adapters.ops.torch_ops import TorchLoRABackend

log = logging.getLogger(__name__)

FORMS = ("decode", "segments", "weighted")
SEGMENT_DEPTHS = (2, 17, 33)  # one per BLOCK_M (16, 32, 64) of the grouped forms
PROBE_SLOTS = 2  # two adapters per case: every grid has two groups
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 3e-2), torch.float16: (1e-2, 1e-2)}


def form_of(batch: LoRABatch) -> str:
    """The kernel form a batch (one pass) runs in."""
    if batch.row_weights is not None:
        return "weighted"
    return "decode" if batch.depth == 1 else "segments"


@dataclass(frozen=True)
class ProbeCase:
    """One launch of the probe: a grid of two slots' tokens (`depth` rows per group), weighted or not."""

    form: str
    depth: int

    def plan(self) -> tuple[list[int], GroupPlan]:
        """Token slots and the grid: slot 0 holds `depth` tokens, slot 1 one fewer (a padding row)."""
        if self.depth == 1:
            slots = [0, 1, -1]  # a base-only row on the null slot, as a padded decode step has
            return slots, plan_groups(slots, gather=True, null_slot=PROBE_SLOTS)
        slots = [0] * self.depth + [1] * (self.depth - 1)
        return slots, plan_groups(slots, gather=False, null_slot=PROBE_SLOTS)


CASES = (ProbeCase("decode", 1), *(ProbeCase("segments", d) for d in SEGMENT_DEPTHS),
         *(ProbeCase("weighted", d) for d in (1, *SEGMENT_DEPTHS)))


@dataclass
class ProbeReport:
    """Per form: None when the backend matched the torch ops on every case, else why it did not."""

    backend: str
    problems: dict[str, str | None] = field(default_factory=dict)

    def failed(self) -> set[str]:
        return {form for form, problem in self.problems.items() if problem is not None}

    def summary(self) -> str:
        return ", ".join(f"{form} {'ok' if p is None else 'torch fallback'}" for form, p in self.problems.items())


def probe_backend(backend: LoRABackend, shapes: Iterable[tuple[int, int]], dtype: torch.dtype,
                  device: torch.device, max_rank: int) -> ProbeReport:
    """Run `backend` on every case at each layer shape (in, out) and compare with the torch ops."""
    report = ProbeReport(backend.name, dict.fromkeys(FORMS))
    for n_in, n_out in sorted(set(shapes)):
        for case in CASES:
            if report.problems[case.form] is not None:
                continue  # this form already falls back: nothing more to learn from it
            report.problems[case.form] = _run_case(backend, case, n_in, n_out, dtype, device, max_rank)
    return report


def case_inputs(case: ProbeCase, n_in: int, n_out: int, dtype: torch.dtype, device: torch.device, max_rank: int,
                *, values: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoRABatch, torch.Tensor]:
    """(y, x, A stack, B stack, batch, slot ranks) of one case at layer shape in -> out, seeded: slot 0 holds
    rank `max_rank`, slot 1 half of it (zeros past it, as slots hold them), slot 2 is the null slot.
    `values=False`: uninitialised tensors of the same shapes (recording launches: tests/gpu_aot)."""
    gen = torch.Generator().manual_seed(case.depth)
    slots, plan = case.plan()
    weights = [0.5 + 0.25 * (t % 3) for t in range(len(slots))] if case.form == "weighted" else None
    batch = LoRABatchBuffers(device, capacity=len(plan.rows)).fill(slots, plan, {"probe": max_rank}, weights)

    def rand(*shape: int) -> torch.Tensor:
        if not values:
            return torch.empty(*shape, dtype=dtype, device=device)
        return (torch.randn(*shape, generator=gen) * 0.1).to(device, dtype)

    x, y = rand(len(slots), n_in), rand(len(slots), n_out)
    a, b = rand(PROBE_SLOTS + 1, max_rank, n_in), rand(PROBE_SLOTS + 1, max_rank, n_out)
    half = max(1, max_rank // 2)
    for stack in (a, b):
        stack[PROBE_SLOTS].zero_()
        stack[1, half:].zero_()
    ranks = torch.tensor([max_rank, half, 0], dtype=torch.int32, device=device)
    return y, x, a, b, batch, ranks


def _run_case(backend: LoRABackend, case: ProbeCase, n_in: int, n_out: int, dtype: torch.dtype,
              device: torch.device, max_rank: int) -> str | None:
    y, x, a, b, batch, ranks = case_inputs(case, n_in, n_out, dtype, device, max_rank)
    want = y.clone()
    TorchLoRABackend().apply(want, x, a, b, batch, max_rank, ranks)
    got = y.clone()
    where = f"{case.form} form (depth {case.depth}, layer {n_in}->{n_out}, {dtype})"
    try:
        backend.apply(got, x, a, b, batch, max_rank, ranks)
        err = (got.float() - want.float()).abs().max().item()  # a sync: the probe runs once, at start
    except Exception as exc:  # noqa: BLE001 - any failure means "not this backend for this form"; logged
        return f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    atol, rtol = TOLERANCE.get(dtype, (1e-2, 1e-2))
    limit = atol + rtol * want.float().abs().max().item()
    if not err <= limit:  # also catches NaN
        return f"{where}: differs from the torch ops by {err:.3g} (allowed {limit:.3g})"
    return None


class ProbedBackend(LoRABackend):
    """`primary` for the forms that passed the probe, the torch ops for the others. A form whose launch raises
    later (it should not: the probe compiled it) moves to the torch ops too, before anything was written to y
    (a launch fails before its kernel runs, and the expand kernel, the only writer of y, runs last)."""

    def __init__(self, primary: LoRABackend, failed: set[str]) -> None:
        self.primary = primary
        self.fallback = TorchLoRABackend()
        self.failed = set(failed)
        self.name = primary.name if not failed else f"{primary.name} (torch ops for {', '.join(sorted(failed))})"

    def apply(self, y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
              batch: LoRABatch, rank: int, slot_ranks: torch.Tensor) -> None:
        form = form_of(batch)
        if form not in self.failed:
            try:
                self.primary.apply(y, x, a_stack, b_stack, batch, rank, slot_ranks)
                return
            except Exception:  # noqa: BLE001 - serve on the torch ops rather than fail the step's requests
                log.exception("LoRA ops: %s failed in the %s form; that form uses the torch ops from now on",
                              self.primary.name, form)
                self.failed.add(form)
                self.name = f"{self.primary.name} (torch ops for {', '.join(sorted(self.failed))})"
        self.fallback.apply(y, x, a_stack, b_stack, batch, rank, slot_ranks)
