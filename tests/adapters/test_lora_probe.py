"""Probe-and-fallback of the LoRA kernels (adapters/ops/probe.py), on the CPU with injected backends: a kernel
form that raises or computes wrong is refused at start with its reason logged and runs on the torch ops, the
others keep the backend, and an engine serving through such a backend still gives PEFT's tokens."""

from __future__ import annotations

import logging

import pytest
import torch

import loraplex.adapters.ops as ops
from loraplex.adapters.ops import LoRABatch, get_backend, probe_lora_backend
from loraplex.adapters.ops.base import LoRABackend
from loraplex.adapters.ops.probe import CASES, FORMS, ProbedBackend, case_inputs, form_of, probe_backend
from loraplex.adapters.ops.torch_ops import TorchLoRABackend
from loraplex.adapters.targets import TARGET_MODULES

from ..server.engine_helpers import PeftReference, greedy, make_engine, run_to_completion, tokens_of

CPU = torch.device("cpu")


class Broken(LoRABackend):
    """The torch ops, except that the decode form raises (a kernel that does not compile for this GPU) and
    the segments form adds twice the delta (a kernel that computes wrong)."""

    name = "broken"

    def __init__(self) -> None:
        self.calls: dict[str, int] = dict.fromkeys(FORMS, 0)

    def apply(self, y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
              batch: LoRABatch, rank: int, slot_ranks: torch.Tensor) -> None:
        form = form_of(batch)
        self.calls[form] += 1
        if form == "decode":
            raise RuntimeError("PTX .version 9.9 does not support .target sm_90a")
        for _ in range(2 if form == "segments" else 1):
            TorchLoRABackend().apply(y, x, a_stack, b_stack, batch, rank, slot_ranks)


def test_every_form_is_probed_at_every_depth_constexpr():
    assert {c.form for c in CASES} == set(FORMS)
    depths = {c.depth for c in CASES if c.form == "segments"}
    assert depths == {2, 17, 33}  # BLOCK_M 16, 32, 64
    for case in CASES:
        *_, batch, _ = case_inputs(case, 32, 48, torch.float32, CPU, 8)
        assert form_of(batch) == case.form and batch.depth == case.depth


def test_a_failing_and_a_wrong_form_fall_back_the_others_stay():
    report = probe_backend(Broken(), {(32, 48), (48, 32)}, torch.float32, CPU, 8)
    assert report.failed() == {"decode", "segments"}
    assert "RuntimeError: PTX .version 9.9" in report.problems["decode"]
    assert "differs from the torch ops" in report.problems["segments"]
    assert report.problems["weighted"] is None
    assert report.summary() == "decode torch fallback, segments torch fallback, weighted ok"


def test_the_probed_backend_routes_each_form_and_matches_the_torch_ops():
    broken = Broken()
    probed = ProbedBackend(broken, {"decode", "segments"})
    assert probed.name == "broken (torch ops for decode, segments)"
    for case in CASES:
        y, x, a, b, batch, ranks = case_inputs(case, 32, 48, torch.float32, CPU, 8)
        want = y.clone()
        TorchLoRABackend().apply(want, x, a, b, batch, 8, ranks)
        before = dict(broken.calls)
        probed.apply(y, x, a, b, batch, 8, ranks)
        torch.testing.assert_close(y, want)
        assert (broken.calls != before) == (case.form == "weighted")  # only the passing form reaches it


def test_a_form_that_raises_while_serving_moves_to_the_torch_ops(caplog):
    probed = ProbedBackend(Broken(), set())  # the probe passed (say), then decode raises at a later launch
    case = next(c for c in CASES if c.form == "decode")
    y, x, a, b, batch, ranks = case_inputs(case, 32, 48, torch.float32, CPU, 8)
    want = y.clone()
    TorchLoRABackend().apply(want, x, a, b, batch, 8, ranks)
    with caplog.at_level(logging.ERROR):
        probed.apply(y, x, a, b, batch, 8, ranks)
    torch.testing.assert_close(y, want)  # nothing half-written: the failed launch wrote nothing
    assert probed.failed == {"decode"} and "failed in the decode form" in caplog.text


@pytest.fixture
def broken_cpu_backend(monkeypatch):
    """Make the CPU's chosen backend the broken one, as a GPU's triton would be chosen."""
    broken = Broken()
    monkeypatch.setattr(ops, "_backend_for", lambda device_type, requested: broken)
    monkeypatch.setattr(ops, "_probed", {})
    return broken


def test_an_engine_over_a_broken_backend_logs_the_reasons_and_serves_peft_tokens(
        broken_cpu_backend, adapter_dir, tiny_model_dir, caplog):
    model_dir = tiny_model_dir("llama")
    paths = {"a": adapter_dir("llama", 8, ("q_proj", "v_proj"), 81), "b": adapter_dir("llama", 4, TARGET_MODULES, 82)}
    with caplog.at_level(logging.INFO):
        engine = make_engine(model_dir, paths, decode_buckets=True)  # decodes in the gather (decode) form
    assert "LoRA ops: broken refused for the decode form (decode form (depth 1" in caplog.text
    assert "refused for the segments form" in caplog.text and "kernel warm-up:" in caplog.text
    assert get_backend(CPU).name == "broken (torch ops for decode, segments)"
    plan = [("a", [5, 9, 13, 2], 6), ("b", [7, 8, 9], 5), (None, [3, 1, 4], 4)]
    for i, (name, prompt, n) in enumerate(plan):
        engine.add_request(f"r{i}", prompt, greedy(n), name)
    outs = run_to_completion(engine)
    ref = PeftReference(model_dir, paths)
    for i, (name, prompt, n) in enumerate(plan):
        assert tokens_of(outs[f"r{i}"]) == ref.generate(prompt, name, n), (i, name)
    assert broken_cpu_backend.calls["decode"] == 1  # the probe's one try; serving never called it


def test_the_torch_ops_need_no_probe():
    report = probe_lora_backend(CPU, {(32, 48)}, torch.float32, 8)
    assert report.backend == "torch" and report.problems == {}
    assert isinstance(get_backend(CPU), TorchLoRABackend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_passes_every_form_on_cuda(dtype):
    from loraplex.adapters.ops.triton_ops import TritonLoRABackend

    report = probe_backend(TritonLoRABackend(), {(4096, 4096), (4096, 11008), (11008, 4096)}, dtype,
                           torch.device("cuda"), 64)
    assert report.failed() == set(), report.problems
