"""DoRA, embedding-LoRA and lm_head-LoRA adapters through the engine, beside plain LoRA and base rows.

Every request's greedy tokens equal PEFT's and each step's logits equal PEFT's teacher-forced on the same tokens
(fp32 atol 1e-4), on Llama, Mistral, Qwen2 and Qwen3, in ragged steps and in padded decode steps (the gather form,
eager and through the CUDA-graph stand-in); prompt logprobs through an lm_head adapter (many kept rows per
chunk). The op trace shows a decode step without a DoRA row runs exactly the ops it runs when no DoRA adapter
exists, and one with a DoRA row adds DoRA's ops to the layers a DoRA adapter targets, and nothing else.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from loraplex.adapters.ops.trace import OpTrace, traced_forward
from loraplex.adapters.targets import TARGET_MODULES
from loraplex.server.engine.cuda_graphs import DecodeGraphs

from .engine_helpers import PeftReference, greedy, make_engine, run_capturing, tokens_of

pytestmark = pytest.mark.usefixtures("single_torch_thread")

N_TOKENS = 8
TOL = {"atol": 1e-4, "rtol": 1e-4}
# name -> (rank, targets, seed, use_dora)
ADAPTERS = {
    "dora": (8, TARGET_MODULES, 91, True),
    "embed": (4, ("embed_tokens", "q_proj"), 92, False),
    "head": (8, ("lm_head", "v_proj"), 93, False),
    "dora_eh": (4, ("embed_tokens", "lm_head", "k_proj"), 94, True),
    "lora": (16, ("q_proj", "o_proj", "down_proj"), 95, False),
}
PLAN = ["dora", "embed", None, "head", "dora_eh", "lora", "dora", None]


def _dirs(adapter_dir, family: str, names=ADAPTERS) -> dict:
    return {n: adapter_dir(family, r, t, s, use_dora=d) for n, (r, t, s, d) in names.items()}


class References:
    """One PeftReference per adapter (PEFT refuses DoRA in a mixed batch and ties lm_head only for the adapter a
    PeftModel was made with); the base model under any of them with adapters disabled."""

    def __init__(self, model_dir, dirs: dict, **kw) -> None:
        self.refs = {name: PeftReference(model_dir, {name: d}, **kw) for name, d in dirs.items()}

    def of(self, adapter: str | None) -> PeftReference:
        return self.refs[adapter] if adapter is not None else next(iter(self.refs.values()))


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 500) for _ in range(rng.randrange(4, 20))] for _ in range(n)]


def _serve_and_check(engine, refs: References, plan: list, seed: int = 0) -> None:
    prompts = _prompts(len(plan), seed)
    for i, (adapter, prompt) in enumerate(zip(plan, prompts, strict=True)):
        engine.add_request(f"r{i}", prompt, greedy(N_TOKENS), adapter)
    outs, logits = run_capturing(engine)
    for i, (adapter, prompt) in enumerate(zip(plan, prompts, strict=True)):
        ref = refs.of(adapter)
        tokens = tokens_of(outs[f"r{i}"])
        assert tokens == ref.generate(prompt, adapter, N_TOKENS), (i, adapter)
        torch.testing.assert_close(logits[f"r{i}"], ref.logits_along(prompt, tokens, adapter), **TOL)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_mixed_batch_through_the_engine_equals_peft(family, tiny_model_dir, adapter_dir):
    model_dir, dirs = tiny_model_dir(family), _dirs(adapter_dir, family)
    _serve_and_check(make_engine(model_dir, dirs, max_loras=5), References(model_dir, dirs), PLAN)


def test_padded_decode_steps_eager_and_through_graphs_equal_peft(monkeypatch, tiny_model_dir, adapter_dir):
    """decode_buckets: the gather form (every token its own group, base rows on the null slot, DoRA factors
    gathered per token); then the same through decode graphs captured at start (CPU stand-in), where a step with
    a DoRA row replays the DoRA graph and one without it the LoRA graph."""
    model_dir, dirs = tiny_model_dir("qwen2"), _dirs(adapter_dir, "qwen2")  # qwen2: biased q/k/v, tied lm_head
    refs = References(model_dir, dirs)
    _serve_and_check(make_engine(model_dir, dirs, max_loras=5, decode_buckets=True), refs, PLAN, seed=1)
    monkeypatch.setenv("LORAPLEX_PAGED_ATTENTION", "reference")
    engine = make_engine(model_dir, dirs, max_loras=5, max_num_seqs=8, max_batch_tokens=16)
    graphs = DecodeGraphs.for_device(engine.runner.forward_decode, engine.lora, torch.device("cpu"),
                                     engine.runner.static_tensors)
    engine.runner.use_graphs(graphs, engine.config.scheduler.max_num_seqs)
    replayed = Counter()
    run = graphs.run
    graphs.run = lambda inputs, mode: replayed.update([mode]) or run(inputs, mode)
    _serve_and_check(engine, refs, PLAN, seed=2)
    plain = ["lora", None, "embed", "head"]  # no DoRA adapter among them: LoRA graphs only
    _serve_and_check(engine, refs, plain, seed=3)
    assert replayed["dora"] > 0 and replayed["lora"] > 0


def test_prompt_logprobs_through_an_lm_head_adapter(tiny_model_dir, adapter_dir):
    """A chunk's rows predicting prompt tokens all go through lm_head: its LoRA sees each of them (logits_rows)."""
    model_dir = tiny_model_dir("llama")
    dirs = _dirs(adapter_dir, "llama", {k: ADAPTERS[k] for k in ("head", "dora_eh", "lora")})
    refs = References(model_dir, dirs)
    engine = make_engine(model_dir, dirs, max_batch_tokens=12)  # prompts in chunks, beside decodes
    prompts = _prompts(3, seed=4)
    for i, (name, prompt) in enumerate(zip(("head", "dora_eh", "lora"), prompts, strict=True)):
        engine.add_request(f"p{i}", prompt, greedy(2, prompt_logprobs=0), name)
    outs, _ = run_capturing(engine)
    for i, (name, prompt) in enumerate(zip(("head", "dora_eh", "lora"), prompts, strict=True)):
        got = [entry for o in outs[f"p{i}"] for entry in (o.prompt_logprobs or [])]
        logits = refs.of(name).logits_along(prompt[:1], prompt[1:] + [0], name)[:-1]  # predicting prompt[1:]
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor([e.logprob for e in got if e is not None]), want, **TOL)


# ---- the op trace: what a step dispatches ------------------------------------------------------------------
def _decoding(engine, names: list, prefix: str) -> None:
    for i, name in enumerate(names):
        engine.add_request(f"{prefix}{i}", [7, 19, 23, 42, 5], greedy(50), name)
    while any(not r.output_ids for r in engine.requests.values()):
        engine.step()


def _traced_step(engine) -> OpTrace:
    with traced_forward(engine.runner.model) as trace:
        engine.step()
    return trace


def _trace(engine, resident: list, names: list) -> OpTrace:
    """Load `resident` (their slots stay loaded), then bring `names` to decode and trace one decode step."""
    _decoding(engine, resident, "warm")
    for rid in list(engine.requests):
        engine.abort(rid)
    _decoding(engine, names, "t")
    trace = _traced_step(engine)
    for rid in list(engine.requests):
        engine.abort(rid)
    return trace


@pytest.mark.parametrize("decode_buckets", [False, True], ids=["eager", "gather"])
def test_a_step_without_a_dora_row_runs_exactly_the_ops_of_an_engine_without_dora(decode_buckets, tiny_model_dir,
                                                                                  adapter_dir):
    model_dir = tiny_model_dir("qwen2")
    plain = {"a": adapter_dir("qwen2", 8, TARGET_MODULES, 41), "b": adapter_dir("qwen2", 8, ("q_proj",), 42)}
    dora = {"d": adapter_dir("qwen2", 8, TARGET_MODULES, 43, use_dora=True)}
    without = _trace(make_engine(model_dir, plain, decode_buckets=decode_buckets), ["a", "b"], ["a", "b", None])
    engine = make_engine(model_dir, plain | dora, decode_buckets=decode_buckets)
    beside = _trace(engine, ["a", "b", "d"], ["a", "b", None])  # a DoRA adapter resident, not in the step
    assert beside.syncs == without.syncs == []
    assert beside.shapes == without.shapes  # the very same ops, shapes and order
    with_dora = _trace(engine, ["a", "b", "d"], ["b", "d", None])  # slots 1, 2: the same (window) form as 0, 1
    assert with_dora.syncs == []
    added = Counter(with_dora.compute) - Counter(beside.compute)
    layers, biased = 2 * len(TARGET_MODULES), 2 * 3  # qwen2: q/k/v have a bias (DoRA's shift)
    assert added == Counter({"aten.index_select": layers, "aten.mul_": layers, "aten.add_": biased})
    assert not Counter(beside.compute) - Counter(with_dora.compute)
