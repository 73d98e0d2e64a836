"""The Triton paged attention kernel against the torch twin (on the CPU under TRITON_INTERPRET=1, on CUDA
with the `gpu` marker), and the engine serving PEFT's tokens through it."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton decorates the kernel
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from loraplex.adapters.targets import TARGET_MODULES  # noqa: E402
from loraplex.server.engine.paged_kernels import paged_metadata, probe, reference_paged_attention  # noqa: E402
from loraplex.server.engine.triton_attention import triton_paged_attention  # noqa: E402

from .engine_helpers import PeftReference, greedy, make_engine, run_to_completion, tokens_of  # noqa: E402


def _case(device: torch.device, dtype: torch.dtype, page: int, heads: int, kv_heads: int, dim: int):
    """Out-of-order pages; sequences: decodes (one short, one spanning tiles), a whole prefill, and a chunk
    of 20 queries after 13 cached tokens (two query tiles)."""
    gen = torch.Generator().manual_seed(1)
    queries, lengths = [1, 1, 7, 20], [3, 70, 7, 33]
    tables, free = [], list(torch.randperm(64, generator=gen).tolist())
    for length in lengths:
        tables.append([free.pop() for _ in range(-(-length // page))])
    k, v = (torch.randn(64, page, kv_heads, dim, generator=gen).to(device, dtype) for _ in range(2))
    q = torch.randn(sum(queries), heads, dim, generator=gen).to(device, dtype)
    meta = paged_metadata(queries, lengths, tables, width=max(map(len, tables)) + 1, device=device, pad_page=63)
    return q, k, v, meta


@pytest.mark.parametrize(("page", "heads", "kv_heads", "dim"), [(4, 4, 2, 16), (16, 4, 4, 8), (32, 8, 1, 24)])
def test_matches_the_torch_twin_in_fp32(page, heads, kv_heads, dim):
    q, k, v, meta = _case(torch.device("cpu"), torch.float32, page, heads, kv_heads, dim)
    got = triton_paged_attention(q, k, v, meta, 0.3)
    torch.testing.assert_close(got, reference_paged_attention(q, k, v, meta, 0.3), atol=1e-5, rtol=1e-5)


def test_reads_a_head_major_query_view():
    """The attention hook passes q as a [T, H, dim] view of [1, H, T, dim] (what the rotary embedding writes)."""
    q, k, v, meta = _case(torch.device("cpu"), torch.float32, 4, 4, 2, 16)
    view = q.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(triton_paged_attention(view, k, v, meta, None),
                               reference_paged_attention(q, k, v, meta, None), atol=1e-5, rtol=1e-5)


def test_passes_the_start_up_probe():
    assert probe(triton_paged_attention, torch.device("cpu"), torch.float32, 4, 4, 2, 16) is None


def test_the_engine_through_the_triton_kernel_gives_peft_tokens(monkeypatch, adapter_dir, tiny_model_dir):
    monkeypatch.setenv("LORAPLEX_PAGED_ATTENTION", "triton")
    model_dir = tiny_model_dir("llama")
    paths = {"a": adapter_dir("llama", 8, TARGET_MODULES, 81)}
    engine = make_engine(model_dir, paths, max_batch_tokens=10, decode_buckets=True)
    assert engine.attention_kernel == "triton"
    ref = PeftReference(model_dir, paths)
    plan = [("a", [5, 9, 13, 2, 7, 30, 31, 8, 40, 41, 3, 17], 5), (None, [7, 8, 9], 6)]
    for i, (name, prompt, n) in enumerate(plan):
        engine.add_request(f"r{i}", prompt, greedy(n), name)
    outs = run_to_completion(engine)
    for i, (name, prompt, n) in enumerate(plan):
        assert tokens_of(outs[f"r{i}"]) == ref.generate(prompt, name, n), (i, name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_matches_the_twin_on_cuda(dtype):
    q, k, v, meta = _case(torch.device("cuda"), dtype, 16, 32, 8, 128)
    got = triton_paged_attention(q, k, v, meta, None).float()
    want = reference_paged_attention(q.float(), k.float(), v.float(), meta, None)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
