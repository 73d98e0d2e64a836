"""KV pool sizing (kv_sizing.py): which rule chose the size, and the numbers each rule gives. The CUDA rule
(vLLM's --gpu-memory-utilization over a profile run) is checked on the CPU by faking torch.cuda's memory
functions; the engine's CPU rule end to end, with its log line."""

from __future__ import annotations

import logging

import pytest
import torch

from loraplex.server.engine import kv_sizing
from loraplex.server.engine.engine import EngineConfig
from loraplex.server.engine.kv_sizing import (
    MemorySnapshot,
    measure_cuda,
    plan_cpu,
    plan_cuda,
    plan_fixed,
)

from .engine_helpers import make_engine

GiB = 2**30


def test_flags_come_first():
    assert plan_fixed(num_blocks=7, kv_cache_memory=10**9, bytes_per_block=100).num_blocks == 7
    plan = plan_fixed(num_blocks=0, kv_cache_memory=1000, bytes_per_block=300)
    assert (plan.num_blocks, plan.rule) == (3, "--kv-cache-memory")
    assert plan_fixed(num_blocks=0, kv_cache_memory=0, bytes_per_block=300) is None
    with pytest.raises(ValueError, match="--kv-cache-memory: 100 bytes hold no KV block"):
        plan_fixed(num_blocks=0, kv_cache_memory=100, bytes_per_block=300)


def test_cpu_sizes_from_the_workload_whatever_is_free(monkeypatch):
    sizes = set()
    for free_pages in (10_000, 1_000_000, 3_000_000):  # free memory moves between starts; the pool does not
        monkeypatch.setattr(kv_sizing, "_available_ram", lambda free_pages=free_pages: free_pages * 4096)
        plan = plan_cpu(bytes_per_block=16 * 46080, block_size=16, max_num_seqs=32, max_model_len=2048,
                        total_ram=24 * GiB)
        sizes.add((plan.num_blocks, plan.rule))
    assert sizes == {(32 * 128, "workload")}
    assert "--max-num-seqs 32 x --max-model-len 2048 (128 blocks each) = 4096 blocks" in plan.reason


def test_cpu_caps_at_a_quarter_of_total_ram():
    plan = plan_cpu(bytes_per_block=GiB // 1024, block_size=16, max_num_seqs=256, max_model_len=8192, total_ram=8 * GiB)
    assert plan.num_blocks == 2 * 1024 and plan.rule == "workload, capped by RAM"
    assert "capped at 0.25 of 8.0 GiB RAM = 2048 blocks" in plan.reason


def test_cuda_gives_the_kv_pool_what_the_profile_leaves():
    snap = MemorySnapshot(total=80 * GiB, free=40 * GiB, peak_allocated=30 * GiB, reserved=38 * GiB)
    assert snap.outside_torch == 2 * GiB  # context + other processes
    plan = plan_cuda(bytes_per_block=GiB // 64, utilization=0.9, snapshot=snap, graph_bytes=GiB)
    # 0.9 x 80 = 72 GiB - 30 (peak) - 2 (outside torch) - 1 (graphs) = 39 GiB = 2496 blocks of 16 MiB
    assert plan.num_blocks == 39 * 64 and plan.rule == "--gpu-memory-utilization"
    assert "less the profile run's peak 30.00 GiB, 2.00 GiB outside torch and 1.00 GiB of CUDA graphs" in plan.reason
    with pytest.raises(RuntimeError, match="no memory left for the KV cache.*Raise --gpu-memory-utilization"):
        plan_cuda(bytes_per_block=GiB // 64, utilization=0.4, snapshot=snap)


def test_the_profile_run_is_measured_with_torch_cuda_memory_stats(monkeypatch):
    """measure_cuda resets the peak, runs the profile, and reads mem_get_info / max_memory_allocated /
    memory_reserved, here faked: the profile 'allocates' 12 GiB over 20 GiB of weights."""
    state = {"allocated": 20 * GiB, "peak": 25 * GiB, "reserved": 22 * GiB}

    def profile() -> None:
        state["peak"] = max(state["peak"], state["allocated"] + 12 * GiB)
        state["reserved"] = 34 * GiB

    def reset(device: object) -> None:
        state["peak"] = state["allocated"]  # the probe's earlier peak must not count

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * GiB - state["reserved"] - GiB, 80 * GiB))
    snap = measure_cuda(torch.device("cuda"), profile)
    assert snap == MemorySnapshot(80 * GiB, 45 * GiB, 32 * GiB, 34 * GiB) and snap.outside_torch == GiB
    plan = plan_cuda(bytes_per_block=GiB // 64, utilization=0.9, snapshot=snap)
    assert plan.num_blocks == (72 - 32 - 1) * 64


def test_engine_config_validates_the_flags():
    with pytest.raises(ValueError, match="--gpu-memory-utilization: must be in"):
        EngineConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="--kv-cache-memory"):
        EngineConfig(kv_cache_memory=-1)


def test_the_engine_logs_which_rule_chose_the_pool(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO):
        engine = make_engine(tiny_model_dir("llama"), {}, num_kv_blocks=0, max_num_seqs=3, max_model_len=40,
                             block_size=4)
    assert engine.pool.num_blocks == 3 * 10 and engine.kv_plan.rule == "workload"
    assert "KV pool: 30 blocks x 4 tokens = 120 tokens" in caplog.text
    assert "by workload: --max-num-seqs 3 x --max-model-len 40 (10 blocks each) = 30 blocks" in caplog.text


def test_the_engine_profiles_its_largest_step_on_a_stand_in_pool(tiny_model_dir, monkeypatch):
    """The CUDA rule's orchestration on the CPU: the profile step (a --max-batch-tokens prefill whose every row
    keeps its logits) runs on a one-block stand-in pool, leaves the real pool untouched, and the fake device's
    numbers give the pool."""
    engine = make_engine(tiny_model_dir("llama"), {}, num_kv_blocks=8, max_batch_tokens=48, max_model_len=64)
    ran: list[int] = []
    real_execute = type(engine.runner).execute

    def execute(runner, chunks):
        out = real_execute(runner, chunks)
        ran.append((runner.kv.scratch_block, chunks[0].n, out.prompt_logits[0][1].shape[0]))
        return out

    monkeypatch.setattr(type(engine.runner), "execute", execute)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 4 * GiB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (11 * GiB, 16 * GiB))
    before = [k.clone() for k in engine.runner.kv.k]
    plan = engine._profile_kv(GiB // 16, torch.device("cpu"), None, (2, 2, 16))
    assert ran == [(1, 48, 48)]  # stand-in pool: one block (the scratch block is block 1); every row's logits
    assert all(torch.equal(a, b) for a, b in zip(before, engine.runner.kv.k, strict=True))
    assert plan.num_blocks == int((16 * 0.9 - 3 - 1) * 16)  # 0.9 x 16 GiB - peak - outside torch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_pool_is_sized_by_the_utilization_over_a_profile_run(tiny_model_dir, caplog):
    device = torch.device("cuda")
    with caplog.at_level(logging.INFO):
        engine = make_engine(tiny_model_dir("llama"), {}, num_kv_blocks=0, device="cuda", max_batch_tokens=256)
    assert engine.kv_plan.rule == "--gpu-memory-utilization" and engine.pool.num_blocks > 0
    assert "by --gpu-memory-utilization: --gpu-memory-utilization 0.9 x" in caplog.text
    free, total = torch.cuda.mem_get_info(device)
    assert total - free <= 0.9 * total + 2**30  # the pool took what the rule gave it, not more (1 GiB slack)
