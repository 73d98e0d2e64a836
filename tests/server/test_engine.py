"""The engine: continuous batching over mixed adapters equals PEFT one request at a time."""

from __future__ import annotations

import random

import pytest

from loraplex.adapters.targets import TARGET_MODULES
from loraplex.server.engine.sampling_params import SamplingParams

from .engine_helpers import PeftReference, greedy, make_engine, run_to_completion, tokens_of

ALL7 = TARGET_MODULES


@pytest.fixture(scope="module")
def setup(tiny_model_dir, adapter_dir):
    model_dir = tiny_model_dir("llama")
    adapters = {
        "a4": adapter_dir("llama", 4, ("q_proj", "v_proj"), 11),
        "a8": adapter_dir("llama", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), 12),
        "a16": adapter_dir("llama", 16, ALL7, 13),
    }
    return model_dir, adapters, PeftReference(model_dir, adapters)


def _prompts(n, seed=0, lo=3, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(5, 500) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def test_staggered_arrivals_match_peft(setup):
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters, max_batch_tokens=32)  # forces chunked prefill of long prompts
    plan = [("r0", "a4"), ("r1", None), ("r2", "a16"), ("r3", "a8"), ("r4", "a4"), ("r5", None), ("r6", "a16")]
    prompts = _prompts(len(plan), lo=3, hi=60)
    outs: dict[str, list] = {}
    for i, (rid, adapter) in enumerate(plan):
        engine.add_request(rid, prompts[i], greedy(12 + i), adapter)
        for _ in range(3):  # the next request joins a batch that is already running
            for o in engine.step().outputs:
                outs.setdefault(o.request_id, []).append(o)
    for rid, got in run_to_completion(engine).items():
        outs.setdefault(rid, []).extend(got)
    for i, (rid, adapter) in enumerate(plan):
        assert tokens_of(outs[rid]) == ref.generate(prompts[i], adapter, 12 + i), rid
        assert outs[rid][-1].finish_reason == "length"
    assert engine.pool.num_free == engine.pool.num_blocks


def test_small_pool_preempts_and_still_completes(setup):
    model_dir, adapters, ref = setup
    # 12 blocks x 4 tokens = 48 positions; 6 requests of ~40 tokens each cannot all be resident.
    engine = make_engine(model_dir, adapters, num_kv_blocks=12, block_size=4)
    preempted = []
    engine.scheduler.on_preempt = preempted.append
    names = ["a4", None, "a8", "a16", None, "a4"]
    prompts = _prompts(len(names), seed=1, lo=8, hi=20)
    for i, a in enumerate(names):
        engine.add_request(f"r{i}", prompts[i], greedy(20), a)
    outs = run_to_completion(engine)
    assert preempted, "the pool was meant to be too small"
    for i, a in enumerate(names):
        assert tokens_of(outs[f"r{i}"]) == ref.generate(prompts[i], a, 20)
    assert engine.pool.num_free == engine.pool.num_blocks


def test_abort_frees_blocks_and_adapter_refs(setup):
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    for i, a in enumerate(["a4", "a8", None, "a16"]):
        engine.add_request(f"r{i}", _prompts(1, seed=i)[0], greedy(40), a)
    for _ in range(4):
        engine.step()
    assert engine.pool.num_free < engine.pool.num_blocks
    out = engine.abort("r1")
    assert out.finished and out.finish_reason == "abort"
    engine.abort("r3")
    outs = run_to_completion(engine)
    assert set(outs) <= {"r0", "r2"}
    assert engine.pool.num_free == engine.pool.num_blocks
    assert all(engine.adapters.refcount(n) == 0 for n in adapters)


def test_seeded_sampling_is_reproducible_and_batch_independent(setup):
    model_dir, adapters, _ = setup
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    prompt = _prompts(1, seed=7)[0]

    def run(others: int, **engine_kw):
        engine = make_engine(model_dir, adapters, **engine_kw)
        for i in range(others):  # seeded, unseeded, greedy and penalised rows on every adapter and the base
            engine.add_request(f"o{i}", _prompts(1, seed=20 + i)[0], SamplingParams(
                max_tokens=10, temperature=(0.0, 0.8, 1.3)[i % 3], seed=i if i % 2 else None,
                repetition_penalty=1.3 if i % 5 == 0 else 1.0), ["a16", None, "a4", "a8"][i % 4])
        engine.add_request("x", prompt, params, "a8")
        return tokens_of(run_to_completion(engine)["x"])

    alone = run(0)
    assert run(0) == alone
    assert run(31) == alone  # a batch of 32
    assert run(31, num_kv_blocks=40, max_batch_tokens=16) == alone  # preempted and recomputed on the way


def test_stop_string_spanning_tokens(setup, tokenizer):
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    prompt = _prompts(1, seed=3)[0]
    engine.add_request("full", prompt, greedy(24), "a8")
    full = run_to_completion(engine)["full"]
    text = "".join(o.new_text for o in full)
    # choose a stop string that starts inside one token's text and ends inside a later one
    pieces = [o.new_text for o in full]
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = text[start : start + 4]
    assert len(stop) == 4 and text.find(stop) == start, "pick a stop that occurs first at that offset"
    engine.add_request("stopped", prompt, greedy(24, stop=(stop,)), "a8")
    got = run_to_completion(engine)["stopped"]
    assert "".join(o.new_text for o in got) == text[:start]
    assert got[-1].finish_reason == "stop"


def test_unknown_adapter_fails_only_its_request(setup):
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters)
    engine.add_request("bad", [5, 6, 7], greedy(4), "nope")
    engine.add_request("good", [5, 6, 7], greedy(4), "a4")
    outs = run_to_completion(engine)
    assert outs["bad"][-1].finish_reason == "error" and "nope" in outs["bad"][-1].error
    assert tokens_of(outs["good"]) == ref.generate([5, 6, 7], "a4", 4)


def test_a_failing_slot_copy_fails_only_that_adapters_requests(setup):
    """The engine copies weights into slots at its step start; a copy that raises (e.g. out of device memory)
    marks only that adapter errored, frees its slot, and fails only its requests."""
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters)
    write = engine.slot_writer.write

    def picky(slot, weights):
        if weights.max_rank == 8:
            raise RuntimeError("device out of memory")
        write(slot, weights)

    engine.slot_writer.write = picky
    engine.add_request("bad", [5, 6, 7], greedy(4), "a8")
    engine.add_request("good", [5, 6, 7], greedy(4), "a4")
    outs = run_to_completion(engine)
    assert outs["bad"][-1].finish_reason == "error" and "out of memory" in outs["bad"][-1].error
    assert tokens_of(outs["good"]) == ref.generate([5, 6, 7], "a4", 4)
    assert "out of memory" in engine.adapter_port.snapshot.view("a8").error
    assert engine.adapters.resident()["device"] == ["a4"]
