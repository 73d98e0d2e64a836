"""Prefix caching keyed by adapter (prefix_cache.py, BlockPool): the pool's published / cached / free states, and
the engine end to end against PEFT: hits compute nothing twice and change no token; another adapter (or a
re-registration, or another cache_salt) never finds the blocks; preempted requests find their own again."""

from __future__ import annotations

import random

import pytest

from loraplex.server.engine.block_pool import BlockPool
from loraplex.server.engine.prefix_cache import KVIdentity, extend_keys
from loraplex.server.engine.sampling_params import SamplingParams

from .engine_helpers import PeftReference, greedy, make_engine, run_to_completion, tokens_of

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ---- the pool -----------------------------------------------------------------------------------------------
def test_published_blocks_are_cached_when_released_and_evicted_last():
    pool = BlockPool(4, 2)
    a: list[int] = []
    assert pool.grow(a, 4) and a == [0, 1]
    pool.publish(0, b"k0", (("x", 1),))
    pool.release(a)
    assert pool.num_free == 4 and pool.num_cached == 1 and pool.lookup([b"k0", b"k1"]) == [0]
    b: list[int] = []
    assert pool.grow(b, 6) and 0 not in b  # never-cached blocks go first
    assert pool.lookup([b"k0"]) == [0]
    c = pool.take([0])
    assert pool.holders(0) == 1 and pool.num_cached == 0 and pool.num_free == 0
    pool.release(c)
    pool.release(b)
    d: list[int] = []
    assert pool.grow(d, 8) and pool.lookup([b"k0"]) == []  # the pool needed every block: evicted
    pool.release(d)
    assert pool.num_free == 4 and pool.num_cached == 0


def test_shared_blocks_count_each_holder():
    pool = BlockPool(4, 2)
    a: list[int] = []
    pool.grow(a, 4)
    pool.publish(a[0], b"k", ())
    b = pool.take(pool.lookup([b"k"]))
    pool.release(a)
    assert pool.holders(b[0]) == 1 and pool.num_free == 3  # still held by b
    pool.release(b)
    assert pool.num_free == 4 and pool.num_cached == 1


def test_a_key_published_twice_keeps_the_first_block():
    pool = BlockPool(4, 2)
    a: list[int] = []
    b: list[int] = []
    pool.grow(a, 2)
    pool.grow(b, 2)
    pool.publish(a[0], b"same", ())
    pool.publish(b[0], b"same", ())  # computed the same prefix in the same step
    pool.release(b)
    assert pool.num_cached == 0 and pool.lookup([b"same"]) == a  # b's copy went back free


def test_forgetting_a_registration_frees_its_cached_blocks_first_and_unpublishes_held_ones():
    pool = BlockPool(4, 1)
    a: list[int] = []
    b: list[int] = []
    pool.grow(a, 2)
    pool.grow(b, 1)
    pool.publish(a[0], b"x0", (("x", 1),))
    pool.publish(a[1], b"y0", (("y", 1),))
    pool.publish(b[0], b"x1", (("x", 1), ("y", 1)))
    pool.release(a)
    assert pool.forget(("x", 1)) == 2
    assert pool.lookup([b"x0"]) == [] and pool.lookup([b"x1"]) == [] and pool.lookup([b"y0"]) == [a_y := 1]
    assert pool.num_cached == 1 and a_y == 1  # y's block stays cached
    pool.release(b)  # the held one was unpublished: it goes back free, not cached
    assert pool.num_cached == 1 and pool.num_free == 4


def test_keys_chain_the_identity_and_every_earlier_token():
    one, two = KVIdentity("adapter|salt=", (("a", 1),)), KVIdentity("adapter|salt=", (("a", 2),))
    tokens = list(range(12))

    def keys(identity, toks):
        out: list[bytes] = []
        extend_keys(out, toks, identity.root, 4, 3)
        return out

    assert keys(one, tokens) == keys(one, tokens)
    assert not set(keys(one, tokens)) & set(keys(two, tokens))  # another registration: nothing shared
    changed = keys(one, [99, *tokens[1:]])
    assert all(x != y for x, y in zip(changed, keys(one, tokens), strict=True))  # a change carries forward
    assert keys(KVIdentity("adapter|salt=t1", one.components), tokens)[0] != keys(one, tokens)[0]


# ---- the engine -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny_model_dir, adapter_dir):
    model_dir = tiny_model_dir("llama")
    adapters = {"a": adapter_dir("llama", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), 51),
                "b": adapter_dir("llama", 4, ("q_proj", "v_proj"), 52)}
    return model_dir, adapters, PeftReference(model_dir, adapters)


SYSTEM = [random.Random(3).randrange(5, 500) for _ in range(41)]


def _turn(i: int) -> list[int]:
    return SYSTEM + [random.Random(100 + i).randrange(5, 500) for _ in range(6)]


def test_a_shared_prefix_is_found_and_outputs_equal_peft(setup):
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters, block_size=4)
    engine.add_request("first", _turn(0), greedy(6), "a")
    first = run_to_completion(engine)["first"]
    assert engine.prefix_cache_hits == 0 and first[-1].num_cached_tokens == 0
    engine.add_request("second", _turn(1), greedy(6), "a")
    second = run_to_completion(engine)["second"]
    assert engine.prefix_cache_hits == 40 and second[-1].num_cached_tokens == 40  # 10 full blocks of 41 tokens
    for name, prompt, outs in (("first", _turn(0), first), ("second", _turn(1), second)):
        assert tokens_of(outs) == ref.generate(prompt, "a", 6), name
    assert engine.pool.num_free == engine.pool.num_blocks


def test_another_adapter_a_salt_or_a_prompt_scorer_computes_its_own_kv(setup):
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters, block_size=4)
    engine.add_request("a", _turn(0), greedy(5), "a")
    run_to_completion(engine)
    engine.add_request("b", _turn(0), greedy(5), "b")  # the same prompt on adapter b
    engine.add_request("base", _turn(0), greedy(5), None)
    outs = run_to_completion(engine)
    assert engine.prefix_cache_hits == 0
    assert tokens_of(outs["b"]) == ref.generate(_turn(0), "b", 5)
    assert tokens_of(outs["base"]) == ref.generate(_turn(0), None, 5)
    engine.add_request("salted", _turn(0), greedy(5), "a", cache_salt="tenant-2")
    engine.add_request("scored", _turn(0), SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1,
                                                          ignore_eos=True), "a")
    outs = run_to_completion(engine)
    assert engine.prefix_cache_hits == 0  # other salt; prompt logprobs need every position's logits
    assert tokens_of(outs["salted"]) == ref.generate(_turn(0), "a", 5)
    engine.add_request("same-salt", _turn(1), greedy(5), "a", cache_salt="tenant-2")
    run_to_completion(engine)
    assert engine.prefix_cache_hits == 40


def test_a_reregistered_adapter_never_finds_the_old_registrations_blocks(setup):
    model_dir, adapters, ref = setup
    names = {"x": adapters["a"]}
    engine = make_engine(model_dir, {**adapters, **names})
    engine.host_loader._loader = _loader_reading(engine, names)
    engine.add_request("old", _turn(0), greedy(4), "x")
    run_to_completion(engine)
    assert engine.pool.num_cached == 12  # 47 prompt + 3 computed outputs: 12 full blocks
    engine.adapter_port.forget("x")  # DELETE, then x registered again with b's weights
    names["x"] = adapters["b"]
    engine.apply_adapter_messages()
    assert engine.pool.num_cached == 0  # the old registration's blocks are free, not cached
    engine.add_request("new", _turn(1), greedy(4), "x")
    outs = run_to_completion(engine)
    assert engine.prefix_cache_hits == 0 and tokens_of(outs["new"]) == ref.generate(_turn(1), "b", 4)


def _loader_reading(engine, names):
    from loraplex.adapters.weights import load_adapter_dir

    return lambda name: load_adapter_dir(names[name], engine.lora.module_shapes(), max_rank=16)


def test_a_preempted_request_finds_its_own_blocks_and_ends_as_peft(setup):
    model_dir, adapters, ref = setup
    # 18 blocks of 4: the two requests cannot both reach 47 + 12 tokens; the newer one is preempted. Chunks of 8
    # tokens make them run side by side; both adapters are loaded first, so their order is fixed.
    engine = make_engine(model_dir, adapters, num_kv_blocks=18, block_size=4, max_batch_tokens=8)
    for name in ("a", "b"):
        engine.add_request(f"warm-{name}", [5], greedy(1), name)
    run_to_completion(engine)
    preempted = []
    engine.scheduler.on_preempt = preempted.append
    engine.add_request("one", _turn(0), greedy(12), "a")
    engine.add_request("two", _turn(1), greedy(12), "b")
    outs = run_to_completion(engine)
    assert preempted and engine.prefix_cache_hits > 0
    assert tokens_of(outs["one"]) == ref.generate(_turn(0), "a", 12)
    assert tokens_of(outs["two"]) == ref.generate(_turn(1), "b", 12)


def test_caching_off_finds_nothing(setup):
    model_dir, adapters, _ = setup
    import dataclasses

    engine = make_engine(model_dir, adapters, block_size=4)
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, prefix_caching=False)
    for i in range(2):
        engine.add_request(f"r{i}", _turn(i), greedy(3), "a")
        run_to_completion(engine)
    assert engine.prefix_cache_hits == 0 and engine.pool.num_cached == 0
