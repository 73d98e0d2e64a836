"""Per-request adapter merging through the engine, against PEFT's `add_weighted_adapter` on the same adapters.

linear: the engine runs a merged request over its adapters' own slots (one row, several slots, weighted) in
the same batch as everyone else; PEFT's combination_type="cat" is that exact weighted sum of the deltas, so
logits agree to fp32 rounding (atol 1e-4) and greedy tokens are equal. ties / dare: the engine computes a
virtual adapter once (host loader thread) with PEFT's own merge_utils and a truncated SVD, as PEFT's *_svd
combinations do: same deltas op for op, same combination functions, same SVD up to rounding (see TOL).
"""

from __future__ import annotations

import random

import pytest
import torch
from peft.tuners.lora.model import LoraModel
from peft.utils import merge_utils

from loraplex.adapters import merge as merge_mod
from loraplex.adapters.merge import MergeRecipe
from loraplex.adapters.targets import ATTENTION_TARGETS, TARGET_MODULES
from loraplex.server.engine.cuda_graphs import DecodeGraphs

from .engine_helpers import PeftReference, greedy, make_engine, run_to_completion, tokens_of

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# fp32 logits. linear: the same products summed in another order; ties / dare: the same deltas and combination,
# then ours takes the reduced SVD where PEFT takes the full one (the same leading factors up to rounding and
# column signs, which cancel in B A). Largest difference measured over every test here: 7.5e-6.
TOL = {"atol": 1e-4, "rtol": 1e-4}
N_TOKENS = 10


@pytest.fixture(scope="module")
def setup(tiny_model_dir, adapter_dir):
    model_dir = tiny_model_dir("llama")
    adapters = {  # different ranks and target sets
        "a": adapter_dir("llama", 4, ("q_proj", "v_proj"), 21),
        "b": adapter_dir("llama", 8, ATTENTION_TARGETS, 22),
        "c": adapter_dir("llama", 16, TARGET_MODULES, 23),
    }
    return model_dir, adapters, PeftReference(model_dir, adapters)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 500) for _ in range(rng.randrange(4, 30))] for _ in range(n)]


def _peft_adapter(ref: PeftReference, recipe: MergeRecipe, combination: str, **kw) -> str:
    """Add the recipe to the PEFT reference once, as `add_weighted_adapter` builds it; its adapter name."""
    name = f"peft-{combination}-{abs(hash(recipe))}"
    ref.model.add_weighted_adapter(list(recipe.names), list(recipe.weights), name, combination_type=combination,
                                   **kw)
    return name


def _run_capturing(engine) -> tuple[dict[str, list], dict[str, torch.Tensor]]:
    """run_to_completion, also keeping each request's sampled logits rows [steps, V] as the runner made them."""
    rows: dict[str, list[torch.Tensor]] = {}
    execute = engine.runner.execute

    def spy(chunks):
        out = execute(chunks)
        logits = getattr(out, "logits", out)  # [K, V]: the sampling chunks' rows, in chunk order
        for chunk, row in zip([c for c in chunks if c.samples], logits, strict=True):
            rows.setdefault(chunk.request.request_id, []).append(row.clone())
        return out

    engine.runner.execute = spy
    outs = run_to_completion(engine)
    return outs, {rid: torch.stack(r) for rid, r in rows.items()}


def _check(ref: PeftReference, prompt: list[int], adapter: str | None, outs: list, logits: torch.Tensor) -> None:
    """Greedy tokens equal PEFT's; each step's logits equal PEFT's teacher-forced on the same tokens."""
    tokens = tokens_of(outs)
    assert tokens == ref.generate(prompt, adapter, len(tokens))
    torch.testing.assert_close(logits, ref.logits_along(prompt, tokens, adapter), **TOL)


def test_linear_merge_equals_peft_cat(setup):
    model_dir, adapters, ref = setup
    recipe = MergeRecipe((("a", 0.7), ("b", 0.3)))
    peft_name = _peft_adapter(ref, recipe, "cat")
    engine = make_engine(model_dir, adapters)
    prompt = _prompts(1)[0]
    engine.add_request("m", prompt, greedy(N_TOKENS), merge=recipe)
    outs, logits = _run_capturing(engine)
    _check(ref, prompt, peft_name, outs["m"], logits["m"])
    assert engine.adapters.refcount("a") == engine.adapters.refcount("b") == 0  # both released at the finish


@pytest.mark.parametrize("decode_buckets", [False, True], ids=["ragged", "padded-gather"])
def test_merges_beside_plain_adapters_and_base_rows_each_match_their_reference(setup, decode_buckets):
    """One batch: linear merges of 2 and 3 adapters (one with a negative weight), plain adapter rows and base
    rows; padded decode steps take the gather form (eagerly when merged rows are in them)."""
    model_dir, adapters, ref = setup
    merges = {
        "m2": MergeRecipe((("a", 0.7), ("b", 0.3))),
        "m3": MergeRecipe((("c", 0.5), ("a", -0.4), ("b", 1.2))),
    }
    names = {rid: _peft_adapter(ref, recipe, "cat") for rid, recipe in merges.items()}
    plan = [("m2", None), ("pa", "a"), ("base", None), ("m3", None), ("pc", "c"), ("m2b", None)]
    names["m2b"], merges["m2b"] = names["m2"], merges["m2"]
    engine = make_engine(model_dir, adapters, decode_buckets=decode_buckets)
    prompts = _prompts(len(plan), seed=1)
    for (rid, adapter), prompt in zip(plan, prompts, strict=True):
        engine.add_request(rid, prompt, greedy(N_TOKENS), adapter, merge=merges.get(rid))
    outs, logits = _run_capturing(engine)
    for (rid, adapter), prompt in zip(plan, prompts, strict=True):
        _check(ref, prompt, names.get(rid, adapter), outs[rid], logits[rid])


def test_decode_steps_with_merged_rows_run_eagerly_beside_graphs(setup, monkeypatch):
    """With decode graphs (the CPU stand-in, paged reference kernel): a decode step holding merged rows is not
    replayed (a graph holds the one-slot gather form), and the steps without them still are."""
    monkeypatch.setenv("LORAPLEX_PAGED_ATTENTION", "reference")
    model_dir, adapters, ref = setup
    recipe = MergeRecipe((("a", 0.7), ("b", 0.3)))
    peft_name = _peft_adapter(ref, recipe, "cat")
    engine = make_engine(model_dir, adapters, max_num_seqs=4)
    graphs = DecodeGraphs.for_device(engine.runner.forward_decode, engine.lora, torch.device("cpu"),
                                     engine.runner.static_tensors)
    engine.runner.use_graphs(graphs, 4)
    prompts = _prompts(2, seed=6)
    engine.add_request("m", prompts[0], greedy(N_TOKENS), merge=recipe)
    outs, logits = _run_capturing(engine)
    _check(ref, prompts[0], peft_name, outs["m"], logits["m"])
    assert graphs.replays == 0
    engine.add_request("pa", prompts[1], greedy(N_TOKENS), "a")
    outs, logits = _run_capturing(engine)
    _check(ref, prompts[1], "a", outs["pa"], logits["pa"])
    assert graphs.replays == N_TOKENS - 1


def _dare_masks_from_recipe(monkeypatch: pytest.MonkeyPatch, ref: PeftReference, recipe: MergeRecipe) -> None:
    """Make PEFT's DARE draw the masks our recipe draws: PEFT's random_pruning takes the global RNG in module
    order; ours a generator per (seed, module, adapter). Only the mask source changes: PEFT's own pruning
    formula, dare functions and SVD path run as they are."""
    module_names = {id(m): n for n, m in ref.model.base_model.model.named_modules()}
    current: dict[str, object] = {}
    svd_merge = LoraModel._svd_generalized_task_arithmetic_weighted_adapter

    def per_module(self, combination_type, adapters, weights, new_rank, target, *args, **kwargs):
        present = [i for i, a in enumerate(adapters) if a in target.lora_A]  # PEFT's valid adapters, in order
        current.update(module=module_names[id(target)], indices=iter(present))
        return svd_merge(self, combination_type, adapters, weights, new_rank, target, *args, **kwargs)

    def random_pruning(tensor, density, rescale):
        gen = merge_mod.dare_generator(recipe, current["module"], next(current["indices"]))
        pruned = tensor * torch.bernoulli(torch.full_like(tensor, density), generator=gen)
        return pruned / density if rescale else pruned

    monkeypatch.setattr(LoraModel, "_svd_generalized_task_arithmetic_weighted_adapter", per_module)
    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)


@pytest.mark.parametrize(("strategy", "combination", "density"), [
    ("ties", "ties_svd", 0.5),
    ("ties", "ties_svd", 1.0),
    ("dare_linear", "dare_linear_svd", 0.6),
    ("dare_ties", "dare_ties_svd", 0.7),
])
def test_virtual_merge_equals_peft_svd_combination(setup, monkeypatch, strategy, combination, density):
    model_dir, adapters, ref = setup
    recipe = MergeRecipe((("a", 0.6), ("b", 0.9), ("c", -0.3)), strategy, density, seed=5)
    if strategy.startswith("dare"):
        _dare_masks_from_recipe(monkeypatch, ref, recipe)
    peft_name = _peft_adapter(ref, recipe, combination, density=density, majority_sign_method="total")
    engine = make_engine(model_dir, adapters)
    prompts = _prompts(2, seed=2)
    engine.add_request("v", prompts[0], greedy(N_TOKENS), merge=recipe)
    engine.add_request("pa", prompts[1], greedy(N_TOKENS), "a")
    outs, logits = _run_capturing(engine)
    _check(ref, prompts[0], peft_name, outs["v"], logits["v"])
    _check(ref, prompts[1], "a", outs["pa"], logits["pa"])
    resident = engine.adapters.resident()
    assert recipe.virtual_name in resident["device"]  # one slot for the whole recipe ...
    assert not {"b", "c"} & set(resident["device"])  # ... and no component took one


def test_virtual_adapter_is_computed_once_and_shared(setup):
    model_dir, adapters, _ = setup
    recipe = MergeRecipe((("a", 0.5), ("b", 0.5)), "ties", 0.5)
    reads: list[str] = []
    engine = make_engine(model_dir, adapters)
    read = engine.host_loader._loader
    engine.host_loader._loader = lambda name: reads.append(name) or read(name)
    prompts = _prompts(3, seed=3)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(4), merge=MergeRecipe((("a", 0.5), ("b", 0.5)), "ties", 0.5))
    run_to_completion(engine)
    engine.add_request("later", prompts[0], greedy(4), merge=recipe)
    outs = run_to_completion(engine)
    assert outs["later"][-1].finish_reason == "length"
    assert sorted(reads) == ["a", "b"]  # the components were read once, for the one computation


def test_merge_holds_every_slot_or_none_and_waits_without_holding(setup):
    """max_loras 2: a running request on c holds one slot, so a merge of a and b cannot have both; it must not
    keep a's ref while it waits (all or nothing per step), and runs once c's request is done."""
    model_dir, adapters, ref = setup
    recipe = MergeRecipe((("a", 0.7), ("b", 0.3)))
    peft_name = _peft_adapter(ref, recipe, "cat")
    engine = make_engine(model_dir, adapters, max_loras=2)
    prompts = _prompts(2, seed=4)
    engine.add_request("pc", prompts[0], greedy(12), "c")
    while not engine.scheduler.running:
        engine.step()
    engine.add_request("m", prompts[1], greedy(N_TOKENS), merge=recipe)
    waited = 0
    while "pc" in engine.requests:  # c's request runs to its end; the merge waits all along, holding nothing
        assert not engine.requests["m"].holds_adapter
        assert engine.adapters.refcount("a") == engine.adapters.refcount("b") == 0
        waited += 1
        engine.step()
    assert waited > 5
    outs, logits = _run_capturing(engine)
    _check(ref, prompts[1], peft_name, outs["m"], logits["m"])


def test_merge_keeps_its_slots_through_preemption(setup):
    model_dir, adapters, ref = setup
    recipe = MergeRecipe((("a", 0.7), ("b", 0.3)))
    peft_name = _peft_adapter(ref, recipe, "cat")
    engine = make_engine(model_dir, adapters, num_kv_blocks=12, block_size=4)  # 48 positions: too few for all
    held: list[tuple[bool, tuple[int, ...]]] = []  # at each preemption: does it keep its refs and slots?
    engine.scheduler.on_preempt = lambda r: held.append((r.holds_adapter, r.merge_slots))
    prompts = _prompts(4, seed=5)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"m{i}", prompt[:12], greedy(14), merge=recipe)
    outs, logits = _run_capturing(engine)
    assert held, "the pool was meant to be too small"
    assert all(holds and len(slots) == 2 for holds, slots in held)
    for i, prompt in enumerate(prompts):
        _check(ref, prompt[:12], peft_name, outs[f"m{i}"], logits[f"m{i}"])
    assert engine.adapters.refcount("a") == engine.adapters.refcount("b") == 0


def test_a_merge_naming_an_adapter_that_fails_to_load_fails_with_its_name(setup):
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    engine.add_request("m", _prompts(1)[0], greedy(4), merge=MergeRecipe((("a", 0.5), ("nope", 0.5))))
    engine.add_request("v", _prompts(1)[0], greedy(4), merge=MergeRecipe((("a", 0.5), ("gone", 0.5)), "ties"))
    engine.add_request("ok", _prompts(1)[0], greedy(4), "a")
    outs = run_to_completion(engine)
    assert outs["m"][-1].finish_reason == "error" and "'nope'" in outs["m"][-1].error
    assert outs["v"][-1].finish_reason == "error" and "'gone'" in outs["v"][-1].error
    assert outs["ok"][-1].finish_reason == "length"
    assert engine.adapters.refcount("a") == 0


def test_a_recipe_is_its_own_fairness_tenant(setup):
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    recipe = MergeRecipe((("a", 0.7), ("b", 0.3)))
    engine.add_request("m", _prompts(1)[0], greedy(8), merge=recipe)
    engine.add_request("pa", _prompts(1)[0], greedy(8), "a")
    assert set(engine.scheduler.vtc.backlog()) == {"merge:a*0.7+b*0.3", "a"}
    while engine.scheduler.waiting or not engine.scheduler.running:
        engine.step()
    engine.step()
    assert engine.scheduler.vtc.counter(recipe.label) > 0  # charged apart from the adapters it merges
    run_to_completion(engine)
