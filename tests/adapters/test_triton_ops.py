# ruff: noqa: E402  (TRITON_INTERPRET must be set before triton_ops is imported)
"""The triton LoRA kernels against the per-token loop twin and the torch backend.

On a machine without CUDA they run in Triton's interpreter (TRITON_INTERPRET=1, read when the kernels are
decorated, so it is set before triton_ops is imported); shapes stay small so the file takes seconds there.
The `gpu` class runs the same comparisons on CUDA at real layer shapes.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from loraplex.adapters.context import LoRABatchContext
from loraplex.adapters.layer import MultiLoRALinear
from loraplex.adapters.ops import BACKEND_ENV, LoRABatch, LoRABatchBuffers, get_backend, plan_groups, triton_ops
from loraplex.adapters.ops.reference import ref_lora_apply
from loraplex.adapters.ops.torch_ops import TorchLoRABackend
from loraplex.adapters.ops.triton_ops import TritonLoRABackend, plan_launch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IN, OUT, R_MAX = 200, 72, 16  # IN: two k blocks of the GEMV path, four of the tl.dot path, both ragged
# Slot s holds an adapter of rank SLOT_RANKS[s] for this layer (0: empty); slot 6 is the null slot.
SLOT_RANKS = (4, 8, 16, 0, 12, 3)
NULL = len(SLOT_RANKS)
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 6e-2, "rtol": 3e-2},
       torch.float16: {"atol": 1e-2, "rtol": 1e-2}}


@dataclass(frozen=True)
class Stacks:
    a: torch.Tensor  # [S + 1, R_MAX, in]
    b: torch.Tensor  # [S + 1, R_MAX, out]
    ranks: torch.Tensor  # [S + 1] int32, what MultiLoRALinear.lora_ranks holds


def make_stacks(ranks: tuple[int, ...], n_in: int, n_out: int, dtype: torch.dtype, *, past_rank: float = 0.0,
                seed: int = 0, r_max: int = R_MAX) -> Stacks:
    """Random adapters scaled so a delta is O(1); rows past each slot's rank (and the null slot) hold
    `past_rank`: 0 as set_slot leaves them, or NaN to prove a backend never reads them."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(len(ranks) + 1, r_max, n_in, generator=gen) / n_in**0.5
    b = torch.randn(len(ranks) + 1, r_max, n_out, generator=gen) / r_max**0.5
    own = torch.tensor([*ranks, 0], dtype=torch.int32)
    for s, r in enumerate(own.tolist()):
        a[s, r:] = past_rank
        b[s, r:] = past_rank
    return Stacks(a.to(DEVICE, dtype), b.to(DEVICE, dtype), own.to(DEVICE))


def make_batch(slots: list[int], gather: bool, rank: int = R_MAX) -> LoRABatch:
    plan = plan_groups(slots, gather=gather, null_slot=NULL)
    return LoRABatchBuffers(DEVICE, capacity=4).fill(slots, plan, {"q": rank})


def activations(n_tokens: int, n_in: int, n_out: int, dtype: torch.dtype,
                seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, n_in, generator=gen)
    return x.to(DEVICE, dtype), torch.randn(n_tokens, n_out, generator=gen).to(DEVICE, dtype)


def run_backend(backend: object, stacks: Stacks, x: torch.Tensor, y0: torch.Tensor, batch: LoRABatch,
                rank: int = R_MAX) -> torch.Tensor:
    y = y0.clone()
    backend.apply(y, x, stacks.a, stacks.b, batch, rank, stacks.ranks)
    return y


def reference(stacks: Stacks, x: torch.Tensor, y0: torch.Tensor, slots: list[int], rank: int = R_MAX) -> torch.Tensor:
    y = y0.clone()
    ref_lora_apply(y, x, stacks.a, stacks.b, slots, rank)
    return y


def check(slots: list[int], gather: bool, dtype: torch.dtype = torch.float32, x_dtype: torch.dtype | None = None,
          n_in: int = IN, n_out: int = OUT) -> LoRABatch:
    """Triton == the loop twin == the torch backend on one step; returns the step's batch for layout asserts."""
    stacks = make_stacks(SLOT_RANKS, n_in, n_out, dtype)
    x, y0 = activations(len(slots), n_in, n_out, x_dtype or dtype)
    batch = make_batch(slots, gather)
    got = run_backend(TritonLoRABackend(), stacks, x, y0, batch)
    assert got.dtype == y0.dtype
    torch.testing.assert_close(got, reference(stacks, x, y0, slots), **TOL[dtype])
    torch.testing.assert_close(got, run_backend(TorchLoRABackend(), stacks, x, y0, batch), **TOL[dtype])
    untouched = [t for t, s in enumerate(slots) if s < 0 or SLOT_RANKS[s] == 0]
    assert torch.equal(got[untouched], y0[untouched])  # base-only tokens and rank-0 slots: y as it was
    return batch


def decode_slots() -> list[int]:
    """A padded decode batch: null-slot (base only) tokens, repeats, an empty slot, every rank."""
    return [0, -1, 2, 2, 5, 1, -1, 3, 4, 0, 2, -1]


def prefill_beside_decodes() -> list[int]:
    """A 40-token prefill of slot 2 between one-token decodes of 5 other slots: the grouped form splits it."""
    return [0, 1, *[2] * 20, 3, 4, *[2] * 20, 5, -1]


@pytest.fixture(params=[1, 64], ids=["sms1", "sms64"])
def sms(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The SM count the interpreter pretends to fill: 64 forces split-K on these small grids."""
    monkeypatch.setattr(triton_ops, "INTERPRETER_SMS", request.param)
    return request.param


def test_gather_form_per_token_with_null_slot_tokens(sms: int) -> None:
    batch = check(decode_slots(), gather=True)
    assert batch.depth == 1 and batch.num_groups == 12
    if DEVICE.type == "cpu":
        assert plan_launch(12, 1, R_MAX, IN, OUT, sms).splits == (2 if sms == 64 else 1)


def test_window_form_long_segment_spans_row_tiles(sms: int) -> None:
    """Slots 1 and 2 (a dense range): D = 70 rows, two BLOCK_M = 64 tiles, 65 padding rows in slot 1's group."""
    batch = check([2] * 35 + [1] * 5 + [2] * 35, gather=False)
    assert (batch.window_lo, batch.num_groups, batch.depth) == (1, 2, 70)


def test_grouped_form_splits_a_long_prefill_beside_decodes(sms: int) -> None:
    batch = check(prefill_beside_decodes(), gather=False)
    assert batch.window_lo is None and batch.num_groups > 6 and 1 < batch.depth <= 16


def test_mixed_ranks_never_read_the_rank_padding() -> None:
    """NaN past each slot's own rank (4, 8, 12, 16, 3 under the bound 16) and in the null slot: triton stops at
    each slot's rank, so it gives the exact answer; the torch backend, computing to the bound, reads them."""
    clean = make_stacks(SLOT_RANKS, IN, OUT, torch.float32)
    dirty = make_stacks(SLOT_RANKS, IN, OUT, torch.float32, past_rank=float("nan"))
    for slots, gather in ((decode_slots(), True), (prefill_beside_decodes(), False), ([1, 2, 1, 2], False)):
        x, y0 = activations(len(slots), IN, OUT, torch.float32)
        batch = make_batch(slots, gather)
        got = run_backend(TritonLoRABackend(), dirty, x, y0, batch)
        torch.testing.assert_close(got, reference(clean, x, y0, slots), **TOL[torch.float32])
        assert run_backend(TorchLoRABackend(), dirty, x, y0, batch).isnan().any()


def test_rank_bound_below_a_slots_rank_truncates_like_the_loop() -> None:
    """The step's bound caps every slot (min(r_s, bound)), as the loop's A[s, :rank] does."""
    stacks = make_stacks(SLOT_RANKS, IN, OUT, torch.float32)
    slots = [2, 4, 0, 1]
    x, y0 = activations(4, IN, OUT, torch.float32)
    got = run_backend(TritonLoRABackend(), stacks, x, y0, make_batch(slots, True, rank=6), rank=6)
    torch.testing.assert_close(got, reference(stacks, x, y0, slots, rank=6), **TOL[torch.float32])


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize(("dtype", "x_dtype"), [(torch.bfloat16, None), (torch.float16, None),
                                                 (torch.bfloat16, torch.float32)])
def test_half_precision(dtype: torch.dtype, x_dtype: torch.dtype | None, gather: bool) -> None:
    """bf16 / fp16 stacks and activations (fp32 accumulation), and bf16 stacks under fp32 activations."""
    check(prefill_beside_decodes(), gather=gather, dtype=dtype, x_dtype=x_dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf * 0 and NaN sums
@pytest.mark.parametrize("gather", [True, False])
def test_nan_adapter_and_inf_token_pollute_only_themselves(gather: bool) -> None:
    """An inf x on a token whose group has padding rows (they repeat it) and a NaN in one adapter: only that
    token and that adapter's tokens turn non-finite (isolation, DESIGN)."""
    slots = prefill_beside_decodes()
    stacks = make_stacks(SLOT_RANKS, IN, OUT, torch.float32)
    x, y0 = activations(len(slots), IN, OUT, torch.float32)
    want = reference(stacks, x, y0, slots)
    bad_token, bad_slot = slots.index(4), 1
    x[bad_token] = float("inf")
    stacks.a[bad_slot, 0, 0] = float("nan")
    batch = make_batch(slots, gather)
    assert gather or bool(batch.padding.any())
    got = run_backend(TritonLoRABackend(), stacks, x, y0, batch)
    hit = [t for t, s in enumerate(slots) if t == bad_token or s == bad_slot]
    healthy = [t for t in range(len(slots)) if t not in hit]
    assert not torch.isfinite(got[hit]).all(dim=-1).any()
    torch.testing.assert_close(got[healthy], want[healthy], **TOL[torch.float32])


def test_split_k_fills_the_gpu_for_a_decode_batch_and_not_for_a_prefill() -> None:
    """32 decode tokens at hidden 4096 and intermediate 28672: split-K gives a 132-SM GPU >= 1 shrink program
    per SM (rank 16, one rank slice per token); a grid that already has 4 programs per SM is not split."""
    for k in (4096, 8192, 28672):
        cfg = plan_launch(32, 1, 16, k, 4096, 132)
        assert 32 * cfg.r_tiles * cfg.splits >= 132 and cfg.k_chunk * cfg.splits >= k
        assert cfg.k_chunk * (cfg.splits - 1) < k  # no empty split
    prefill = plan_launch(16, 1024, 64, 4096, 4096, 132)  # 16 x 16 row tiles x 4 rank slices
    assert (prefill.block_m, prefill.splits) == (64, 1)


def test_layer_forward_under_the_triton_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """MultiLoRALinear passes its per-slot ranks; LORAPLEX_LORA_BACKEND=triton picks the triton backend (on
    the CPU under the interpreter), and the torch default comes back once the override is gone."""
    torch.manual_seed(0)
    ctx = LoRABatchContext()
    layer = MultiLoRALinear(torch.nn.Linear(IN, OUT).to(DEVICE), kind="q", num_slots=3, max_rank=R_MAX,
                            context=ctx, dtype=torch.float32)
    for slot, r in ((0, 4), (1, 16), (2, 9)):
        layer.set_slot(slot, torch.randn(r, IN) / IN**0.5, torch.randn(OUT, r), scale=0.5)
    layer.clear_slot(2)
    assert layer.lora_ranks.tolist() == [4, 16, 0, 0]
    slots = [1, 0, -1, 2, 1]
    ctx.set(LoRABatchBuffers(DEVICE).fill(slots, plan_groups(slots, gather=False, null_slot=3), {"q": R_MAX}))
    x = torch.randn(1, len(slots), IN, device=DEVICE)
    with torch.no_grad():
        monkeypatch.setenv(BACKEND_ENV, "torch")
        want = layer(x)
        monkeypatch.setenv(BACKEND_ENV, "triton")
        assert isinstance(get_backend(DEVICE), TritonLoRABackend)
        got = layer(x)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    monkeypatch.delenv(BACKEND_ENV)
    assert get_backend(DEVICE).name == ("triton" if DEVICE.type == "cuda" else "torch")


def test_interpreter_runs_the_kernels_when_triton_was_imported_first() -> None:
    """bitsandbytes (through peft) imports triton before this module can set TRITON_INTERPRET; triton's own jit
    helpers (tl.sum, tl.zeros, ...) are then compiled-only, so the kernels must use builtins alone."""
    code = ("import os, triton, torch; os.environ['TRITON_INTERPRET'] = '1'; "
            "from loraplex.adapters.ops import LoRABatchBuffers, plan_groups, get_backend_named; "
            "b = LoRABatchBuffers(torch.device('cpu')).fill([0, 0, -1], plan_groups([0, 0, -1], gather=False, "
            "null_slot=1), {'q': 16}); y = torch.zeros(3, 8); "
            "get_backend_named('triton', 'cpu').apply(y, torch.ones(3, 8), torch.ones(2, 16, 8), "
            "torch.ones(2, 16, 8), b, 16, torch.tensor([3, 0], dtype=torch.int32)); "
            "assert y.tolist() == [[24.0] * 8] * 2 + [[0.0] * 8], y")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestOnCuda:
    """The same comparisons compiled for a real GPU, at Llama-7B layer shapes (hidden 4096, intermediate
    11008), and one CUDA-graph capture replayed with the next step's metadata."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize(("n_in", "n_out"), [(4096, 4096), (4096, 11008), (11008, 4096)])
    @pytest.mark.parametrize("gather", [True, False])
    def test_real_shapes(self, dtype: torch.dtype, n_in: int, n_out: int, gather: bool) -> None:
        rng = random.Random(n_in + n_out)
        decode = [rng.randrange(-1, NULL) for _ in range(32)]
        check(decode if gather else decode[:8] + [2] * 300 + decode[8:], gather, dtype, n_in=n_in, n_out=n_out)

    @pytest.mark.parametrize("gather", [True, False])
    def test_rank_padding_never_read(self, gather: bool) -> None:
        dirty = make_stacks(SLOT_RANKS, 4096, 4096, torch.bfloat16, past_rank=float("nan"))
        clean = make_stacks(SLOT_RANKS, 4096, 4096, torch.bfloat16)
        slots = decode_slots() if gather else prefill_beside_decodes()
        x, y0 = activations(len(slots), 4096, 4096, torch.bfloat16)
        batch = make_batch(slots, gather)
        got = run_backend(TritonLoRABackend(), dirty, x, y0, batch)
        torch.testing.assert_close(got, run_backend(TritonLoRABackend(), clean, x, y0, batch), rtol=0, atol=0)

    def test_cuda_graph_replays_the_next_steps_metadata(self) -> None:
        stacks = make_stacks(SLOT_RANKS, 4096, 4096, torch.bfloat16)
        x, y0 = activations(32, 4096, 4096, torch.bfloat16)
        buffers, y = LoRABatchBuffers(DEVICE), y0.clone()
        first = [s % NULL for s in range(32)]
        batch = buffers.fill(first, plan_groups(first, gather=True, null_slot=NULL), {"q": R_MAX})
        backend = TritonLoRABackend()
        backend.apply(y, x, stacks.a, stacks.b, batch, R_MAX, stacks.ranks)  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            backend.apply(y, x, stacks.a, stacks.b, batch, R_MAX, stacks.ranks)
        second = [(5 * t + 1) % (NULL + 1) - 1 for t in range(32)]
        buffers.fill(second, plan_groups(second, gather=True, null_slot=NULL), {"q": R_MAX})
        y.copy_(y0)
        graph.replay()
        torch.testing.assert_close(y, reference(stacks, x, y0, second), **TOL[torch.bfloat16])
