"""The decode step is capturable (DESIGN "The hot path"): padded to a batch bucket it has static shapes, no
host synchronisation inside the forward, and the same ops whatever adapters it serves; and padding changes
no request's tokens."""

from __future__ import annotations

import pytest

from loraplex.adapters.ops.trace import OpTrace, traced_forward
from loraplex.adapters.targets import TARGET_MODULES
from loraplex.server.engine.model_runner import bucket

from .engine_helpers import PeftReference, greedy, make_engine, run_to_completion, tokens_of

PROMPT = [7, 19, 23, 42, 5, 77, 101, 9]


@pytest.fixture(scope="module")
def adapters(adapter_dir, tiny_model_dir):
    # Same rank, different targets and weights: a captured graph must not care which adapters it serves.
    targets = [("q_proj", "v_proj"), TARGET_MODULES, ("o_proj", "down_proj"), TARGET_MODULES]
    return tiny_model_dir("llama"), {f"ad{i}": adapter_dir("llama", 8, t, 40 + i) for i, t in enumerate(targets)}


def _decoding(engine, names: list[str | None], prefix: str) -> None:
    """Add one request per name and step until every one of them has prefilled (the next step decodes)."""
    for i, name in enumerate(names):
        engine.add_request(f"{prefix}{i}", PROMPT, greedy(100), name)  # nobody finishes while others load
    while any(not r.output_ids for r in engine.requests.values()):
        engine.step()


def _traced_decode_step(engine) -> OpTrace:
    """One engine step with its forward under OpTrace(forbid_sync=True): a host sync raises."""
    with traced_forward(engine.runner.model) as trace:
        engine.step()
    return trace


def test_bucket_sizes():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 9, 16, 17)] == [1, 2, 4, 4, 8, 16, 16, 32]


def test_decode_step_has_no_host_sync_and_the_same_ops_for_other_adapters(adapters):
    """Two decode steps of one bucket (3 requests -> 4) serving different resident adapters: no host sync in
    the forward, and the very same ops with the same shapes in the same order."""
    model_dir, paths = adapters
    engine = make_engine(model_dir, paths, decode_buckets=True)
    _decoding(engine, list(paths), "warm")  # all four adapters resident: the rank bounds are theirs
    for rid in list(engine.requests):
        engine.abort(rid)
    traces = []
    for names, prefix in ((["ad0", "ad1", None], "a"), (["ad2", "ad3", "ad2"], "b")):
        _decoding(engine, names, prefix)
        traces.append(_traced_decode_step(engine))
        for rid in list(engine.requests):
            engine.abort(rid)
    assert traces[0].syncs == traces[1].syncs == []
    assert traces[0].shapes == traces[1].shapes  # same ops, same shapes, same order
    lora_calls = sum(1 for name, _ in traces[0].shapes if name == "aten.bmm") // 2
    assert lora_calls == len(TARGET_MODULES) * 2  # every wrapped linear of the 2 layers, whoever it serves


def test_a_whole_decode_step_syncs_with_the_host_at_most_once(adapters):
    model_dir, paths = adapters
    engine = make_engine(model_dir, paths, decode_buckets=True)
    _decoding(engine, ["ad0", "ad1", "ad2"], "r")
    with OpTrace(forbid_sync=False) as trace:
        engine.step()
    assert len(trace.syncs) <= 1, trace.syncs


def test_padded_decode_matches_peft(adapters):
    """Bucket padding (pad rows on the scratch KV position and the null LoRA slot) changes no token."""
    model_dir, paths = adapters
    ref = PeftReference(model_dir, paths)
    engine = make_engine(model_dir, paths, decode_buckets=True, max_batch_tokens=24)
    plan = [("ad0", 9), (None, 5), ("ad1", 12), ("ad3", 3), ("ad2", 7)]
    prompts = {f"q{i}": PROMPT[: 3 + i] * (1 + i % 2) for i in range(len(plan))}
    for i, (name, n) in enumerate(plan):
        engine.add_request(f"q{i}", prompts[f"q{i}"], greedy(n), name)
    outs = run_to_completion(engine)
    for i, (name, n) in enumerate(plan):
        assert tokens_of(outs[f"q{i}"]) == ref.generate(prompts[f"q{i}"], name, n), (i, name)
