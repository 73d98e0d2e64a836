"""Scenarios the engine simulation found, shrunk, kept as regression tests (each hung or broke an invariant
before its fix). The seeded runs draw other scenarios as the generator changes; these stay as they were found."""

from __future__ import annotations

import logging

import pytest

from loraplex.server.engine.sampling_params import SamplingParams

from . import engine_sim as sim


@pytest.fixture(scope="module")
def parts(tokenizer):
    from loraplex.server.engine.guided import GuidedCompiler

    vocab = len(tokenizer)
    logging.disable(logging.ERROR)
    yield tokenizer, sim.FakeModel(vocab), GuidedCompiler(tokenizer, vocab, eos_token_ids=(tokenizer.eos_token_id,))
    logging.disable(logging.NOTSET)


def _arrive(step: int, rid: str, prompt_len: int, target: sim.Target, **params) -> sim.Event:
    prompt = tuple(range(10, 10 + prompt_len))
    return sim.Event(step, "arrive", arrival=sim.Arrival(rid, prompt, target, SamplingParams(**params)))


def test_a_linear_merge_and_a_ties_merge_no_longer_evict_each_others_slots_forever(parts):
    """Found by seed 175: with 3 slots, a linear merge of a0, a2, a1 (it needs all three at once and gives back
    the ones it got while another loads) and a ties merge of a0, a1 (one virtual slot) evicted each other's
    adapters every step: both waited forever, nothing ran. Now the first one tried, once nothing runs (or after
    starvation_steps), keeps the others from taking slots until it has its own."""
    cfg = sim.SimConfig(num_blocks=3, block_size=4, max_num_seqs=5, max_loras=3, max_batch_tokens=64,
                        max_model_len=12, policy="fair", starvation_steps=4, max_cpu_loras=5, max_load_delay=0)
    linear = sim.Target(merge=(("a0", 1.0), ("a2", 1.0), ("a1", 0.5)))
    events = (
        *(sim.Event(0, "register", name) for name in ("a0", "a1", "a2")),
        _arrive(0, "r0", 8, sim.Target(merge=(("a2", 0.5), ("a1", 1.0)), strategy="ties"), max_tokens=4,
                prompt_logprobs=0),
        _arrive(2, "r1", 4, linear, max_tokens=7, temperature=0.0),
        _arrive(2, "r2", 1, sim.Target(merge=(("a0", 1.0), ("a1", 0.25)), strategy="ties"), max_tokens=9,
                prompt_logprobs=0),
    )
    report = sim.run_scenario(sim.Scenario(cfg, events), *parts)  # every invariant, each output = its solo run
    # all three end normally (which of "length" / "stop" depends on the fake model's tokens, i.e. its KV ids)
    assert sum(report.outcomes.values()) == 3 and set(report.outcomes) <= {"length", "stop"}, report.outcomes
