"""n > 1: choices of one request find their prompt's KV blocks in the prefix cache (not recomputed) and still
give exactly the tokens each would give alone; the pool's shared blocks return when their last holder lets go."""

from __future__ import annotations

import random

import pytest

from loraplex.server.engine.sampling_params import SamplingParams

from .engine_helpers import PeftReference, make_engine, run_to_completion, tokens_of, wait_for_adapter_news


@pytest.fixture(scope="module")
def setup(tiny_model_dir, adapter_dir):
    model_dir = tiny_model_dir("llama")
    adapters = {"a8": adapter_dir("llama", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), 31)}
    return model_dir, adapters, PeftReference(model_dir, adapters)


PROMPT = [random.Random(7).randrange(5, 500) for _ in range(30)]


def sampled(seed: int, max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, top_k=50, seed=seed, ignore_eos=True)


def test_choices_share_the_prompt_and_match_running_alone(setup):
    model_dir, adapters, _ = setup
    seeds = [11, 12, 13, 14]
    alone = {}
    for seed in seeds:  # each choice on its own engine: no sharing, nothing else in the batch
        engine = make_engine(model_dir, adapters)
        engine.add_request("x", PROMPT, sampled(seed), "a8")
        alone[seed] = tokens_of(run_to_completion(engine)["x"])
    engine = make_engine(model_dir, adapters, block_size=4)
    engine.add_request("c0", PROMPT, sampled(seeds[0]), "a8")
    for i, seed in enumerate(seeds[1:], start=1):
        engine.add_request(f"c{i}", PROMPT, sampled(seed), "a8", prefix_of="c0")
    outs = run_to_completion(engine)
    for i, seed in enumerate(seeds):
        assert tokens_of(outs[f"c{i}"]) == alone[seed], i
    assert len({tuple(alone[s]) for s in seeds}) == len(seeds)  # independent draws
    # Each of the 3 others shared the 7 full blocks before the last prompt token: 28 of 30 prompt tokens.
    assert engine.prefix_cache_hits == 3 * 28
    assert engine.pool.num_free == engine.pool.num_blocks


def test_greedy_choices_with_chunked_prefill_and_peft(setup):
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters, block_size=4, max_batch_tokens=8)  # the prompt takes 4 steps
    for i in range(3):
        engine.add_request(f"g{i}", PROMPT, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), "a8",
                           prefix_of="g0" if i else None)
    outs = run_to_completion(engine)
    expected = ref.generate(PROMPT, "a8", 6)
    assert [tokens_of(outs[f"g{i}"]) for i in range(3)] == [expected] * 3
    assert engine.prefix_cache_hits == 2 * 28
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_leader_gone_before_its_prompt_was_computed_leaves_the_others_running(setup):
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters, block_size=4, max_batch_tokens=8)
    engine.add_request("lead", PROMPT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), "a8")
    engine.add_request("follow", PROMPT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), "a8",
                       prefix_of="lead")
    while engine.requests["lead"].num_computed == 0:  # until the leader computed its first chunk (only)
        if not engine.step().computed:
            wait_for_adapter_news(engine)  # its adapter's read is asynchronous
    assert engine.abort("lead").finish_reason == "abort"
    outs = run_to_completion(engine)
    assert tokens_of(outs["follow"]) == ref.generate(PROMPT, "a8", 4)
    assert engine.prefix_cache_hits == 8  # the 2 blocks the leader computed before it left stayed cached
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_waiting_choice_can_be_aborted(setup):
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters, block_size=4, max_batch_tokens=8)
    engine.add_request("lead", PROMPT, sampled(1, 3), None)
    engine.add_request("other", PROMPT, sampled(2, 3), None, prefix_of="lead")
    assert engine.abort("other").finish_reason == "abort"  # before it ever reached the scheduler
    outs = run_to_completion(engine)
    assert "other" not in outs and len(tokens_of(outs["lead"])) == 3
    assert not engine.has_work() and engine.pool.num_free == engine.pool.num_blocks


def _steps_until_idle(engine, limit: int = 100) -> dict[str, list]:
    """Step until idle, at most `limit` steps (a hang fails fast instead of spinning)."""
    outs: dict[str, list] = {}
    for _ in range(limit):
        if not engine.has_work():
            return outs
        step = engine.step()
        for o in step.outputs:
            outs.setdefault(o.request_id, []).append(o)
        if not step.computed:
            wait_for_adapter_news(engine, 1)  # returns as soon as a read lands
    raise AssertionError(f"not idle after {limit} steps: {sorted(engine.requests)}")


def test_waiting_choices_hold_no_blocks_so_a_long_request_beside_them_finishes(setup):
    """Issue 19, bug 2: a choice handed its leader's prompt blocks before it was admitted pinned them while it
    waited; with 12 blocks of 4 and 2 sequence slots, a long request beside an n = 2 request could then never
    grow, admission stopped at no_blocks and nothing ever finished."""
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters, num_kv_blocks=12, block_size=4, max_num_seqs=2, max_batch_tokens=64,
                         max_model_len=48)
    long_prompt = PROMPT[:20]
    engine.add_request("long", long_prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), "a8")
    for i in range(2):
        engine.add_request(f"n{i}", PROMPT[:10], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
                           "a8", prefix_of="n0" if i else None)
    outs = _steps_until_idle(engine)
    assert tokens_of(outs["long"]) == ref.generate(long_prompt, "a8", 24)
    assert [tokens_of(outs[f"n{i}"]) for i in range(2)] == [ref.generate(PROMPT[:10], "a8", 10)] * 2
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.parametrize("how", ["load fails", "deleted while queued"])
def test_a_leader_that_fails_before_its_first_step_ends_every_choice(setup, how):
    """Issue 19, bug 3: the leader's adapter failed to load (or was DELETEd while queued) before any step; the
    other choices waited for it forever, has_work() stayed true and the HTTP request never answered."""
    model_dir, adapters, _ = setup
    engine = make_engine(model_dir, adapters)
    if how == "load fails":
        engine.host_loader._loader = lambda name: (_ for _ in ()).throw(OSError("the adapter's files are corrupt"))
    for i in range(3):
        engine.add_request(f"c{i}", PROMPT, sampled(i), "a8", prefix_of="c0" if i else None)
    outs = {}
    if how == "deleted while queued":
        outs = {o.request_id: [o] for o in engine.fail_adapter("a8", "adapter 'a8' was unregistered")}
    outs.update(_steps_until_idle(engine))
    assert sorted(outs) == ["c0", "c1", "c2"]
    assert all(o[-1].finish_reason == "error" for o in outs.values())
    assert not engine.has_work() and engine.pool.num_free == engine.pool.num_blocks
