"""Paged attention kernels (paged_kernels.py): the torch twin against plain attention, the start-up probe
that refuses a wrong or failing kernel, and the engine's paged-metadata path end to end. On the CPU no
maintained kernel runs, so `LORAPLEX_PAGED_ATTENTION=reference` drives that path with the twin: the block
tables, context lengths and cumulative query rows the engine builds give PEFT's tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.adapters.targets import TARGET_MODULES
from loraplex.server.engine.paged_kernels import (
    paged_metadata,
    probe,
    reference_paged_attention,
    select_paged_kernel,
)

from .engine_helpers import PeftReference, greedy, make_engine, run_to_completion, tokens_of

BS, KVH, H, DIM = 4, 2, 4, 8


def _contiguous_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
    """q [n, H, dim] are the last n queries of a context k/v [L, KVH, dim]; plain causal SDPA over it."""
    length = k.shape[0]
    mask = torch.ones(n, length, dtype=torch.bool).tril(diagonal=length - n)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, enable_gqa=True)
    return o[0].transpose(0, 1)


def test_the_twin_reads_out_of_order_pages_as_contiguous_attention():
    gen = torch.Generator().manual_seed(0)
    pages = torch.randn(8, BS, KVH, DIM, generator=gen), torch.randn(8, BS, KVH, DIM, generator=gen)
    tables, lengths, queries = [[5, 2, 7], [0], [3, 6]], [11, 1, 6], [1, 1, 6]  # decode, decode, a whole prefill
    q = torch.randn(sum(queries), H, DIM, generator=gen)
    meta = paged_metadata(queries, lengths, tables, width=4, device=torch.device("cpu"), pad_page=4)
    got = reference_paged_attention(q, *pages, meta, None)
    row = 0
    for table, length, n in zip(tables, lengths, queries, strict=True):
        k, v = (p[table].reshape(-1, KVH, DIM)[:length] for p in pages)
        torch.testing.assert_close(got[row:row + n], _contiguous_attention(q[row:row + n], k, v, n))
        row += n


def test_metadata_counts_rows_and_contexts():
    meta = paged_metadata([1, 3], [9, 5], [[2, 0, 1], [4, 3]], width=3, device=torch.device("cpu"), pad_page=7)
    assert meta.cu_seq_q.tolist() == [0, 1, 4] and meta.cu_seq_k.tolist() == [0, 9, 14]
    assert meta.seqused_k.tolist() == [9, 5] and meta.block_table.tolist() == [[2, 0, 1], [4, 3, 7]]
    assert (meta.max_q, meta.max_k) == (3, 9) and meta.block_table.dtype == torch.int32


def test_the_probe_accepts_the_twin_and_refuses_wrong_or_failing_kernels():
    args = (torch.device("cpu"), torch.float32, BS, H, KVH, DIM)
    assert probe(reference_paged_attention, *args) is None

    def off_by_one(q, k, v, meta, scale):  # ignores the last context position of every sequence
        short = meta.__class__(meta.cu_seq_q, meta.cu_seq_k, meta.seqused_k - 1, meta.block_table, meta.max_q,
                               meta.max_k)
        return reference_paged_attention(q, k, v, short, scale)

    def unsupported(q, k, v, meta, scale):
        raise RuntimeError("Paged KV cache block size must be divisible by 256")

    assert "differs from the torch twin" in probe(off_by_one, *args)
    assert "divisible by 256" in probe(unsupported, *args)


def test_the_cpu_keeps_the_gather_path(monkeypatch):
    monkeypatch.delenv("LORAPLEX_PAGED_ATTENTION", raising=False)
    assert select_paged_kernel(torch.device("cpu"), torch.float32, 16, H, KVH, DIM) == ("gather", None)


@pytest.mark.parametrize("decode_buckets", [False, True])
def test_the_engine_through_a_paged_kernel_gives_peft_tokens(monkeypatch, adapter_dir, tiny_model_dir,
                                                             decode_buckets):
    """Mixed steps (decodes beside chunked prefills continuing after cached blocks), base and adapter rows."""
    monkeypatch.setenv("LORAPLEX_PAGED_ATTENTION", "reference")
    model_dir = tiny_model_dir("llama")
    paths = {"a": adapter_dir("llama", 8, ("q_proj", "v_proj"), 61), "b": adapter_dir("llama", 4, TARGET_MODULES, 62)}
    engine = make_engine(model_dir, paths, max_batch_tokens=12, decode_buckets=decode_buckets)
    assert engine.attention_kernel == "reference"
    ref = PeftReference(model_dir, paths)
    plan = [("a", [5, 9, 13, 2, 7, 30, 31, 8, 40, 41, 3], 6), (None, [7, 8, 9], 9), ("b", [11] * 17, 5),
            ("a", [4, 4, 6], 7)]
    for i, (name, prompt, n) in enumerate(plan):
        engine.add_request(f"r{i}", prompt, greedy(n), name)
    outs = run_to_completion(engine)
    for i, (name, prompt, n) in enumerate(plan):
        assert tokens_of(outs[f"r{i}"]) == ref.generate(prompt, name, n), (i, name)


def test_padded_table_equals_padding_the_lists():
    """The block table of a step, built in O(entries) (a decode step's is as wide as --max-model-len)."""
    import random

    from loraplex.server.engine.paged_kernels import padded_table

    rng = random.Random(0)
    for _ in range(300):
        width = rng.randint(1, 9)
        tables = [[rng.randint(0, 99) for _ in range(rng.randint(0, 12))] for _ in range(rng.randint(1, 6))]
        plain = torch.tensor([t[:width] + [-1] * (width - len(t[:width])) for t in tables])
        assert torch.equal(padded_table(tables, width, -1, torch.long), plain)
