"""The batched LoRA ops (both variants, auto, fused apply) against their per-token loop twins."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import pytest
import torch

from loraplex.adapters import ops
from loraplex.adapters.ops import LoRABackend, get_backend, lora_apply, lora_expand, lora_shrink, torch_ops
from loraplex.adapters.ops.meta import LoRAMeta
from loraplex.adapters.ops.reference import ref_lora_expand, ref_lora_shrink
from loraplex.adapters.ops.torch_ops import TorchLoRABackend

IN_FEATURES, OUT_FEATURES, R_MAX = 12, 10, 8
# Slot s gets RANK_PATTERN[s]: mixed ranks, two empty (rank-0) slots, one at r_max, the rest below it.
RANK_PATTERN = (5, 0, 3, 1, 8, 2, 0, 6)
LAYOUTS = ("grouped", "interleaved", "random", "base_only")
MODES = ("sgmv", "bgmv", "auto")
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 1e-1, "rtol": 2e-2}}


@dataclass(frozen=True)
class Case:
    x: torch.Tensor  # [T, in]
    y0: torch.Tensor  # [T, out], the base output the ops add into
    a_stack: torch.Tensor  # [S, R_MAX, in], NaN beyond each slot's rank
    b_stack: torch.Tensor  # [S, out, R_MAX], NaN beyond each slot's rank
    ranks: list[int]
    meta: LoRAMeta

    @property
    def untouched_rows(self) -> torch.Tensor:
        """[T] bool: tokens that must keep y0 (base-only, or a rank-0 slot)."""
        slots = self.meta.token_slots.tolist()
        return torch.tensor([s < 0 or self.ranks[s] == 0 for s in slots], dtype=torch.bool)


def token_slots(layout: str, n_tokens: int, n_slots: int, rng: random.Random) -> list[int]:
    """Per-token slot ids (-1 = base only) in one of the LAYOUTS."""
    drawn = [rng.randrange(-1, n_slots) for _ in range(n_tokens)]
    if layout == "grouped":
        return sorted(drawn)  # contiguous runs: few segments
    if layout == "interleaved":
        return [t % (n_slots + 1) - 1 for t in range(n_tokens)]  # -1, 0, 1, ..., -1, 0, ...: decode-like
    if layout == "random":
        return drawn
    return [-1] * n_tokens


def garbage_beyond_rank(a_stack: torch.Tensor, b_stack: torch.Tensor, ranks: list[int]) -> None:
    """NaN in A[s, r:, :] and B[s, :, r:]: any op that reads past an adapter's rank yields NaN."""
    for slot, rank in enumerate(ranks):
        a_stack[slot, rank:] = float("nan")
        b_stack[slot, :, rank:] = float("nan")


def make_case(
    n_tokens: int,
    n_slots: int,
    layout: str,
    dtype: torch.dtype,
    x_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    ranks = list(RANK_PATTERN[:n_slots])
    a_stack = torch.randn(n_slots, R_MAX, IN_FEATURES, generator=gen).to(dtype)
    b_stack = torch.randn(n_slots, OUT_FEATURES, R_MAX, generator=gen).to(dtype)
    garbage_beyond_rank(a_stack, b_stack, ranks)
    io_dtype = x_dtype or dtype
    x = torch.randn(n_tokens, IN_FEATURES, generator=gen).to(io_dtype)
    y0 = torch.randn(n_tokens, OUT_FEATURES, generator=gen).to(io_dtype)
    meta = LoRAMeta.from_slots(token_slots(layout, n_tokens, n_slots, random.Random(seed)))
    return Case(x, y0, a_stack, b_stack, ranks, meta)


def check_all_ops(case: Case, mode: str, tol: dict[str, float]) -> None:
    """shrink, expand (fed the oracle's h) and apply each equal the loop twins; untouched rows exact."""
    h_ref = ref_lora_shrink(case.x, case.a_stack, case.ranks, case.meta)
    torch.testing.assert_close(lora_shrink(case.x, case.a_stack, case.ranks, case.meta, mode=mode), h_ref, **tol)
    y_ref = case.y0.clone()
    ref_lora_expand(y_ref, h_ref, case.b_stack, case.ranks, case.meta)
    y_expand, y_apply = case.y0.clone(), case.y0.clone()
    lora_expand(y_expand, h_ref, case.b_stack, case.ranks, case.meta, mode=mode)
    lora_apply(y_apply, case.x, case.a_stack, case.b_stack, case.ranks, case.meta, mode=mode)
    keep = case.untouched_rows
    for y in (y_expand, y_apply):
        torch.testing.assert_close(y, y_ref, **tol)
        assert torch.equal(y[keep], case.y0[keep])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_slots", [1, 3, 8])
@pytest.mark.parametrize("n_tokens", [0, 1, 7, 64])
def test_ops_match_loop_twin(n_tokens: int, n_slots: int, layout: str, dtype: torch.dtype, mode: str) -> None:
    case = make_case(n_tokens, n_slots, layout, dtype, seed=n_tokens * 31 + n_slots)
    check_all_ops(case, mode, TOLERANCES[dtype])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("stack_dtype", "io_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_mixed_dtypes_compute_in_stack_dtype(stack_dtype: torch.dtype, io_dtype: torch.dtype, mode: str) -> None:
    """x is cast to the stacks' dtype; y keeps its own dtype (QLoRA: fp32 LoRA beside a bf16 base, etc.)."""
    case = make_case(64, 8, "random", stack_dtype, x_dtype=io_dtype, seed=7)
    assert lora_shrink(case.x, case.a_stack, case.ranks, case.meta, mode=mode).dtype == stack_dtype
    check_all_ops(case, mode, TOLERANCES[torch.bfloat16])
    y = case.y0.clone()
    lora_apply(y, case.x, case.a_stack, case.b_stack, case.ranks, case.meta, mode=mode)
    assert y.dtype == io_dtype


@pytest.mark.parametrize("mode", MODES)
def test_garbage_beyond_rank_and_in_empty_slots_is_never_read(mode: str) -> None:
    """Slicing proof: NaN past each rank (and all over rank-0 slots) in the stacks; results stay finite."""
    case = make_case(64, 8, "random", torch.float32, seed=3)
    assert torch.isnan(case.a_stack[1]).all() and torch.isnan(case.b_stack[6]).all()  # rank-0 slots
    assert torch.isnan(case.a_stack[2, 3:]).all() and torch.isnan(case.b_stack[0, :, 5:]).all()
    h = lora_shrink(case.x, case.a_stack, case.ranks, case.meta, mode=mode)
    y = case.y0.clone()
    lora_apply(y, case.x, case.a_stack, case.b_stack, case.ranks, case.meta, mode=mode)
    assert torch.isfinite(h).all() and torch.isfinite(y).all()
    assert y.ne(case.y0).any()  # adapters did contribute: the check above is not vacuous


@pytest.mark.parametrize("mode", MODES)
def test_each_matmul_runs_at_the_slots_own_rank(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Every per-slot matmul is sliced to ranks[slot] (never r_max), and rank-0 slots get none at all."""
    case = make_case(64, 8, "random", torch.float32, seed=9)
    calls: list[tuple[int, int]] = []
    for name in ("_shrink_rows", "_scatter_add_rows", "_accumulate_rows"):
        original = getattr(torch_ops, name)

        def spy(*args: object, _f=original) -> object:
            calls.append(args[-2:])  # (slot, rank): the last two arguments of every helper
            return _f(*args)

        monkeypatch.setattr(torch_ops, name, spy)
    y = case.y0.clone()
    lora_expand(
        y,
        lora_shrink(case.x, case.a_stack, case.ranks, case.meta, mode=mode),
        case.b_stack,
        case.ranks,
        case.meta,
        mode=mode,
    )
    lora_apply(y, case.x, case.a_stack, case.b_stack, case.ranks, case.meta, mode=mode)
    used = {s for s in case.meta.active_slots if case.ranks[s] > 0}
    assert {slot for slot, _ in calls} == used and 0 in case.meta.active_slots  # slot 0 is rank 5 < r_max
    assert all(rank == case.ranks[slot] for slot, rank in calls)
    assert 1 in case.meta.active_slots and case.ranks[1] == 0  # a rank-0 slot was present and skipped


@pytest.mark.parametrize("mode", MODES)
def test_only_last_slot_present(mode: str) -> None:
    """Slots absent from the batch (empty slot_tokens / no segments) cost nothing and change nothing."""
    case = make_case(16, 8, "base_only", torch.float32, seed=5)
    meta = LoRAMeta.from_slots([-1] * 4 + [7] * 8 + [-1] * 4)
    check_all_ops(Case(case.x, case.y0, case.a_stack, case.b_stack, case.ranks, meta), mode, TOLERANCES[torch.float32])


def test_base_only_batch_gives_zero_h_and_untouched_y() -> None:
    case = make_case(7, 3, "base_only", torch.float32)
    assert not lora_shrink(case.x, case.a_stack, case.ranks, case.meta).any()
    y = case.y0.clone()
    lora_apply(y, case.x, case.a_stack, case.b_stack, case.ranks, case.meta)
    assert torch.equal(y, case.y0)


@pytest.mark.parametrize("gather", [False, True])
def test_base_class_unfused_apply_matches_fused(gather: bool) -> None:
    """LoRABackend.apply's default (shrink + expand through h) agrees with the torch backend's fused path."""
    case = make_case(64, 8, "random", torch.float32, seed=11)
    backend = TorchLoRABackend()
    y_default, y_fused = case.y0.clone(), case.y0.clone()
    LoRABackend.apply(backend, y_default, case.x, case.a_stack, case.b_stack, case.ranks, case.meta, gather)
    backend.apply(y_fused, case.x, case.a_stack, case.b_stack, case.ranks, case.meta, gather)
    torch.testing.assert_close(y_default, y_fused, **TOLERANCES[torch.float32])


@pytest.mark.parametrize(("layout", "expected"), [("grouped", "shrink_sgmv"), ("interleaved", "shrink_bgmv")])
def test_auto_gathers_only_for_fragmented_batches(monkeypatch: pytest.MonkeyPatch, layout: str, expected: str) -> None:
    case = make_case(64, 3, layout, torch.float32, seed=2)
    assert case.meta.is_fragmented == (expected == "shrink_bgmv")
    called: list[str] = []
    for name in ("shrink_sgmv", "shrink_bgmv"):
        original = getattr(TorchLoRABackend, name)
        monkeypatch.setattr(
            TorchLoRABackend, name, lambda self, *a, _n=name, _f=original: (called.append(_n), _f(self, *a))
        )
    lora_shrink(case.x, case.a_stack, case.ranks, case.meta)
    assert called == [expected]


def test_no_host_sync_on_meta_device() -> None:
    """Tensors on the 'meta' device have no data: any .item()/.tolist() in the ops would raise."""
    case = make_case(16, 3, "random", torch.float32, seed=4)
    meta = LoRAMeta.from_slots(case.meta.token_slots.tolist(), device="meta")
    x, a, b = (t.to("meta") for t in (case.x, case.a_stack, case.b_stack))
    y = case.y0.to("meta")
    for mode in ("sgmv", "bgmv"):
        h = lora_shrink(x, a, case.ranks, meta, mode=mode)
        lora_expand(y, h, b, case.ranks, meta, mode=mode)
        lora_apply(y, x, a, b, case.ranks, meta, mode=mode)
    assert h.shape == (16, R_MAX) and h.device.type == "meta"


def test_get_backend_is_torch_chosen_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
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
    case = make_case(7, 3, "random", torch.float32, seed=1)
    x, a, b, ranks, meta = case.x, case.a_stack, case.b_stack, case.ranks, case.meta
    with pytest.raises(ValueError, match="mode must be one of"):
        lora_shrink(x, a, ranks, meta, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one rank per slot"):
        lora_shrink(x, a, ranks[:2], meta)
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, 8\]"):
        lora_shrink(x, a, [9, 0, 3], meta)
    with pytest.raises(ValueError, match=r"expected \[7, features\] rows"):
        lora_shrink(x[:5], a, ranks, meta)
    with pytest.raises(ValueError, match="meta uses slot 5 but there are only 3 slots"):
        lora_shrink(torch.zeros(1, IN_FEATURES), a, ranks, LoRAMeta.from_slots([5]))
    with pytest.raises(ValueError, match=r"h must be \[7, 8\]"):
        lora_expand(case.y0.clone(), torch.zeros(7, 4), b, ranks, meta)
