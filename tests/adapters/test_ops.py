"""The fused LoRA op and its per-step layout against the per-token loop twin."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from loraplex.adapters import ops
from loraplex.adapters.context import LoRABatchContext
from loraplex.adapters.layer import MultiLoRALinear
from loraplex.adapters.ops import LoRABackend, LoRABatchBuffers, get_backend, get_backend_named, lora_apply, plan_groups
from loraplex.adapters.ops.batch import COMPACT_SLACK
from loraplex.adapters.ops.reference import ref_lora_apply
from loraplex.adapters.ops.torch_ops import TorchLoRABackend
from loraplex.adapters.ops.trace import HostSyncError, OpTrace

IN_FEATURES, OUT_FEATURES, R_MAX = 12, 10, 8
# Slot s holds an adapter of rank RANK_PATTERN[s] (0: the slot is empty); the last slot is the null slot.
RANK_PATTERN = (5, 0, 3, 1, 8, 2, 0, 6)
LAYOUTS = ("grouped", "interleaved", "random", "skewed", "base_only")
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 1e-1, "rtol": 2e-2}}


@dataclass(frozen=True)
class Case:
    x: torch.Tensor  # [T, in]
    y0: torch.Tensor  # [T, out], the base output the op adds into
    a_stack: torch.Tensor  # [S + 1, R_MAX, in], zeros past each slot's rank and in the null slot
    b_stack: torch.Tensor  # [S + 1, R_MAX, out]
    slots: list[int]

    @property
    def null_slot(self) -> int:
        return self.a_stack.shape[0] - 1

    @property
    def slot_ranks(self) -> torch.Tensor:
        """[S + 1] int32, what MultiLoRALinear.lora_ranks holds for these stacks (the null slot: 0)."""
        return torch.tensor([*RANK_PATTERN[: self.null_slot], 0], dtype=torch.int32)


def token_slots(layout: str, n_tokens: int, n_slots: int, rng: random.Random) -> list[int]:
    """Per-token slot ids (-1 = base only) in one of the LAYOUTS."""
    drawn = [rng.randrange(-1, n_slots) for _ in range(n_tokens)]
    if layout == "grouped":
        return sorted(drawn)  # contiguous runs: prefill-like
    if layout == "interleaved":
        return [t % (n_slots + 1) - 1 for t in range(n_tokens)]  # -1, 0, 1, ..., -1, 0, ...: decode-like
    if layout == "random":
        return drawn
    if layout == "skewed":  # one slot holds most tokens: the grouped form must split it, not pad to it
        return [0 if rng.random() < 0.8 else rng.randrange(n_slots) for _ in range(n_tokens)]
    return [-1] * n_tokens


def make_case(n_tokens: int, n_slots: int, layout: str, dtype: torch.dtype, x_dtype: torch.dtype | None = None,
              seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    a_stack = torch.randn(n_slots + 1, R_MAX, IN_FEATURES, generator=gen)
    b_stack = torch.randn(n_slots + 1, R_MAX, OUT_FEATURES, generator=gen)
    for slot in range(n_slots + 1):  # what MultiLoRALinear.set_slot / clear_slot leave behind
        rank = RANK_PATTERN[slot] if slot < n_slots else 0
        a_stack[slot, rank:] = 0
        b_stack[slot, rank:] = 0
    io_dtype = x_dtype or dtype
    x = torch.randn(n_tokens, IN_FEATURES, generator=gen).to(io_dtype)
    y0 = torch.randn(n_tokens, OUT_FEATURES, generator=gen).to(io_dtype)
    slots = token_slots(layout, n_tokens, n_slots, random.Random(seed))
    return Case(x, y0, a_stack.to(dtype), b_stack.to(dtype), slots)


def batch_for(case: Case, gather: bool, buffers: LoRABatchBuffers | None = None, rank: int = R_MAX):
    plan = plan_groups(case.slots, gather=gather, null_slot=case.null_slot)
    if plan is None:
        return None
    return (buffers or LoRABatchBuffers(torch.device("cpu"), capacity=4)).fill(case.slots, plan, {"q": rank})


def run(case: Case, gather: bool, rank: int = R_MAX) -> torch.Tensor:
    y = case.y0.clone()
    batch = batch_for(case, gather, rank=rank)
    if batch is not None:
        lora_apply(y, case.x, case.a_stack, case.b_stack, batch, rank, case.slot_ranks)
    return y


def reference(case: Case, rank: int = R_MAX) -> torch.Tensor:
    y = case.y0.clone()
    ref_lora_apply(y, case.x, case.a_stack, case.b_stack, case.slots, rank)
    return y


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_tokens", [1, 7, 64])
def test_apply_matches_loop_fp32(layout: str, n_tokens: int, gather: bool) -> None:
    case = make_case(n_tokens, 8, layout, torch.float32, seed=n_tokens)
    torch.testing.assert_close(run(case, gather), reference(case), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_apply_matches_loop_bf16_stacks(x_dtype: torch.dtype, gather: bool) -> None:
    """bf16 stacks with bf16 or fp32 activations (a QLoRA-style base computing in fp32); y keeps its dtype."""
    case = make_case(32, 8, "random", torch.bfloat16, x_dtype=x_dtype, seed=3)
    got = run(case, gather)
    assert got.dtype == x_dtype
    torch.testing.assert_close(got, reference(case), **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("gather", [False, True])
def test_any_rank_bound_at_least_the_adapters_gives_the_same_delta(gather: bool) -> None:
    """Zeros past each slot's rank: a step bound of 6 (the largest rank present) equals the full R_MAX."""
    case = make_case(24, 8, "random", torch.float32, seed=9)
    case = Case(case.x, case.y0, case.a_stack, case.b_stack, [s if RANK_PATTERN[s] <= 6 else 0 for s in case.slots])
    torch.testing.assert_close(run(case, gather, rank=6), run(case, gather, rank=R_MAX), atol=1e-6, rtol=1e-6)


def test_base_only_tokens_are_untouched_and_an_all_base_step_has_no_batch() -> None:
    case = make_case(9, 8, "interleaved", torch.float32, seed=2)
    for gather in (False, True):
        got = run(case, gather)
        base_rows = torch.tensor([s < 0 or RANK_PATTERN[s] == 0 for s in case.slots])
        assert torch.equal(got[base_rows], case.y0[base_rows])
    assert plan_groups([-1] * 5, gather=False, null_slot=8) is None
    assert plan_groups([-1] * 5, gather=True, null_slot=8) is None


@pytest.mark.parametrize("layout", ["grouped", "random", "skewed", "interleaved"])
@pytest.mark.parametrize("n_tokens", [1, 5, 16, 200])
def test_grouped_plan_bounds(layout: str, n_tokens: int) -> None:
    """Every adapted token is computed exactly once; G <= 2U groups; G*D <= 2N + U rows; padding rows repeat
    their group's first token; a group holds one slot."""
    slots = token_slots(layout, n_tokens, 8, random.Random(n_tokens))
    plan = plan_groups(slots, gather=False, null_slot=8)
    adapted = [t for t, s in enumerate(slots) if s >= 0]
    if not adapted:
        assert plan is None
        return
    distinct = len({slots[t] for t in adapted})
    g, d = len(plan.group_slots), plan.depth
    assert len(plan.rows) == g * d == len(plan.valid)
    assert sorted(r for r, ok in zip(plan.rows, plan.valid, strict=True) if ok) == adapted
    assert g <= 2 * distinct and g * d <= max(COMPACT_SLACK * len(adapted), 2 * len(adapted) + distinct)
    for i, (row, ok) in enumerate(zip(plan.rows, plan.valid, strict=True)):
        group = i // d
        assert slots[row] == plan.group_slots[group]
        if not ok:
            assert row == plan.rows[group * d]


def test_window_form_only_for_a_dense_slot_range_with_little_padding() -> None:
    dense = plan_groups([5, 3, 4, 3, -1, 5, 4], gather=False, null_slot=8)
    assert (dense.window_lo, dense.group_slots, dense.depth) == (3, [3, 4, 5], 2)
    assert dense.rows == [1, 3, 2, 6, 0, 5]
    holes = plan_groups([0, 2, 0, 2, 5], gather=False, null_slot=8)  # slots 1, 3, 4 are holes: gather each once
    assert (holes.window_lo, holes.group_slots, holes.depth) == (None, [0, 2, 5], 2)
    skewed = plan_groups([0] * 30 + list(range(1, 8)), gather=False, null_slot=8)  # 8 x 30 rows for 37 tokens
    assert skewed.window_lo is None and len(skewed.group_slots) > 8 and len(skewed.rows) <= 2 * 37 + 8


def test_gather_plan_covers_every_token_with_the_null_slot_for_base_tokens() -> None:
    plan = plan_groups([3, -1, 0, 3], gather=True, null_slot=8)
    assert (plan.rows, plan.group_slots, plan.depth) == ([0, 1, 2, 3], [3, 8, 0, 3], 1)


@pytest.mark.parametrize("gather", [False, True])
def test_a_nan_adapter_or_a_nan_token_pollutes_only_itself(gather: bool) -> None:
    """Padding rows repeat a real token of their own group with zeroed input: an inf/NaN token or a NaN
    adapter never reaches another token's row (isolation, DESIGN)."""
    case = make_case(16, 8, "skewed", torch.float32, seed=4)
    x = case.x.clone()
    bad_token = case.slots.index(0)
    x[bad_token] = float("inf")
    a = case.a_stack.clone()
    bad_slot = next(s for s in case.slots if s > 0 and RANK_PATTERN[s] > 0)
    a[bad_slot, 0, 0] = float("nan")
    poisoned = Case(x, case.y0, a, case.b_stack, case.slots)
    got, want = run(poisoned, gather), run(case, gather)
    hit = [t for t, s in enumerate(case.slots) if t == bad_token or s == bad_slot]
    healthy = [t for t in range(16) if t not in hit]
    assert not torch.isfinite(got[hit]).all(dim=-1).any()
    torch.testing.assert_close(got[healthy], want[healthy], atol=1e-6, rtol=1e-6)


def _dispatched(case: Case, gather: bool) -> OpTrace:
    batch = batch_for(case, gather)
    y = case.y0.clone()
    with OpTrace() as trace:
        lora_apply(y, case.x, case.a_stack, case.b_stack, batch, R_MAX, case.slot_ranks)
    return trace


def test_op_sequence_is_the_same_for_every_mix() -> None:
    """Eager forms: one of two fixed sequences (7 ops gathering A/B, 5 reading a dense slot range in place) for
    1 adapter or many, interleaved or grouped; gather form: the same ops AND shapes for any assignment of the
    same token count (what a captured graph replays)."""
    mixes = [make_case(16, 8, layout, torch.float32, seed=1) for layout in ("grouped", "interleaved", "skewed")]
    mixes.append(Case(*[getattr(mixes[0], f) for f in ("x", "y0", "a_stack", "b_stack")], [4] * 16))
    gathered_seq = ["aten.index_select", "aten.masked_fill_", "aten.index_select", "aten.index_select", "aten.bmm",
                    "aten.bmm", "aten.index_add_"]
    window_seq = gathered_seq[:2] + gathered_seq[4:]  # only the x rows are gathered; A/B are read in place
    eager = [_dispatched(c, False).compute for c in mixes]
    assert all(ops_ in (gathered_seq, window_seq) for ops_ in eager), eager
    assert eager[3] == window_seq  # one slot: a dense range of one
    gathered = [_dispatched(c, True).shapes for c in mixes]
    assert all(ops_ == gathered[0] for ops_ in gathered)


def test_op_trace_refuses_host_syncs() -> None:
    with pytest.raises(HostSyncError, match="_local_scalar_dense"), OpTrace():
        torch.ones(3).sum().item()
    with OpTrace(forbid_sync=False) as trace:
        torch.arange(4).tolist()
        torch.arange(4).nonzero()
    assert trace.syncs == ["Tensor.tolist", "aten.nonzero"]
    assert torch.arange(2).tolist() == [0, 1]  # restored on exit


def test_buffers_are_reused_and_grow_when_a_step_needs_more() -> None:
    buffers = LoRABatchBuffers(torch.device("cpu"), capacity=4)
    small = batch_for(make_case(3, 8, "random", torch.float32, seed=1), True, buffers)
    big = batch_for(make_case(40, 8, "random", torch.float32, seed=2), True, buffers)
    again = batch_for(make_case(5, 8, "random", torch.float32, seed=3), True, buffers)
    assert buffers.capacity >= 40 and big.num_tokens == 40
    assert again.rows.data_ptr() == big.rows.data_ptr()  # the same storage, refilled
    assert small.num_groups == 3


def test_no_host_sync_on_meta_device() -> None:
    """Tensors on the 'meta' device have no data: any .item()/.tolist() in the op would raise."""
    case = make_case(16, 8, "random", torch.float32, seed=4)
    batch = batch_for(case, False)
    meta = type(batch)(*(v.to("meta") if isinstance(v, torch.Tensor) else v for v in vars(batch).values()))
    x, a, b, y, r = (t.to("meta") for t in (case.x, case.a_stack, case.b_stack, case.y0, case.slot_ranks))
    lora_apply(y, x, a, b, meta, R_MAX, r)
    assert y.device.type == "meta"


def test_get_backend_is_torch_chosen_and_logged_once(caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    ops._backend_for.cache_clear()
    with caplog.at_level(logging.INFO, logger="loraplex.adapters.ops"):
        first = get_backend("cpu")
        assert get_backend(torch.device("cpu")) is first
    assert isinstance(first, TorchLoRABackend)
    assert [r.getMessage() for r in caplog.records] == ["LoRA ops backend for device type 'cpu': torch"]


def test_backend_is_abstract() -> None:
    with pytest.raises(TypeError):
        LoRABackend()  # type: ignore[abstract]


def test_invalid_inputs_raise_clear_errors() -> None:
    case = make_case(7, 8, "random", torch.float32, seed=1)
    batch = batch_for(case, True)
    ranks = case.slot_ranks
    with pytest.raises(ValueError, match=r"expected x \[7, in\]"):
        lora_apply(case.y0.clone(), case.x[:5], case.a_stack, case.b_stack, batch, R_MAX, ranks)
    with pytest.raises(ValueError, match="do not fit rank 9"):
        lora_apply(case.y0.clone(), case.x, case.a_stack, case.b_stack, batch, R_MAX + 1, ranks)
    with pytest.raises(ValueError, match="do not fit rank 0"):
        lora_apply(case.y0.clone(), case.x, case.a_stack, case.b_stack, batch, 0, ranks)
    with pytest.raises(ValueError, match=r"expected slot_ranks \[9\], got \(8,\)"):
        lora_apply(case.y0.clone(), case.x, case.a_stack, case.b_stack, batch, R_MAX, ranks[:8])


def test_backend_override_is_keyed_and_refusals_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    """LORAPLEX_LORA_BACKEND picks a backend per (device type, override), so setting it in one test does not
    leak into the next; an unknown name, or triton on a CPU without the interpreter, is refused by name."""
    monkeypatch.setenv(ops.BACKEND_ENV, "torch")
    assert isinstance(get_backend("cpu"), TorchLoRABackend)
    monkeypatch.setenv(ops.BACKEND_ENV, "cuda-graphs")
    with pytest.raises(ValueError, match="LORAPLEX_LORA_BACKEND='cuda-graphs': expected one of torch, triton"):
        get_backend("cpu")
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs a CUDA device, or TRITON_INTERPRET=1"):
        get_backend("cpu")
    with pytest.raises(RuntimeError, match="'meta'"):
        get_backend_named("triton", "meta")


def test_a_cpu_run_never_imports_the_triton_backend() -> None:
    """The triton module is imported only when chosen: a CPU process picking the default never loads it."""
    code = ("import sys; from loraplex.adapters.ops import get_backend; "
            "assert get_backend('cpu').name == 'torch'; "
            "assert 'loraplex.adapters.ops.triton_ops' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k != ops.BACKEND_ENV}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_layer_keeps_each_slots_own_rank() -> None:
    """MultiLoRALinear.lora_ranks [S + 1] int32: set_slot writes r, clear_slot 0; the null slot stays 0."""
    layer = MultiLoRALinear(torch.nn.Linear(6, 5), kind="q_proj", num_slots=3, max_rank=4,
                            context=LoRABatchContext(), dtype=torch.float32)
    layer.set_slot(0, torch.ones(3, 6), torch.ones(5, 3), 1.0)
    layer.set_slot(2, torch.ones(4, 6), torch.ones(5, 4), 1.0)
    assert (layer.lora_ranks.dtype, layer.lora_ranks.tolist()) == (torch.int32, [3, 0, 4, 0])
    layer.clear_slot(2)
    assert layer.lora_ranks.tolist() == [3, 0, 0, 0]
