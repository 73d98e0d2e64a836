# ruff: noqa: ANN001  (triton reads kernel parameter annotations as constexpr / type hints: pointers stay bare)
"""Paged attention as one Triton kernel: the CUDA candidate after the maintained kernels (paged_kernels.py).

Used where torch has no paged `varlen_attn` (torch < 2.12) and flash-attn is absent, so decode still reads the
KV pages in place instead of gathering them, and a captured decode graph serves every context length. Same
contract as every paged kernel (see paged_kernels.py); tested against the torch twin under TRITON_INTERPRET=1.

    grid (N sequences, H query heads, ceil(max_q / BLOCK_M)): one program takes BLOCK_M query rows of one
    sequence and one head, and streams that sequence's context in BLOCK_N-token tiles (a tile may span several
    pages: each token's page comes from the block table), keeping an online softmax in fp32 (FlashAttention's
    running max and sum). Causal, aligned bottom-right: query row r of n sees positions <= L - n + r, so the
    key loop stops at the last query's position. GQA: head h reads KV head h // (H / KVH).
A decode row has one query; its tile still runs tl.dot over BLOCK_M = 16 rows (15 masked): decode is bound
by reading K/V, which each program reads once. Launch sizes depend on host ints only (N, H, max_q): capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.server.engine.paged_kernels import PagedMetadata

BLOCK_M = 16  # query rows per program: tl.dot's smallest M on GPUs
BLOCK_N = 32  # context tokens per tile
WIDE_FP32_DIM = 128  # fp32 dots from this padded head dim up run on 8 warps (see num_warps)


# The block table's row stride is the step's widest context in blocks (eager steps): not specialised on, so
# it never makes a new variant (a compile) while serving. `group` (query heads per KV head) is divided once per
# program: a runtime int costs nothing and keeps one variant per head dim instead of one per GQA ratio.
@triton.jit(do_not_specialize=("stride_table", "group"))
def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, used_ptr, table_ptr, scale,
                            stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_table, group,
                            PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, DIM: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr):
    seq, head, q_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_lo = tl.load(cu_q_ptr + seq)
    n = tl.load(cu_q_ptr + seq + 1) - q_lo
    if q_tile * BLOCK_M >= n:
        return
    length = tl.load(used_ptr + seq)
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query rows of this sequence
    row_ok = rows < n
    dims = tl.arange(0, DIM)  # the head dim padded to a power of two (tl.arange's rule); the pad is masked
    dim_ok = dims < HEAD_DIM
    q_off = (q_lo + rows).to(tl.int64)[:, None] * stride_qt + head * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_M, DIM]
    if F32_DOT:
        q = q.to(tl.float32)
    pos = length - n + rows  # [BLOCK_M] each query's own position
    kv_head = head // group
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM], tl.float32)
    last = tl.minimum(length, length - n + q_tile * BLOCK_M + BLOCK_M)  # keys past the tile's last query: none
    for start in range(0, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] context positions
        col_ok = cols < length
        page = tl.load(table_ptr + seq * stride_table + cols // PAGE, mask=col_ok, other=0).to(tl.int64)
        kv_off = page[:, None] * stride_kp + (cols % PAGE)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
        kv_ok = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0.0)  # [BLOCK_N, DIM]
        v = tl.load(v_ptr + kv_off, mask=kv_ok, other=0.0)
        if F32_DOT:  # fp32 data (or bf16 under the interpreter): exact IEEE products
            k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_M, BLOCK_N] fp32
        else:  # fp16/bf16 tensor cores, fp32 accumulation
            s = tl.dot(q, tl.trans(k)) * scale
        seen = (cols[None, :] <= pos[:, None]) & col_ok[None, :]
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked row (padding) stays zero
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if F32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + q_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def triton_paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, meta: PagedMetadata,
                           scale: float | None) -> torch.Tensor:
    """q [T, H, dim] -> [T, H, dim] over k/v pages [P, bs, KVH, dim] (see paged_kernels.py)."""
    num_seqs, (heads, dim), (page, kv_heads) = meta.seqused_k.shape[0], q.shape[1:], k_pages.shape[1:3]
    if k_pages.stride(-1) != 1:
        raise ValueError("K/V pages need contiguous head rows")
    q = q.contiguous()  # the rotary embedding leaves it head-major; one small copy per layer
    out = torch.empty_like(q)  # [T, H, dim]
    grid = (num_seqs, heads, triton.cdiv(meta.max_q, BLOCK_M))
    f32_dot, padded = _f32_dot(q), triton.next_power_of_2(max(dim, 16))
    _paged_attention_kernel[grid](
        q, k_pages, v_pages, out, meta.cu_seq_q, meta.seqused_k, meta.block_table,
        scale if scale is not None else dim**-0.5,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        meta.block_table.stride(0), heads // kv_heads,
        PAGE=page, HEAD_DIM=dim, DIM=padded, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, F32_DOT=f32_dot,
        num_warps=num_warps(f32_dot, padded))
    return out


def num_warps(f32_dot: bool, padded_dim: int) -> int:
    """4 warps, as triton defaults to; 8 for fp32 dots at a padded head dim >= 128, whose [BLOCK_M, DIM] fp32
    accumulator and K/V tiles spill on 4 warps (triton 3.7.1, sm_90, DIM 256: 32 registers and 10 KB of spill
    stores per thread; 8 warps: 95 registers, none. DIM 128: 4-16 B on 4 warps. bench/results/gpu_aot*.md)."""
    return 8 if f32_dot and padded_dim >= WIDE_FP32_DIM else 4


def _f32_dot(q: torch.Tensor) -> bool:
    """fp32 (IEEE) dots for fp32 data, and for any data under the interpreter (the CPU), whose tl.dot reads
    bf16's raw bits; a GPU runs fp16/bf16 on tensor cores. (tests/gpu_aot replaces this to record what a GPU
    launches.)"""
    return q.dtype == torch.float32 or not q.is_cuda
