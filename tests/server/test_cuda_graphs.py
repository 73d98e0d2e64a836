"""Decode graphs (cuda_graphs.py): a padded decode step copies its inputs into one graph's buffers and
replays. On the CPU the graph is `CheckedGraph` (replay re-runs the captured callable over the same
buffers under capture_check.py's checks), which checks what capture relies on: no host sync, the forward reads
nothing but those buffers, the parameters and the KV pool, buffers are refreshed for every key, and one graph
serves any adapters and context lengths. On CUDA (`gpu` marker) the same runs with real CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from loraplex.adapters.targets import TARGET_MODULES
from loraplex.server.engine.cuda_graphs import DecodeGraphs

from .engine_helpers import PeftReference, greedy, make_engine, run_to_completion, tokens_of

PLAN = [("a", [5, 9, 13, 2, 7], 9), (None, [7, 8, 9], 12), ("b", [11] * 9, 6), ("a", [4, 4, 6], 14),
        ("c", [3, 1, 4, 1, 5, 9, 2, 6], 10)]


@pytest.fixture(scope="module")
def setup(adapter_dir, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    paths = {"a": adapter_dir("llama", 8, ("q_proj", "v_proj"), 71), "b": adapter_dir("llama", 4, TARGET_MODULES, 72),
             "c": adapter_dir("llama", 16, ("o_proj", "down_proj"), 73)}
    return model_dir, paths, PeftReference(model_dir, paths)


def _serve(engine, ref) -> None:
    for i, (name, prompt, n) in enumerate(PLAN):
        engine.add_request(f"r{i}", prompt, greedy(n), name)
    outs = run_to_completion(engine)
    for i, (name, prompt, n) in enumerate(PLAN):
        assert tokens_of(outs[f"r{i}"]) == ref.generate(prompt, name, n), (i, name)


def _with_checked_graphs(engine) -> DecodeGraphs:
    graphs = DecodeGraphs.for_device(engine.runner.forward_decode, engine.lora, torch.device("cpu"),
                                     engine.runner.static_tensors)
    engine.runner.use_graphs(graphs, engine.config.scheduler.max_num_seqs)
    return graphs


def test_with_a_paged_kernel_every_bucket_is_captured_at_start_and_serves_peft_tokens(monkeypatch, setup):
    monkeypatch.setenv("LORAPLEX_PAGED_ATTENTION", "reference")
    model_dir, paths, ref = setup
    engine = make_engine(model_dir, paths, max_num_seqs=8, max_batch_tokens=16)
    graphs = _with_checked_graphs(engine)
    assert len(graphs.graphs) == 2 * 4  # buckets 1, 2, 4, 8; base-only and LoRA each
    captured = set(graphs.graphs)
    _serve(engine, ref)
    assert graphs.replays > 10
    assert set(graphs.graphs) == captured  # no capture while serving: context lengths never change a shape


def test_on_the_gather_path_nothing_is_captured_and_steps_run_eagerly(monkeypatch, setup):
    """The gather path's shapes change with the context width: graphs would be captured while serving (two
    warm-up forwards and a capture stalling a request), so nothing is captured and every step runs eagerly."""
    monkeypatch.delenv("LORAPLEX_PAGED_ATTENTION", raising=False)
    model_dir, paths, ref = setup
    engine = make_engine(model_dir, paths, max_num_seqs=8, max_batch_tokens=16)
    graphs = _with_checked_graphs(engine)
    assert graphs.graphs == {}
    _serve(engine, ref)
    assert graphs.graphs == {} and graphs.replays == 0


def test_pad_rows_touch_only_the_scratch_block(monkeypatch, setup):
    """Capturing at start runs pad-only steps: no sequence's KV block may change."""
    monkeypatch.setenv("LORAPLEX_PAGED_ATTENTION", "reference")
    model_dir, paths, _ = setup
    engine = make_engine(model_dir, paths, max_num_seqs=4)
    kv = engine.runner.kv
    for k in kv.k:
        k[: kv.scratch].fill_(7.0)
    _with_checked_graphs(engine)
    assert all(bool((k[: kv.scratch] == 7.0).all()) for k in kv.k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_give_the_eager_tokens_on_cuda(setup):
    model_dir, paths, ref = setup
    outs = {}
    for graphs_on in (False, True):
        engine = make_engine(model_dir, paths, max_num_seqs=8, max_batch_tokens=16, device="cuda",
                             cuda_graphs=graphs_on)
        assert (engine.runner.graphs is not None) == graphs_on
        for i, (name, prompt, n) in enumerate(PLAN):
            engine.add_request(f"r{i}", prompt, greedy(n), name)
        outs[graphs_on] = {k: tokens_of(v) for k, v in run_to_completion(engine).items()}
        if graphs_on:
            assert engine.runner.graphs.replays > 10
    assert outs[True] == outs[False]
    for i, (name, prompt, n) in enumerate(PLAN):  # fp32 on CUDA: PEFT's tokens too
        assert outs[True][f"r{i}"] == ref.generate(prompt, name, n), (i, name)
