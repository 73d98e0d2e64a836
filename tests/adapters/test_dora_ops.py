# ruff: noqa: E402  (TRITON_INTERPRET must be set before triton_ops is imported)
"""DoRA's factors and the embedding's LoRA in the batched op, against the per-token loop twins (reference.py).

Checked for the torch ops in every layout form (gather, window, grouped; with a linear merge's passes) and for
the triton expand's DoRA switch in Triton's interpreter (on CUDA compiled): the same answers, every non-DoRA
token (plain LoRA, base-only) bit-for-bit what it is without DoRA factors, the op count DoRA adds (2 torch ops
per layer, 3 with a bias; no triton launch), and nothing added at all without them.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from loraplex.adapters.ops import (
    DoraFactors,
    LoRABatch,
    LoRABatchBuffers,
    embedding_lora_apply,
    lora_apply,
    plan_groups,
    split_passes,
)
from loraplex.adapters.ops.reference import ref_embedding_lora_apply, ref_lora_apply
from loraplex.adapters.ops.torch_ops import TorchLoRABackend
from loraplex.adapters.ops.trace import OpTrace

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IN, OUT, VOCAB, R_MAX = 24, 20, 40, 8
RANKS = (5, 3, 8, 0, 2)  # per slot (0: empty); slot 5 is the null slot
NULL = len(RANKS)
DORA_SLOTS = (0, 2)  # slots holding a DoRA adapter; the others are plain LoRA (factors 1 and 0)
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 6e-2, "rtol": 3e-2}}
FORMS = {  # token slots per layout form (batch.py)
    "gather": [0, -1, 2, 1, 1, 4, -1, 0],
    "window": [1, 1, 0, 0, 0, 2, 1, 2],  # slots 0..2: a dense range, read in place
    "grouped": [4, 0, -1, *[2] * 25, 1, -1, 0],  # a long segment beside decodes: split into groups
}


def stacks(n_in: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(NULL + 1, R_MAX, n_in, generator=gen)
    b = torch.randn(NULL + 1, R_MAX, OUT, generator=gen) / R_MAX**0.5
    for s, r in enumerate((*RANKS, 0)):
        a[s, r:], b[s, r:] = 0.0, 0.0
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype)


def factors(*, bias: bool, seed: int = 1) -> torch.Tensor:
    """[S + 1, 2, out] fp32: g around 1 and c = (1 - g) * bias for the DoRA slots, exactly 1 and 0 elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.zeros(NULL + 1, 2, OUT)
    f[:, 0] = 1.0
    b = torch.randn(OUT, generator=gen)
    for s in DORA_SLOTS:
        f[s, 0] = 1.0 + 0.3 * torch.randn(OUT, generator=gen)
        f[s, 1] = (1.0 - f[s, 0]) * b if bias else 0.0
    return f.to(DEVICE)


def batch_of(slots: list[int], form: str, merges: dict | None = None, *, dora: bool = True) -> LoRABatch:
    """The step's batch (passes for merges), DoRA kinds set when `dora`, as LoRAInjection describes it."""
    passes = split_passes(slots, merges or {})
    out = []
    for k, (pass_slots, weights) in enumerate(passes):
        plan = plan_groups(pass_slots, gather=form == "gather" and k == 0, null_slot=NULL)
        kinds = frozenset({"q"}) if dora and k == 0 else frozenset()
        out.append(LoRABatchBuffers(DEVICE, capacity=4).fill(pass_slots, plan, {"q": R_MAX}, weights,
                                                            dora_kinds=kinds, null_slot=NULL))
    first = out[0]
    return first if len(out) == 1 else LoRABatch(**{**first.__dict__, "passes": tuple(out[1:])})


def activations(n: int, n_in: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return torch.randn(n, n_in, generator=gen).to(DEVICE, dtype), torch.randn(n, OUT, generator=gen).to(DEVICE, dtype)


@pytest.fixture(params=["torch", "triton"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("LORAPLEX_LORA_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("form", list(FORMS))
def test_dora_factors_match_the_loop_in_every_form(backend: str, form: str, bias: bool) -> None:
    slots = FORMS[form]
    a, b = stacks(IN)
    x, y0 = activations(len(slots), IN)
    f = factors(bias=bias)
    got, want = y0.clone(), y0.clone()
    lora_apply(got, x, a, b, batch_of(slots, form), R_MAX, torch.tensor([*RANKS, 0], dtype=torch.int32,
                                                                           device=DEVICE), DoraFactors(f, bias))
    ref_lora_apply(want, x, a, b, slots, R_MAX, dora_stack=f)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert not torch.equal(got[slots.index(0)], y0[slots.index(0)])


@pytest.mark.parametrize("form", ["gather", "grouped"])
def test_tokens_of_other_slots_are_bit_for_bit_what_they_are_without_dora(backend: str, form: str) -> None:
    """Factors 1 and 0 (plain LoRA slots, base-only tokens on the null slot) change no bit: a step with a DoRA
    row gives its other rows exactly what a step without DoRA factors gives them."""
    slots = FORMS[form]
    a, b = stacks(IN)
    x, y0 = activations(len(slots), IN)
    ranks = torch.tensor([*RANKS, 0], dtype=torch.int32, device=DEVICE)
    with_dora, without = y0.clone(), y0.clone()
    lora_apply(with_dora, x, a, b, batch_of(slots, form), R_MAX, ranks, DoraFactors(factors(bias=True), True))
    lora_apply(without, x, a, b, batch_of(slots, form, dora=False), R_MAX, ranks)
    others = [t for t, s in enumerate(slots) if s not in DORA_SLOTS]
    assert torch.equal(with_dora[others], without[others])


def test_dora_beside_a_linear_merge(backend: str) -> None:
    """A step holding a DoRA row and merged rows: the factors apply in the first pass only (merged tokens sit
    on their first, non-DoRA, adapter's slot there), the merge's passes add their weighted deltas after."""
    slots = [0, 1, -1, 2, 4, 1]
    merges = {1: [(1, 0.7), (4, -0.4)], 5: [(3, 0.5), (1, 0.5), (4, 1.2)]}
    a, b = stacks(IN)
    x, y0 = activations(len(slots), IN)
    f = factors(bias=True)
    got, want = y0.clone(), y0.clone()
    lora_apply(got, x, a, b, batch_of(slots, "grouped", merges), R_MAX,
               torch.tensor([*RANKS, 0], dtype=torch.int32, device=DEVICE), DoraFactors(f, True))
    ref_lora_apply(want, x, a, b, slots, R_MAX, merges, dora_stack=f)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("form", ["gather", "grouped"])
def test_half_precision_output(backend: str, form: str) -> None:
    slots = FORMS[form]
    a, b = stacks(IN, torch.bfloat16)
    x, y0 = activations(len(slots), IN, torch.bfloat16)
    f = factors(bias=True)
    got, want = y0.clone(), y0.clone()
    lora_apply(got, x, a, b, batch_of(slots, form), R_MAX,
               torch.tensor([*RANKS, 0], dtype=torch.int32, device=DEVICE), DoraFactors(f, True))
    ref_lora_apply(want, x, a, b, slots, R_MAX, dora_stack=f)
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])


def gather_inputs() -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gather form's token slots, stacks, x, y and slot ranks (the op-count tests' one layer)."""
    slots = FORMS["gather"]
    a, b = stacks(IN)
    x, y0 = activations(len(slots), IN)
    return slots, a, b, x, y0, torch.tensor([*RANKS, 0], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("bias", [False, True])
def test_torch_dora_adds_two_ops_three_with_a_bias_and_none_without_factors(bias: bool) -> None:
    slots, a, b, x, y0, ranks = gather_inputs()
    counts = []
    for dora in (None, DoraFactors(factors(bias=bias), bias)):
        batch = batch_of(slots, "gather", dora=dora is not None)
        with OpTrace() as trace:
            TorchLoRABackend().apply(y0.clone(), x, a, b, batch, R_MAX, ranks, dora)
        counts.append(trace.compute)
    plain, with_dora = counts
    assert with_dora[: len(plain)] == plain  # the same ops first, then DoRA's
    assert with_dora[len(plain):] == ["aten.index_select", "aten.mul_", *(["aten.add_"] if bias else [])]


def test_triton_dora_launches_no_extra_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The factors are applied inside the expand kernel's store (a constexpr switch): two launches per layer
    with or without them."""
    pytest.importorskip("triton")
    from loraplex.adapters.ops import triton_ops

    launches: list[str] = []

    class Counted:
        def __init__(self, name: str, kernel: object) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid: object) -> object:
            launches.append(self.name)
            return self.kernel[grid]

    for name in ("_shrink_kernel", "_expand_kernel"):
        monkeypatch.setattr(triton_ops, name, Counted(name, getattr(triton_ops, name)))
    slots, a, b, x, y0, ranks = gather_inputs()
    per_call = []
    for dora in (None, DoraFactors(factors(bias=True), True)):
        launches.clear()
        triton_ops.TritonLoRABackend().apply(y0.clone(), x, a, b, batch_of(slots, "gather", dora=dora is not None),
                                             R_MAX, ranks, dora)
        per_call.append(list(launches))
    assert per_call[0] == per_call[1] == ["_shrink_kernel", "_expand_kernel"]


# ---- the embedding ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("form", list(FORMS))
def test_embedding_lora_matches_the_loop(form: str, dora: bool) -> None:
    """y[t] += B[s].T @ A[s, :, id_t] (PEFT's lora_embedding_A column at the token id), in every form."""
    slots = FORMS[form]
    a, b = stacks(VOCAB)
    ids = torch.tensor([random.Random(len(slots)).randrange(VOCAB) for _ in slots], device=DEVICE)
    _, y0 = activations(len(slots), VOCAB)
    f = factors(bias=False) if dora else None
    got, want = y0.clone(), y0.clone()
    embedding_lora_apply(got, ids, a, b, batch_of(slots, form, dora=dora), R_MAX,
                         DoraFactors(f, False) if dora else None)
    ref_embedding_lora_apply(want, ids.tolist(), a, b, slots, R_MAX, dora_stack=f)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    base_only = [t for t, s in enumerate(slots) if s < 0]
    assert torch.equal(got[base_only], y0[base_only])


def test_embedding_lora_with_merge_passes() -> None:
    slots = [0, 1, -1, 2, 1]
    merges = {1: [(1, 0.7), (4, -0.4)], 4: [(2, 0.5), (1, 0.5)]}
    a, b = stacks(VOCAB)
    ids = torch.tensor([3, 7, 11, 39, 0], device=DEVICE)
    _, y0 = activations(len(slots), VOCAB)
    got, want = y0.clone(), y0.clone()
    embedding_lora_apply(got, ids, a, b, batch_of(slots, "grouped", merges, dora=False), R_MAX)
    ref_embedding_lora_apply(want, ids.tolist(), a, b, slots, R_MAX, merges)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_embedding_gathers_never_copy_the_vocabulary_stack() -> None:
    """The shrink reads only the tokens' columns: no op makes anything vocabulary-wide (a copy of A)."""
    slots = FORMS["grouped"]
    a, b = stacks(VOCAB)
    ids = torch.arange(len(slots), device=DEVICE) % VOCAB
    _, y0 = activations(len(slots), VOCAB)
    with OpTrace() as trace:
        embedding_lora_apply(y0.clone(), ids, a, b, batch_of(slots, "grouped", dora=False), R_MAX)
    assert trace.syncs == []
    assert "aten.index" in trace.compute and not [op for op, shape in trace.shapes if VOCAB in shape]
