"""Logprobs through the engine equal log_softmax of PEFT's logits (fp32, atol 1e-4): each generated token's,
its top-k alternatives, and every prompt token's (prompt_logprobs), with chunked prefill, preemption, and
max_tokens 0 (scoring a prompt without generating, as lm-eval's loglikelihood requests do)."""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.server.engine.sampling_params import SamplingParams

from .engine_helpers import PeftReference, greedy, make_engine, run_to_completion, tokens_of

ATOL = 1e-4


@pytest.fixture(scope="module")
def setup(tiny_model_dir, adapter_dir):
    model_dir = tiny_model_dir("llama")
    adapters = {"a4": adapter_dir("llama", 4, ("q_proj", "v_proj"), 21),
                "a8": adapter_dir("llama", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), 22)}
    return model_dir, adapters, PeftReference(model_dir, adapters)


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 500) for _ in range(n)]


def _prompt_logits(ref: PeftReference, prompt: list[int], adapter: str | None) -> torch.Tensor:
    """[P, V] fp32: PEFT's logits at every prompt position (row i predicts prompt token i + 1)."""
    with torch.no_grad(), ref._using(adapter):
        return ref.model(input_ids=torch.tensor([prompt])).logits[0].float()


def test_generated_logprobs_and_top_k_equal_peft(setup):
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters)
    plan = {"r0": ("a4", 5), "r1": (None, 3), "r2": ("a8", 0)}
    prompts = {rid: _prompt(i, 9 + i) for i, rid in enumerate(plan)}
    for rid, (adapter, k) in plan.items():
        engine.add_request(rid, prompts[rid], greedy(6, logprobs=k), adapter)
    outs = run_to_completion(engine)
    for rid, (adapter, k) in plan.items():
        tokens = tokens_of(outs[rid])
        expected = torch.log_softmax(ref.logits_along(prompts[rid], tokens, adapter), dim=-1)  # [T, V]
        got = torch.tensor([lp for o in outs[rid] for lp in o.logprobs])
        assert torch.allclose(got, expected.gather(1, torch.tensor(tokens)[:, None])[:, 0], atol=ATOL), rid
        tops = [top for o in outs[rid] for top in (o.top_logprobs or [])]
        if k == 0:
            assert all(o.top_logprobs is None for o in outs[rid])  # 0: the chosen token's only
            continue
        values, ids = expected.topk(k, dim=-1)
        assert [[t for t, _ in top] for top in tops] == ids.tolist(), rid
        assert torch.allclose(torch.tensor([[v for _, v in top] for top in tops]), values, atol=ATOL)


@pytest.mark.parametrize("max_batch_tokens", [256, 7])  # 7: the prompt is computed in several chunks
def test_prompt_logprobs_equal_peft(setup, max_batch_tokens):
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters, max_batch_tokens=max_batch_tokens)
    prompt = _prompt(3, 23)
    engine.add_request("p", prompt, greedy(2, prompt_logprobs=4), "a8")
    engine.add_request("other", _prompt(4, 15), greedy(4), "a4")  # a batch-mate that asks for nothing
    outs = run_to_completion(engine)
    (first,) = [o for o in outs["p"] if o.prompt_logprobs is not None]  # once, with the first output
    entries = first.prompt_logprobs
    assert len(entries) == len(prompt) and entries[0] is None
    expected = torch.log_softmax(_prompt_logits(ref, prompt, "a8"), dim=-1)[:-1]  # [P - 1, V]
    got = torch.tensor([e.logprob for e in entries[1:]])
    assert [e.token for e in entries[1:]] == prompt[1:]
    assert torch.allclose(got, expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], atol=ATOL)
    values, ids = expected.topk(4, dim=-1)
    assert [[t for t, _ in e.top] for e in entries[1:]] == ids.tolist()
    assert torch.allclose(torch.tensor([[v for _, v in e.top] for e in entries[1:]]), values, atol=ATOL)
    ranks = (expected > expected.gather(1, torch.tensor(prompt[1:])[:, None])).sum(-1) + 1
    assert [e.rank for e in entries[1:]] == ranks.tolist()
    assert all(o.prompt_logprobs is None for o in outs["other"])


def test_max_tokens_zero_scores_the_prompt_without_generating(setup):
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters)
    prompt = _prompt(5, 12)
    engine.add_request("score", prompt, SamplingParams(max_tokens=0, prompt_logprobs=1), None)
    engine.add_request("gen", _prompt(6, 8), greedy(5), "a4")
    outs = run_to_completion(engine)
    (only,) = outs["score"]
    assert only.finished and only.finish_reason == "length" and only.new_token_ids == []
    expected = torch.log_softmax(_prompt_logits(ref, prompt, None), dim=-1)[:-1]
    got = torch.tensor([e.logprob for e in only.prompt_logprobs[1:]])
    assert torch.allclose(got, expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], atol=ATOL)
    assert len(tokens_of(outs["gen"])) == 5
    assert engine.pool.num_free == engine.pool.num_blocks


def test_prompt_logprobs_survive_preemption_without_duplicates(setup):
    model_dir, adapters, ref = setup
    # 10 blocks x 4 tokens: three requests of ~20 tokens cannot all stay resident.
    engine = make_engine(model_dir, adapters, num_kv_blocks=10, block_size=4)
    preempted = []
    engine.scheduler.on_preempt = preempted.append
    prompts = {f"r{i}": _prompt(10 + i, 14) for i in range(3)}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, greedy(12, prompt_logprobs=0), None)
    outs = run_to_completion(engine)
    assert preempted, "the pool was meant to be too small for all three"
    for rid, prompt in prompts.items():
        (first,) = [o for o in outs[rid] if o.prompt_logprobs is not None]
        expected = torch.log_softmax(_prompt_logits(ref, prompt, None), dim=-1)[:-1]
        got = torch.tensor([e.logprob for e in first.prompt_logprobs[1:]])
        assert torch.allclose(got, expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], atol=ATOL), rid
