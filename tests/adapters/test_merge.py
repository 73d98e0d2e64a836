"""Merge recipes, the multi-slot weighted LoRA op (passes) against the loop twin, virtual adapters' math, and
the SlotTable's view of virtual names. The engine-level comparison with PEFT is tests/server/test_merge_engine.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from loraplex.adapters import merge
from loraplex.adapters.inject import LoRAInjection, inject_multi_lora
from loraplex.adapters.merge import MergeRecipe, RecipeError, check_recipe
from loraplex.adapters.ops import BACKEND_ENV, lora_apply, split_passes
from loraplex.adapters.ops.reference import ref_lora_apply
from loraplex.adapters.ops.trace import OpTrace
from loraplex.adapters.peft_config import LoraSpec
from loraplex.adapters.slot_table import SlotState, SlotTable
from loraplex.adapters.weights import AdapterWeights, LoraModuleWeights

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # triton: the interpreter on the CPU
IN, OUT, R_MAX, SLOTS = 40, 24, 16, 6
# (rank for q_proj, rank for v_proj) per slot; 0: the adapter does not target that layer. Slot 5 stays empty.
SLOT_RANKS = ((4, 0), (8, 8), (16, 2), (3, 0), (0, 5))
TOL = {"atol": 1e-4, "rtol": 1e-4}
BACKENDS = ("torch", "triton")


# ---- recipes --------------------------------------------------------------------------------------------
def test_recipe_is_normalised_hashable_and_labelled() -> None:
    recipe = MergeRecipe([["a", 0.7], ["b", 3]])  # JSON-shaped input
    assert recipe.adapters == (("a", 0.7), ("b", 3.0)) and recipe == MergeRecipe((("a", 0.7), ("b", 3.0)))
    assert hash(recipe) == hash(MergeRecipe((("a", 0.7), ("b", 3.0))))
    assert recipe.label == "merge:a*0.7+b*3.0" and not recipe.virtual and recipe.slot_names == ("a", "b")
    ties = MergeRecipe((("a", 0.5), ("b", -1e20)), "ties", 0.25, "frequency")
    assert ties.label == "merge:ties(density=0.25,frequency):a*0.5+b*-1e+20" == ties.virtual_name
    assert ties.slot_names == (ties.virtual_name,) and merge.is_virtual(ties.virtual_name)
    dare = MergeRecipe((("a", 1.0), ("b", 1.0)), "dare_linear", 0.5, seed=3)
    assert dare.label == "merge:dare_linear(density=0.5,seed=3):a*1.0+b*1.0"
    assert MergeRecipe((("a", 1.0), ("b", 1.0)), "dare_linear", 0.5, seed=4).label != dare.label


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"adapters": (("a", 1.0),)}, "adapters"),
    ({"adapters": tuple((f"a{i}", 1.0) for i in range(9))}, "adapters"),
    ({"adapters": (("a", 1.0), ("a", 2.0))}, "adapters"),
    ({"adapters": (("a", 0.0), ("b", 0.0))}, "adapters"),
    ({"adapters": "ab"}, "adapters"),
    ({"adapters": (("a", 1.0), ("b",))}, "adapters.1"),
    ({"adapters": (("a", math.nan), ("b", 1.0))}, "adapters.0.weight"),
    ({"adapters": (("a", 1.0), ("b", math.inf))}, "adapters.1.weight"),
    ({"adapters": (("a", True), ("b", 1.0))}, "adapters.0.weight"),
    ({"adapters": (("", 1.0), ("b", 1.0))}, "adapters.0.name"),
    ({"adapters": (("a", 1.0), ("merge:x", 1.0))}, "adapters.1.name"),
    ({"strategy": "svd"}, "merge_strategy"),
    ({"density": 0.0}, "density"),
    ({"density": 1.5}, "density"),
    ({"density": math.nan}, "density"),
    ({"majority_sign_method": "mean"}, "majority_sign_method"),
    ({"seed": 1.5}, "seed"),
])
def test_invalid_recipes_name_their_field(kwargs: dict, field: str) -> None:
    args = {"adapters": (("a", 0.7), ("b", 0.3)), **kwargs}
    with pytest.raises(RecipeError, match=f"^{field}: ") as err:
        MergeRecipe(**args)
    assert err.value.field == field and isinstance(err.value, ValueError)


def test_check_recipe_refuses_a_linear_merge_wider_than_the_slots() -> None:
    three = (("a", 1.0), ("b", 1.0), ("c", 1.0))
    check_recipe(MergeRecipe(three), 3)
    with pytest.raises(RecipeError, match="needs 3 device slots at once; this server has --max-loras 2"):
        check_recipe(MergeRecipe(three), 2)
    check_recipe(MergeRecipe(three, "ties"), 1)  # a virtual adapter takes one slot


# ---- the op: passes of weighted slots ------------------------------------------------------------------
def make_injection(dtype: torch.dtype = torch.float32) -> LoRAInjection:
    """Two wrapped layers (q_proj, v_proj) with SLOTS slots; slot s holds SLOT_RANKS[s] (scale 0.5)."""
    gen = torch.Generator().manual_seed(0)
    model = nn.ModuleDict({"q_proj": nn.Linear(IN, OUT), "v_proj": nn.Linear(IN, OUT)}).to(DEVICE)
    lora = inject_multi_lora(model, num_slots=SLOTS, max_rank=R_MAX, dtype=dtype)
    for slot, ranks in enumerate(SLOT_RANKS):
        modules = {name: LoraModuleWeights(torch.randn(r, IN, generator=gen) / IN**0.5,
                                           torch.randn(OUT, r, generator=gen), 0.5)
                   for name, r in zip(("q_proj", "v_proj"), ranks, strict=True) if r}
        lora.load_slot(slot, AdapterWeights(LoraSpec(max(ranks), 1.0, tuple(modules)), modules, 0))
    return lora


def step_mix() -> tuple[list[int], dict[int, tuple[tuple[int, float], ...]]]:
    """Plain tokens of every slot, base tokens, and merged tokens of 2, 3 and 8 (a slot twice) adapters; a
    merged token's first adapter is also some plain token's slot. Token 9 merges only v_proj-less adapters
    after its first: passes k >= 1 may hold slots that add nothing to a layer."""
    slots = [0, -1, 1, 2, 0, 3, -1, 1, 4, 2, 2, 2, -1]
    merges = {
        1: ((0, 0.7), (2, 0.3)),
        4: ((1, -0.5), (3, 0.25), (2, 2.0)),
        6: ((4, 1.0), (0, 1.0)),
        9: ((2, 0.1), (0, 0.2), (3, 0.3)),
        12: tuple((s % 5, 0.1 * (s + 1)) for s in range(8)),
    }
    return slots, merges


def apply_layer(lora: LoRAInjection, name: str, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    layer = lora.layers[name]
    y = y0.clone()
    lora_apply(y, x, layer.lora_a, layer.lora_b, lora.context.batch, lora.context.rank_for(layer.kind),
               layer.lora_ranks)
    return y


def inputs(n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, IN, generator=gen).to(DEVICE, dtype), torch.randn(n, OUT, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gather", [False, True], ids=["segment", "gather"])
def test_merged_rows_match_the_loop(backend: str, gather: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, backend)
    lora = make_injection()
    slots, merges = step_mix()
    lora.set_token_slots(slots, gather=gather, merges=merges)
    assert len(lora.context.batch.passes) == 7  # the 8-adapter token
    x, y0 = inputs(len(slots))
    for name, layer in lora.layers.items():
        want = y0.clone()
        ref_lora_apply(want, x, layer.lora_a, layer.lora_b, slots, R_MAX, merges)
        torch.testing.assert_close(apply_layer(lora, name, x, y0), want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gather", [False, True], ids=["segment", "gather"])
def test_rows_without_merging_are_bit_for_bit_what_they_were(backend: str, gather: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Merging adds passes over merged rows and weights 1.0 on the others: their results do not move a bit
    from the same step with the merged rows on their first adapter alone."""
    monkeypatch.setenv(BACKEND_ENV, backend)
    lora = make_injection()
    slots, merges = step_mix()
    alone = [merges[t][0][0] if t in merges else s for t, s in enumerate(slots)]
    plain = [t for t in range(len(slots)) if t not in merges]
    x, y0 = inputs(len(slots))
    for name in lora.layers:
        lora.set_token_slots(alone, gather=gather)
        before = apply_layer(lora, name, x, y0)
        lora.set_token_slots(slots, gather=gather, merges=merges)
        assert torch.equal(apply_layer(lora, name, x, y0)[plain], before[plain])


@pytest.mark.parametrize("gather", [False, True], ids=["segment", "gather"])
def test_a_step_without_merges_is_one_pass_without_weights(gather: bool) -> None:
    lora = make_injection()
    slots = [0, -1, 1, 2, 0, 3]
    x, y0 = inputs(len(slots))
    traces = []
    for merges in (None, {}):
        lora.set_token_slots(slots, gather=gather, merges=merges)
        batch = lora.context.batch
        assert batch.passes == () and batch.row_weights is None
        with OpTrace() as trace:
            apply_layer(lora, "q_proj", x, y0)
        traces.append(trace.counts())
    assert traces[0] == traces[1]


def test_a_layer_only_a_later_pass_uses_still_runs() -> None:
    """v_proj: the step's only adapter targeting it is the second of a merge: its rank bound covers it."""
    lora = make_injection()
    slots, merges = [0, 3, -1], {2: ((3, 1.0), (4, 0.5))}  # slots 0 and 3 do not target v_proj, 4 does
    lora.set_token_slots(slots, merges=merges)
    assert lora.context.rank_for("v_proj") == 5
    x, y0 = inputs(len(slots))
    want = y0.clone()
    layer = lora.layers["v_proj"]
    ref_lora_apply(want, x, layer.lora_a, layer.lora_b, slots, R_MAX, merges)
    got = apply_layer(lora, "v_proj", x, y0)
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.equal(got[2], y0[2]) and torch.equal(got[:2], y0[:2])


def test_split_passes() -> None:
    assert split_passes([0, -1], {}) == [([0, -1], None)]
    assert split_passes([0, 9, -1, 1], {1: ((2, 0.5), (3, 0.25)), 2: ((1, 2.0),)}) == [
        ([0, 2, 1, 1], [1.0, 0.5, 2.0, 1.0]),
        ([-1, 3, -1, -1], [0.0, 0.25, 0.0, 0.0]),
    ]
    with pytest.raises(ValueError, match="at least one"):
        split_passes([0], {0: ()})


def test_merged_slots_are_range_checked() -> None:
    lora = make_injection()
    with pytest.raises(IndexError, match="token slot 6"):
        lora.set_token_slots([0, 1], merges={1: ((1, 1.0), (SLOTS, 1.0))})


def test_weights_reach_half_precision_stacks_in_fp32() -> None:
    lora = make_injection(torch.bfloat16)
    slots, merges = step_mix()
    lora.set_token_slots(slots, merges=merges)
    x, y0 = inputs(len(slots), torch.bfloat16)
    layer = lora.layers["q_proj"]
    want = y0.clone()
    ref_lora_apply(want, x, layer.lora_a, layer.lora_b, slots, R_MAX, merges)
    torch.testing.assert_close(apply_layer(lora, "q_proj", x, y0), want, atol=0.1, rtol=0.02)


# ---- virtual adapters: the math -------------------------------------------------------------------------
def adapter(rank: int, modules: tuple[str, ...], seed: int, scale: float = 2.0) -> AdapterWeights:
    gen = torch.Generator().manual_seed(seed)
    mods = {m: LoraModuleWeights(torch.randn(rank, IN, generator=gen), torch.randn(OUT, rank, generator=gen), scale)
            for m in modules}
    return AdapterWeights(LoraSpec(rank, rank * scale, tuple(m.rsplit(".", 1)[-1] for m in modules)), mods, 0)


def components() -> list[AdapterWeights]:
    return [adapter(4, ("l0.q_proj", "l0.v_proj"), 1), adapter(8, ("l0.q_proj", "l1.q_proj"), 2)]


def test_virtual_adapter_shape_rank_and_modules() -> None:
    recipe = MergeRecipe((("a", 0.5), ("b", 0.5)), "ties", 0.5)
    virtual = merge.merge_adapters(recipe, components())
    assert list(virtual.modules) == ["l0.q_proj", "l0.v_proj", "l1.q_proj"]
    assert virtual.spec.r == 8 and virtual.spec.scale_for("l0.q_proj") == 1.0
    assert all(m.a.shape == (8, IN) and m.b.shape == (OUT, 8) and m.scale == 1.0 for m in virtual.modules.values())
    assert virtual.size_bytes == 3 * 8 * (IN + OUT) * 4


def test_ties_at_density_one_of_agreeing_adapters_is_their_weighted_mean() -> None:
    """Same delta twice: every sign agrees, so the disjoint merge is sum(w_i dW) / 2 (rank 4 is exact)."""
    a = adapter(4, ("l0.q_proj",), 7)
    recipe = MergeRecipe((("a", 0.2), ("b", 0.6)), "ties")
    virtual = merge.merge_adapters(recipe, [a, a]).modules["l0.q_proj"]
    delta = (a.modules["l0.q_proj"].b @ a.modules["l0.q_proj"].a) * 2.0
    torch.testing.assert_close(virtual.b @ virtual.a, delta * 0.4, atol=1e-4, rtol=1e-4)


def test_dare_is_deterministic_per_recipe_and_independent_of_module_order() -> None:
    recipe = MergeRecipe((("a", 0.5), ("b", 0.5)), "dare_linear", 0.5, seed=1)
    comps = components()
    first = merge.merge_adapters(recipe, comps)
    reordered = [AdapterWeights(c.spec, dict(reversed(c.modules.items())), 0) for c in comps]
    again = merge.merge_adapters(recipe, reordered)
    for name, m in first.modules.items():
        assert torch.equal(m.a, again.modules[name].a) and torch.equal(m.b, again.modules[name].b)
    other = merge.merge_adapters(MergeRecipe(recipe.adapters, "dare_linear", 0.5, seed=2), comps)
    assert not torch.equal(other.modules["l0.q_proj"].a, first.modules["l0.q_proj"].a)


def test_a_linear_recipe_has_no_virtual_adapter() -> None:
    with pytest.raises(ValueError, match="no virtual adapter"):
        merge.merge_adapters(MergeRecipe((("a", 0.5), ("b", 0.5))), components())


def test_load_virtual_reads_components_and_names_the_one_that_fails() -> None:
    recipe = MergeRecipe((("a", 0.5), ("b", 0.5)), "ties")
    comps = dict(zip("ab", components(), strict=True))
    name = merge.remember(recipe)
    assert merge.load_virtual(name, comps.__getitem__).modules.keys() == {"l0.q_proj", "l0.v_proj", "l1.q_proj"}
    with pytest.raises(merge.MergeLoadError, match="adapter 'b' of the merge"):
        merge.load_virtual(name, lambda n: comps["x" if n == "b" else n])
    with pytest.raises(LookupError, match="unknown merge"):
        merge.load_virtual("merge:never-remembered", comps.__getitem__)


# ---- the SlotTable and virtual names ---------------------------------------------------------------------
def make_table(registered: set[str], num_slots: int = 3) -> tuple[SlotTable, list[tuple[str, bool]]]:
    asked: list[tuple[str, bool]] = []
    table = SlotTable(num_slots=num_slots, max_host=8, request_load=lambda n, e, u: asked.append((n, u)),
                      clear_slot=lambda s: None, is_registered=registered.__contains__)
    return table, asked


def test_a_virtual_name_is_registered_while_its_adapters_are() -> None:
    registered = {"a", "b"}
    table, asked = make_table(registered)
    recipe = MergeRecipe((("a", 0.5), ("b", 0.5)), "ties", 0.3, seed=11)
    name = merge.remember(recipe)
    assert table.acquire(name).state is SlotState.LOADING and asked == [(name, True)]
    registered.discard("b")
    table.forget("b")  # the registry's DELETE: the merge of the old b goes with it
    assert table.state(name).value == "registered" and table.tier(name) == "disk"
    got = table.acquire(name)
    assert got.state is SlotState.ERRORED and got.reason == "adapter 'b' is not registered"
    got = table.acquire("merge:ties(never remembered)")
    assert got.state is SlotState.ERRORED and "no longer remembered" in got.reason


def test_usable_slots_leave_out_other_adapters_pins() -> None:
    table, _ = make_table({"a", "b", "p", "q"}, num_slots=4)
    table.pin("p")
    table.pin("q")
    assert table.usable_slots(("a", "b")) == 2
    assert table.usable_slots(("a", "p")) == 3
