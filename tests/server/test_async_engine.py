"""AsyncEngine: concurrent streams from asyncio, early exit aborts, errors end only their request."""

from __future__ import annotations

import asyncio

import pytest

from loraplex.server.engine.async_engine import AsyncEngine

from .engine_helpers import PeftReference, greedy, make_engine


@pytest.fixture(scope="module")
def setup(tiny_model_dir, adapter_dir):
    model_dir = tiny_model_dir("qwen3")
    adapters = {"x": adapter_dir("qwen3", 8, ("q_proj", "v_proj"), 5), "y": adapter_dir("qwen3", 4, ("o_proj",), 6)}
    return model_dir, adapters, PeftReference(model_dir, adapters)


async def _collect(engine: AsyncEngine, prompt, params, adapter):
    return [o async for o in engine.generate(prompt, params, adapter)]


async def test_concurrent_streams_match_reference(setup):
    model_dir, adapters, ref = setup
    engine = AsyncEngine(make_engine(model_dir, adapters))
    engine.start()
    try:
        jobs = [([5 + i, 9, 13, 40 + i], a) for i, a in enumerate(["x", "y", None, "x", "y"])]
        results = await asyncio.gather(*(_collect(engine, p, greedy(10), a) for p, a in jobs))
        for (prompt, adapter), outs in zip(jobs, results, strict=True):
            assert [t for o in outs for t in o.new_token_ids] == ref.generate(prompt, adapter, 10)
            assert outs[-1].finished and outs[-1].num_output_tokens == 10
    finally:
        engine.stop()


async def test_leaving_the_stream_aborts_and_frees_blocks(setup):
    model_dir, adapters, _ = setup
    core = make_engine(model_dir, adapters)
    engine = AsyncEngine(core)
    engine.start()
    try:
        stream = engine.generate([5, 6, 7], greedy(200), "x")
        async for out in stream:
            if out.num_output_tokens >= 3:
                break
        await stream.aclose()
        for _ in range(200):
            if core.pool.num_free == core.pool.num_blocks and not core.has_work():
                break
            await asyncio.sleep(0.01)
        assert core.pool.num_free == core.pool.num_blocks
        assert core.adapters.refcount("x") == 0
    finally:
        engine.stop()


async def test_too_long_request_is_rejected_before_queueing(setup):
    model_dir, adapters, _ = setup
    engine = AsyncEngine(make_engine(model_dir, adapters, max_model_len=32))
    engine.start()
    try:
        with pytest.raises(ValueError, match="32"):
            await _collect(engine, list(range(5, 25)), greedy(20), None)
    finally:
        engine.stop()


async def test_device_slots_are_written_only_by_the_engine_thread(setup):
    """DESIGN "The hot path": the host loader only reads files; the engine thread copies weights into slots
    (at a step start), so no slot changes under a running forward."""
    import threading

    model_dir, adapters, ref = setup
    core = make_engine(model_dir, adapters, max_loras=1)  # one slot: "x" and "y" evict each other
    writers: list[str] = []
    load_slot = core.lora.load_slot

    def recording(slot, weights):
        writers.append(threading.current_thread().name)
        return load_slot(slot, weights)

    core.lora.load_slot = recording
    engine = AsyncEngine(core)
    engine.start()
    try:
        for adapter in ("x", "y", "x"):
            outs = await _collect(engine, [5, 9, 13], greedy(4), adapter)
            assert [t for o in outs for t in o.new_token_ids] == ref.generate([5, 9, 13], adapter, 4)
    finally:
        engine.stop()
    assert len(writers) == 3 and set(writers) == {"loraplex-engine"}
