"""Paged attention kernels: one call per layer attends every sequence of a step over the KV block pool.

A kernel takes the packed queries of the step and the pool viewed as pages, plus `PagedMetadata` (which
pages each sequence owns and how long its context is), and never gathers the context into a new tensor:

    kernel(q [T, H, dim], k_pages [P, bs, KVH, dim], v_pages [P, bs, KVH, dim], meta, scale) -> [T, H, dim]

Sequence i owns query rows [cu_seq_q[i], cu_seq_q[i+1]), the last queries of its seqused_k[i]-token context
(causal, aligned bottom-right: query j of n sees context positions <= seqused_k - n + j). Position p of its
context lies in page block_table[i, p // bs] at offset p % bs.

Candidates, in order, each chosen only if importable and a probe on the device matches the torch twin
(`reference_paged_attention`) at the engine's block size and dtype (flash kernels restrict page sizes):
  torch-varlen  `torch.nn.attention.varlen.varlen_attn` with `block_table` (torch >= 2.12, CUDA)
  flash-attn    `flash_attn.flash_attn_varlen_func` with `block_table` (when flash-attn is installed)
  triton        our own kernel (triton_attention.py), for older torch without flash-attn
None of them on the CPU: there the runner keeps the gather + SDPA path (attention.py). The choice is logged.
`LORAPLEX_PAGED_ATTENTION=NAME` considers only that candidate, on any device (`triton` on the CPU needs
TRITON_INTERPRET=1); `=reference` takes the torch twin (tests drive the paged metadata path on CPU), in its
sync-free decode form for decode steps (what a captured graph runs: tests check capture on the CPU with it).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PagedMetadata:
    """The step's sequences for a paged kernel, in packed order (decodes first, then prefill chunks).

    cu_seq_q:    [N + 1] int32, cumulative query rows.
    cu_seq_k:    [N + 1] int32, cumulative context lengths (what flash kernels take beside seqused_k).
    seqused_k:   [N] int32, context length of each sequence (cached tokens + this step's).
    block_table: [N, W] int32, the pool pages of each sequence; entries past its context are never read.
    max_q/max_k: the longest query chunk / context (host ints: launch sizing; static in a captured step).
    """

    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor
    seqused_k: torch.Tensor
    block_table: torch.Tensor
    max_q: int
    max_k: int


PagedKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PagedMetadata, float | None], torch.Tensor]


def reference_paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, meta: PagedMetadata,
                              scale: float | None) -> torch.Tensor:
    """The torch twin: per sequence, gather its pages and run SDPA with a bottom-right causal mask.
    Host syncs (`tolist`) and a loop: an oracle and a CPU test path, never a fast path."""
    bs, kv_heads, dim = k_pages.shape[1:]
    out = torch.empty_like(q)
    starts, used, table = meta.cu_seq_q.tolist(), meta.seqused_k.tolist(), meta.block_table.tolist()
    for i, length in enumerate(used):
        lo, hi = starts[i], starts[i + 1]
        pages = torch.tensor(table[i][: -(-length // bs)], dtype=torch.long, device=q.device)
        k = k_pages.index_select(0, pages).reshape(-1, kv_heads, dim)[:length]  # [L, KVH, dim]
        v = v_pages.index_select(0, pages).reshape(-1, kv_heads, dim)[:length]
        n = hi - lo
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(diagonal=length - n)  # [n, L]
        o = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1)[None], k.transpose(0, 1)[None].to(q.dtype),
                                           v.transpose(0, 1)[None].to(q.dtype), attn_mask=mask, scale=scale,
                                           enable_gqa=True)  # [1, H, n, dim]
        out[lo:hi] = o[0].transpose(0, 1)
    return out


def decode_paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, meta: PagedMetadata,
                           scale: float | None) -> torch.Tensor:
    """The twin for decode steps (one query per sequence, q [N, H, dim]) in tensor ops only, no host sync:
    gather every sequence's block-table row of pages (pads included, masked out by seqused_k)."""
    n, width = meta.block_table.shape
    bs, kv_heads, dim = k_pages.shape[1:]
    pages = meta.block_table.reshape(-1).long()  # [N * W]
    k = k_pages.index_select(0, pages).view(n, width * bs, kv_heads, dim).transpose(1, 2)  # [N, KVH, L, dim]
    v = v_pages.index_select(0, pages).view(n, width * bs, kv_heads, dim).transpose(1, 2)
    mask = torch.arange(width * bs, device=q.device)[None, :] < meta.seqused_k[:, None]  # [N, L]
    q4 = q.reshape(n, kv_heads, q.shape[1] // kv_heads, dim)  # the query heads of each KV group as rows
    o = F.scaled_dot_product_attention(q4, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None, None, :],
                                       scale=scale)  # [N, KVH, G, dim]
    return o.reshape(n, -1, dim)


def _reference_kernel(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, meta: PagedMetadata,
                      scale: float | None) -> torch.Tensor:
    """LORAPLEX_PAGED_ATTENTION=reference: the twin, sync-free for decode steps (a host int decides)."""
    if meta.max_q == 1 and q.shape[0] == meta.block_table.shape[0]:
        return decode_paged_attention(q, k_pages, v_pages, meta, scale)
    return reference_paged_attention(q, k_pages, v_pages, meta, scale)


def _torch_varlen() -> PagedKernel | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "block_table" not in inspect.signature(varlen_attn).parameters:  # torch < 2.12: no paged KV
        return None

    def kernel(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, meta: PagedMetadata,
               scale: float | None) -> torch.Tensor:
        return varlen_attn(q.contiguous(), k_pages, v_pages, meta.cu_seq_q, meta.cu_seq_k, meta.max_q, meta.max_k,
                           scale=scale, window_size=(-1, 0), enable_gqa=True, seqused_k=meta.seqused_k,
                           block_table=meta.block_table)

    return kernel


def _flash_attn() -> PagedKernel | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None

    def kernel(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, meta: PagedMetadata,
               scale: float | None) -> torch.Tensor:
        return flash_attn_varlen_func(q.contiguous(), k_pages, v_pages, meta.cu_seq_q, meta.cu_seq_k, meta.max_q,
                                      meta.max_k, softmax_scale=scale, causal=True, block_table=meta.block_table)

    return kernel


def _triton() -> PagedKernel | None:
    try:
        from loraplex.server.engine.triton_attention import triton_paged_attention
    except ImportError:  # no triton
        return None
    return triton_paged_attention


CANDIDATES: dict[str, Callable[[], PagedKernel | None]] = {
    "torch-varlen": _torch_varlen, "flash-attn": _flash_attn, "triton": _triton}


def select_paged_kernel(device: torch.device, dtype: torch.dtype, block_size: int, heads: int, kv_heads: int,
                        head_dim: int) -> tuple[str, PagedKernel | None]:
    """The paged kernel for this engine, chosen once at start and logged: ("gather", None) keeps the gather +
    SDPA path (the CPU, or no candidate passed its probe)."""
    forced = os.environ.get("LORAPLEX_PAGED_ATTENTION")
    if forced == "reference":
        return "reference", _reference_kernel
    if forced is None and device.type != "cuda":
        return "gather", None
    for name, make in CANDIDATES.items():
        if forced is not None and name != forced:
            continue
        kernel = make()
        if kernel is None:
            log.info("paged attention: %s not available", name)
            continue
        problem = probe(kernel, device, dtype, block_size, heads, kv_heads, head_dim)
        if problem is None:
            log.info("paged attention: %s (block size %d, %s)", name, block_size, dtype)
            return name, kernel
        log.warning("paged attention: %s refused (%s)", name, problem)
    log.warning("paged attention: no paged kernel passed on this device; decode gathers the context (torch >= "
                "2.12, flash-attn or triton give paged kernels)")
    return "gather", None


def probe(kernel: PagedKernel, device: torch.device, dtype: torch.dtype, block_size: int, heads: int,
          kv_heads: int, head_dim: int) -> str | None:
    """Run `kernel` on a small random paged batch (a decode and a prefill chunk after cached tokens, pages out
    of order) and compare with the twin; None when it matches, else why not."""
    gen = torch.Generator().manual_seed(0)
    lengths, queries = [3 * block_size - 1, 2 * block_size + 2], [1, block_size + 2]
    need = [-(-n // block_size) for n in lengths]  # 3 pages each (at --block-size 1: 2 and 4)
    pages = sum(need)
    order = [*range(pages - 1, -1, -2), *range(pages - 2, -1, -2)]  # pages out of order: 5, 3, 1, 4, 2, 0
    k_pages, v_pages = (torch.randn(pages, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
                        for _ in range(2))
    q = torch.randn(sum(queries), heads, head_dim, generator=gen).to(device, dtype)
    meta = paged_metadata(queries, lengths, [order[: need[0]], order[need[0]:]], width=max(need), device=device)
    try:
        got = kernel(q, k_pages, v_pages, meta, head_dim**-0.5)
    except Exception as exc:  # noqa: BLE001 - any failure means "not this kernel"; the reason is logged
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    want = reference_paged_attention(q.float(), k_pages.float(), v_pages.float(), meta, head_dim**-0.5)
    err = (got.float() - want).abs().max().item()
    return None if err < 2e-2 else f"differs from the torch twin by {err:.3g}"


def paged_metadata(queries: list[int], lengths: list[int], tables: list[list[int]], *, width: int,
                   device: torch.device, pad_page: int = 0) -> PagedMetadata:
    """PagedMetadata from host lists: per sequence its query count, context length and pages (padded to
    `width` with `pad_page`)."""
    cu_q, cu_k = [0], [0]
    for n, length in zip(queries, lengths, strict=True):
        cu_q.append(cu_q[-1] + n)
        cu_k.append(cu_k[-1] + length)

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

    table = padded_table(tables, width, pad_page, torch.int32).to(device, non_blocking=True)
    return PagedMetadata(i32(cu_q), i32(cu_k), i32(lengths), table, max(queries), max(lengths))


def padded_table(tables: list[list[int]], width: int, pad: int, dtype: torch.dtype) -> torch.Tensor:
    """[len(tables), width] host tensor of each row's first `width` entries, right-padded with `pad`. Costs
    O(entries), not O(rows x width): a decode step's tables are as wide as --max-model-len (a graph per bucket)
    while most contexts are far shorter (building the padded lists in Python took 12 ms per step at 64 rows x
    2048 pages)."""
    flat = torch.tensor([b for t in tables for b in t[:width]], dtype=dtype)  # [E], row after row
    # Entry j of row i goes to i * width + j: one scatter (index built on the host, no device op to size it).
    where = torch.tensor([i * width + j for i, t in enumerate(tables) for j in range(min(len(t), width))],
                         dtype=torch.long)
    table = torch.full((len(tables) * width,), pad, dtype=dtype)
    table[where] = flat
    return table.view(len(tables), width)
