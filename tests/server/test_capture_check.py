"""The CPU stand-in for CUDA-graph capture (capture_check.py, CheckedGraph) catches what a plain re-run hides:
a planted host sync, a tensor made from host data, a read of a tensor that is not a static buffer, and Python
state frozen at capture. And the engine's real decode forward passes it (test_cuda_graphs.py serves PEFT's
tokens through it)."""

from __future__ import annotations

import pytest
import torch

from loraplex.adapters.ops.trace import HostSyncError
from loraplex.server.engine.capture_check import CaptureCheck, CaptureError
from loraplex.server.engine.cuda_graphs import CheckedGraph, DecodeGraphs
from loraplex.server.engine.paged_kernels import PagedMetadata

from .engine_helpers import make_engine

WEIGHT = torch.randn(4, 4)


def _graph(*static: torch.Tensor) -> CheckedGraph:
    return CheckedGraph(lambda: [WEIGHT, *static])


def test_a_clean_forward_captures_and_replays_new_buffer_values():
    buf = torch.ones(2, 4)
    graph = _graph(buf)
    out = graph.capture(lambda: (buf @ WEIGHT).relu())
    buf.fill_(2.0)
    graph.replay()
    torch.testing.assert_close(out, (torch.full((2, 4), 2.0) @ WEIGHT).relu())


def test_a_planted_host_sync_fails_the_capture():
    buf = torch.ones(2, 4)
    with pytest.raises(HostSyncError, match="aten._local_scalar_dense"):
        _graph(buf).capture(lambda: buf * (buf.sum().item() > 0))
    with pytest.raises(HostSyncError, match="Tensor.tolist"):
        _graph(buf).capture(lambda: buf[: len([x for x in buf[:, 0].tolist() if x])])


def test_a_tensor_made_from_host_data_fails_the_capture():
    buf = torch.ones(2, 4)
    with pytest.raises(CaptureError, match="made from host data"):
        _graph(buf).capture(lambda: buf + torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_reading_a_tensor_that_is_not_a_static_buffer_fails():
    buf, outside = torch.ones(2, 4), torch.ones(2, 4)  # `outside`: e.g. a fresh per-step tensor in a closure
    with pytest.raises(CaptureError, match="neither a static buffer nor computed inside the graph"):
        _graph(buf).capture(lambda: buf + outside)


def test_python_state_frozen_at_capture_fails_the_replay():
    buf, state = torch.ones(8, 4), {"n": 4}
    graph = _graph(buf)
    graph.capture(lambda: buf[: state["n"]].sum(0))  # a host int picks the shape: a graph keeps the old one
    graph.replay()  # same state: fine
    state["n"] = 6
    with pytest.raises(CaptureError, match="other ops than the captured one"):
        graph.replay()


def test_a_static_tensor_swapped_between_replays_fails():
    bufs = [torch.ones(2, 4), torch.ones(2, 4)]
    which = {"i": 0}
    graph = CheckedGraph(lambda: [WEIGHT, *bufs])
    graph.capture(lambda: bufs[which["i"]] @ WEIGHT)
    which["i"] = 1
    with pytest.raises(CaptureError, match="other static tensors"):
        graph.replay()


def test_the_engine_refuses_a_decode_forward_with_a_planted_host_sync(monkeypatch, tiny_model_dir):
    """Capture at start runs the real decode forward under the checks: a paged kernel that reads a device value
    on the host (here the context lengths) fails the capture there, not silently at the first replay."""
    monkeypatch.setenv("LORAPLEX_PAGED_ATTENTION", "reference")
    engine = make_engine(tiny_model_dir("llama"), {}, max_num_seqs=2)
    kv = engine.runner.kv
    clean = kv.kernel

    def syncing(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PagedMetadata, scale: float | None):
        if int(meta.seqused_k.max()) > 10**9:  # the planted sync: a host read of a device value
            raise AssertionError
        return clean(q, k, v, meta, scale)

    kv.kernel = syncing
    graphs = DecodeGraphs.for_device(engine.runner.forward_decode, engine.lora, torch.device("cpu"),
                                     engine.runner.static_tensors)
    with pytest.raises(HostSyncError):
        engine.runner.use_graphs(graphs, 2)
    kv.kernel = clean
    graphs = DecodeGraphs.for_device(engine.runner.forward_decode, engine.lora, torch.device("cpu"),
                                     engine.runner.static_tensors)
    engine.runner.use_graphs(graphs, 2)
    assert len(graphs.graphs) == 2 * 2  # buckets 1 and 2, base-only and LoRA each


def test_capture_check_records_what_it_read():
    a = torch.ones(3)
    with CaptureCheck([a]) as check:
        (a * 2).sum()
    ops, reads = check.signature()
    assert [name for name, _ in ops] == ["aten.mul", "aten.sum"] and ops[0][1] == ((3,),) and len(reads) == 1
