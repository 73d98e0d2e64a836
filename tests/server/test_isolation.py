"""Row isolation in the engine (BAD_INPUTS rows 33-41, 44; DESIGN "Isolation"): a request's own parameters,
prompt or adapter can fail that request only; batch-mates keep exactly the tokens they would produce alone.

Everything here drives `LLMEngine.step()` by hand, so "the bad requests share the long request's batch"
holds by construction (asserted), not by timing.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from loraplex.server.engine.async_engine import AsyncEngine, EngineDead
from loraplex.server.engine.request import Status
from loraplex.server.engine.sampling_params import SamplingParams

from .engine_helpers import (
    PeftReference,
    greedy,
    make_engine,
    overflowing_adapter,
    run_to_completion,
    tokens_of,
    wait_for_adapter_news,
)

LONG_PROMPT = [5, 9, 13, 21, 34]
BAD_PROMPT = [7, 8, 9]

# (BAD_INPUTS row, parameters) of requests that are legal, however odd; each runs beside the long request.
ODD_PARAMS = [
    ("33 subnormal temperature", dict(temperature=5e-324)),
    ("33 temperature 1e-45", dict(temperature=1e-45)),
    ("33 temperature 1e-30", dict(temperature=1e-30)),
    ("34 subnormal top_p", dict(temperature=1.0, top_p=5e-324)),
    ("35 top_k far above the vocabulary", dict(temperature=1.0, top_k=10**9)),
    ("36 seed 0", dict(temperature=1.0, seed=0)),
    ("36 seed -1", dict(temperature=1.0, seed=-1)),
    ("36 seed 2**63-1", dict(temperature=1.0, seed=2**63 - 1)),
    ("36 seed -2**63", dict(temperature=1.0, seed=-(2**63))),
    ("40 stop strings", dict(temperature=0.0, stop=("a", " ", "ab"))),
    ("41 min_tokens == max_tokens", dict(temperature=0.0, min_tokens=8)),
]
# Rows whose answers must equal plain greedy decoding: tiny temperature is greedy, tiny top_p keeps the top token.
GREEDY_EQUIVALENT = {"33 subnormal temperature", "33 temperature 1e-45", "33 temperature 1e-30", "34 subnormal top_p"}


@pytest.fixture(scope="module")
def setup(tiny_model_dir, adapter_dir, tmp_path_factory):
    model_dir = tiny_model_dir("llama")
    good = adapter_dir("llama", 8, ("q_proj", "v_proj"), 11)
    overflow = overflowing_adapter(good, tmp_path_factory.mktemp("overflow") / "overflow")
    return model_dir, {"good": good, "overflow": overflow}, PeftReference(model_dir, {"good": good})


def step_until(engine, predicate, outs: dict, timeout_s: float = 120.0) -> None:
    """Step until `predicate()` holds. Adapter reads run on another thread: after a step that scheduled nothing
    it waits for their news (the deadline only bounds a broken engine)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition never reached"
        step = engine.step()
        for o in step.outputs:
            outs.setdefault(o.request_id, []).append(o)
        if not step.computed:
            wait_for_adapter_news(engine)


def test_long_request_beside_every_odd_or_bad_request_keeps_its_tokens(setup):
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters, max_num_seqs=32)
    outs: dict = {}
    engine.add_request("long", LONG_PROMPT, greedy(40), "good")
    step_until(engine, lambda: len(engine.requests["long"].output_ids) >= 3, outs)
    for i, (_, kw) in enumerate(ODD_PARAMS):
        engine.add_request(f"odd{i}", BAD_PROMPT, SamplingParams(max_tokens=8, ignore_eos=True, **kw), None)
    engine.add_request("overflow", BAD_PROMPT, greedy(8), "overflow")  # row 39
    # The "overflow" adapter loads asynchronously; every other newcomer joins the long request's next step.
    step_until(engine, lambda: len(engine.scheduler.running) >= 1 + len(ODD_PARAMS), outs)
    assert engine.requests["long"].status is Status.RUNNING
    step_until(engine, lambda: "overflow" not in engine.requests or engine.requests["overflow"].output_ids, outs)
    outs_rest = run_to_completion(engine)
    for rid, o in outs_rest.items():
        outs.setdefault(rid, []).extend(o)

    assert tokens_of(outs["long"]) == ref.generate(LONG_PROMPT, "good", 40)
    assert outs["long"][-1].finish_reason == "length"
    plain = ref.generate(BAD_PROMPT, None, 8)
    for i, (row, _) in enumerate(ODD_PARAMS):
        final = outs[f"odd{i}"][-1]
        assert final.finished and final.finish_reason in ("stop", "length"), (row, final)
        if row in GREEDY_EQUIVALENT:
            assert tokens_of(outs[f"odd{i}"]) == plain, row
    bad = outs["overflow"][-1]
    assert bad.finish_reason == "error" and bad.error_kind == "request"
    assert "non-finite" in bad.error and "overflow" in bad.error
    assert engine.pool.num_free == engine.pool.num_blocks and not engine.has_work()


def test_a_fault_in_the_forward_fails_that_step_only_and_keeps_its_other_outputs(setup, monkeypatch):
    model_dir, adapters, ref = setup
    broken = {**adapters, "broken": model_dir / "no-such-adapter"}
    engine = make_engine(model_dir, broken, max_num_seqs=2)
    outs: dict = {}
    engine.add_request("a", LONG_PROMPT, greedy(30), "good")
    step_until(engine, lambda: len(engine.requests["a"].output_ids) >= 2, outs)
    engine.add_request("b", BAD_PROMPT, greedy(4), "broken")  # queueing it starts its (failing) load
    deadline = time.monotonic() + 120
    while engine.adapters.error("broken") is None:  # no step meanwhile: "b" is still queued after this
        assert time.monotonic() < deadline, "the load of 'broken' never failed"
        engine.adapter_port.wait_for_message(1.0)
        engine.apply_adapter_messages()  # what a step start does first, without scheduling anything
    # The next step both fails "b" in scheduling (its adapter errored) and runs "a" through a faulty forward.
    execute = engine.runner.execute

    def faulty(chunks):
        engine.runner.execute = execute
        raise RuntimeError("injected kernel fault")

    engine.runner.execute = faulty
    step = engine.step()
    by_id = {o.request_id: o for o in step.outputs}
    assert by_id["b"].finish_reason == "error" and by_id["b"].error_kind == "request"
    assert "failed to load" in by_id["b"].error
    assert by_id["a"].finish_reason == "error" and by_id["a"].error_kind == "internal"
    assert "injected kernel fault" in by_id["a"].error
    assert not engine.has_work() and engine.pool.num_free == engine.pool.num_blocks
    # The engine goes on serving.
    engine.add_request("c", LONG_PROMPT, greedy(12), "good")
    assert tokens_of(run_to_completion(engine)["c"]) == ref.generate(LONG_PROMPT, "good", 12)


def test_a_row_that_breaks_the_sampler_fails_alone(setup, monkeypatch):
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters)
    sample = engine.sampler.sample

    def picky(logits, rows, bitmask=None):  # stands in for any parameter the batched sampler cannot handle
        if any(r.params.seed == 666 for r in rows):
            raise RuntimeError("invalid multinomial distribution")
        return sample(logits, rows, bitmask)

    monkeypatch.setattr(engine.sampler, "sample", picky)
    engine.add_request("ok", LONG_PROMPT, greedy(10), "good")
    engine.add_request("odd", BAD_PROMPT, SamplingParams(max_tokens=10, temperature=0.7, seed=666), None)
    outs = run_to_completion(engine)
    assert tokens_of(outs["ok"]) == ref.generate(LONG_PROMPT, "good", 10)
    assert outs["odd"][-1].finish_reason == "error" and "invalid multinomial" in outs["odd"][-1].error


def test_sampler_edge_values_stay_finite():
    from loraplex.server.engine.sampler import Sampler, SampleRow

    logits = torch.tensor([[1e30, 0.0, -1e30, 5.0], [3.0, 2.0, 1.0, 0.0]])
    rows = [SampleRow(SamplingParams(temperature=2e-5), None), SampleRow(SamplingParams(top_p=5e-324), None)]
    assert Sampler().sample(logits, rows).tokens.tolist() == [0, 0]
    assert SamplingParams(temperature=1e-45).greedy and not SamplingParams(temperature=1e-5).greedy


# ---- the engine thread ------------------------------------------------------------------------------
async def test_a_failing_inbox_item_fails_its_request_only(setup, monkeypatch):
    model_dir, adapters, ref = setup
    core = make_engine(model_dir, adapters)
    add = core.add_request

    def flaky(request_id, *args):
        if args[0] == BAD_PROMPT:
            raise KeyError("unexpected bug while queueing")
        return add(request_id, *args)

    monkeypatch.setattr(core, "add_request", flaky)
    engine = AsyncEngine(core)
    engine.start()
    try:
        bad = [o async for o in engine.generate(BAD_PROMPT, greedy(4))]
        good = [o async for o in engine.generate(LONG_PROMPT, greedy(6), "good")]
    finally:
        engine.stop()
    assert bad[-1].finish_reason == "error" and bad[-1].error_kind == "internal"
    assert tokens_of(good) == ref.generate(LONG_PROMPT, "good", 6)


async def test_a_dead_engine_thread_fails_every_stream_at_once_and_asks_to_exit(setup):
    model_dir, adapters, _ = setup
    engine = AsyncEngine(make_engine(model_dir, adapters))
    fatal: list[str] = []
    engine.on_fatal = fatal.append
    engine.allow_steps(2)  # the stream is open and unfinished when the thread dies, by construction
    engine.start()
    try:
        stream = engine.generate(LONG_PROMPT, greedy(100), "good")
        first = await anext(stream)
        engine.crash("simulated fatal fault")
        rest = [o async for o in stream]
        assert first.new_token_ids and rest[-1].finish_reason == "error"
        assert rest[-1].error_kind == "unavailable" and "simulated fatal fault" in rest[-1].error
        assert fatal and "simulated fatal fault" in fatal[0] and not engine.alive
        with pytest.raises(EngineDead):
            await anext(engine.generate(LONG_PROMPT, greedy(4)))
    finally:
        engine.stop()
    await asyncio.sleep(0)


# ---- unregistering an adapter (DESIGN: in-flight requests finish, queued ones fail, new ones 404) ------
def test_delete_lets_started_requests_finish_even_after_preemption(setup):
    model_dir, adapters, ref = setup
    engine = make_engine(model_dir, adapters, max_num_seqs=1)
    outs: dict = {}
    engine.add_request("started", LONG_PROMPT, greedy(20), "good")
    engine.add_request("queued", BAD_PROMPT, greedy(4), "good")  # the sequence cap keeps it waiting
    step_until(engine, lambda: len(engine.requests["started"].output_ids) >= 3, outs)
    # What DELETE does: the store posts "forget" to the engine, the engine fails requests that never started.
    engine.adapter_port.forget("good")
    for o in engine.fail_adapter("good", "adapter 'good' was unregistered"):
        outs.setdefault(o.request_id, []).append(o)
    engine.scheduler.preempt(engine.requests["started"])  # e.g. the KV pool ran dry: recomputed later
    for rid, o in run_to_completion(engine).items():
        outs.setdefault(rid, []).extend(o)
    assert outs["queued"][-1].finish_reason == "error" and "unregistered" in outs["queued"][-1].error
    assert tokens_of(outs["started"]) == ref.generate(LONG_PROMPT, "good", 20)
    assert engine.adapters.tier("good") != "device"  # its slot was freed once the last user finished
