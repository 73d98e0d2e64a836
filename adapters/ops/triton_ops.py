# ruff: noqa: ANN001  (triton reads kernel parameter annotations as constexpr / type hints: pointers stay bare)
"""Triton LoRA backend (CUDA; the CPU too under TRITON_INTERPRET=1): Punica-style shrink + expand over the grid.

Two kernels per wrapped linear, reading the step's grid (batch.py: G groups x D rows, one slot per group) and
each slot's own rank for this layer (`slot_ranks`, [S + 1] int32):
  shrink  part[split, row, r] = sum_{k in split} x[token(row), k] * A[slot, r, k]   (fp32 partials)
          grid (G * ceil(D / BLOCK_M), splits, ceil(rank / BLOCK_R)): one tile of a group's rows x one slice
          of the input dim x one BLOCK_R slice of the rank. A program whose rank slice starts at or past its
          slot's own rank returns at once, so rank padding costs a launch slot, never loads or FLOPs; the
          null slot (rank 0) does nothing. Split-K over the input dim (hidden and intermediate sizes are
          thousands wide) fills the GPU when the grid has few rows: a decode batch of 32 tokens.
  expand  y[token(row), n] += w[row] * sum_{r < r_s} (sum_split part[split, row, r]) * B[slot, r, n]
          grid (G * ceil(D / BLOCK_M), ceil(out / BLOCK_N)): the rank loop stops at the slot's own rank, and
          the split partials are summed in split order (deterministic, no atomics). w: the pass's row weights
          (merged tokens, batch.py), applied to the fp32 accumulator; a pass without them compiles without
          the load (HAS_W is a constexpr).
Padding rows are masked out of every load and store: their token's x is never read (it may be inf/NaN) and
each token is stored by exactly one valid row, so there are no races. Every product is a tl.dot (exact IEEE
for fp32) over a tile of BLOCK_M >= 16 rows of one group, tl.dot's smallest M on GPUs: a segment (window
and grouped forms, D > 1) fills it with up to 64 of its rows; a token of the gather form (D == 1, decode)
sits alone in its tile, the other 15 rows masked (they load nothing; a tensor core pads an M = 1 product
to 16 rows anyway) and takes longer K/N tiles, since its programs stream the adapters' weights. Only
builtins of triton.language are used (no tl.sum / tl.cdiv / tl.zeros): those are triton's own jit functions,
which the interpreter cannot call when triton was imported before TRITON_INTERPRET was set (a test run).
The launch configuration depends on host-known ints only (G, D, rank, in, out, the device's SM count), and
nothing reads device values on the host: a decode step stays capturable by CUDA graphs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loraplex.adapters.ops.base import LoRABackend
from loraplex.adapters.ops.batch import LoRABatch

BLOCK_R = 16  # rank slice: a slot of rank r_s runs ceil(r_s / 16) slices; 16 is tl.dot's smallest K/N on GPUs
PROGRAMS_PER_SM = 4  # split-K until the shrink has about this many programs per SM
MAX_SPLITS = 64  # bounds the partials buffer [splits, G*D, rank] and the expand's reduction
INTERPRETER_SMS = 1  # under TRITON_INTERPRET the programs run one by one: split only small grids


@triton.jit
def _program_rows(groups_ptr, ranks_ptr, rows_ptr, pad_ptr, stride_pad, depth, rank_bound,
                  BLOCK_M: tl.constexpr):
    """This program's tile of one group: the group's slot, the slot's own rank (at most the step's bound),
    and per tile row [BLOCK_M]: the grid row (int64), its token (int64) and whether it is real (not padding,
    not past the group's depth)."""
    m_tiles = (depth + BLOCK_M - 1) // BLOCK_M  # not tl.cdiv: builtins only (module docstring)
    pid = tl.program_id(0)
    group = pid // m_tiles
    slot = tl.load(groups_ptr + group)  # int64
    own_rank = tl.minimum(tl.load(ranks_ptr + slot), rank_bound)
    offs_m = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    grid_row = group.to(tl.int64) * depth + offs_m
    in_group = offs_m < depth
    padding = tl.load(pad_ptr + grid_row * stride_pad, mask=in_group, other=1)
    valid = in_group & (padding == 0)
    token = tl.load(rows_ptr + grid_row, mask=valid, other=0)
    return slot, own_rank, grid_row, token, valid


@triton.jit
def _mm(a, b, acc, F32_DOT: tl.constexpr):
    """acc [M, N] fp32 += a [M, K] @ b [K, N]: tl.dot in b's dtype (the stacks' dtype: fp16/bf16 tensor cores),
    or in fp32 with exact IEEE products (F32_DOT: fp32 stacks, or bf16 ones under the interpreter)."""
    if F32_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b, acc)
    return acc


# Ints that change from step to step are not specialised on (== 1, divisible by 16): each specialisation is a
# separate compile, which would otherwise happen at the first step that hits it, while serving or inside a
# CUDA-graph capture. What is left to specialise on is fixed per model (layer widths, strides) or a constexpr,
# so `probe.py`'s start-up run of every kernel form compiles every variant the engine can launch
# (tests/gpu_aot checks that on the CPU).
_RUNTIME_INTS = ("depth", "rank_bound", "num_rows", "splits")


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _shrink_kernel(x_ptr, a_ptr, part_ptr, rows_ptr, pad_ptr, groups_ptr, ranks_ptr,
                   depth, rank_bound, k_size, k_chunk, num_rows, r_pad,
                   stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_pad,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   F32_DOT: tl.constexpr):
    """part[split, row, r] for this program's rows [BLOCK_M] x rank slice [BLOCK_R] over its input chunk."""
    slot, own_rank, grid_row, token, valid = _program_rows(groups_ptr, ranks_ptr, rows_ptr, pad_ptr, stride_pad,
                                                           depth, rank_bound, BLOCK_M)
    r0 = tl.program_id(2) * BLOCK_R
    if r0 >= own_rank:  # rank padding of this slot (the whole null slot): nothing to load or compute
        return
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_ok = offs_r < own_rank  # the last slice may cross the slot's rank: rows past it are never read
    k_lo = tl.program_id(1) * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, k_size)
    x_rows = x_ptr + token[:, None] * stride_xt  # [BLOCK_M, 1], int64 offsets
    a_cols = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar  # [1, BLOCK_R]: A read transposed
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        # Padding rows are masked, not multiplied by zero: their token's x may be inf or NaN.
        xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=valid[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_cols + offs_k[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = _mm(xt, at, acc, F32_DOT)  # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_R]
    part = part_ptr + (tl.program_id(1) * num_rows + grid_row)[:, None] * r_pad + offs_r[None, :]
    tl.store(part, acc, mask=valid[:, None] & r_ok[None, :])


@triton.jit
def _sum_splits(part_ptr, grid_row, offs_r, mask, splits, num_rows, r_pad,
                BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """h [BLOCK_M, BLOCK_R] fp32: the shrink's split partials of these rows, summed in split order."""
    h = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for split in range(0, splits):
        offs = (split * num_rows + grid_row)[:, None] * r_pad + offs_r[None, :]
        h += tl.load(part_ptr + offs, mask=mask, other=0.0)
    return h


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _expand_kernel(part_ptr, b_ptr, y_ptr, rows_ptr, pad_ptr, groups_ptr, ranks_ptr, w_ptr,
                   depth, rank_bound, n_size, splits, num_rows, r_pad,
                   stride_yt, stride_yn, stride_bs, stride_br, stride_bn, stride_pad,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                   F32_DOT: tl.constexpr, HAS_W: tl.constexpr):
    """y[token, n] += w[row] * h[row, :r_s] @ B[slot, :r_s, n] for this program's rows [BLOCK_M] x columns
    [BLOCK_N] (w = 1 without HAS_W)."""
    slot, own_rank, grid_row, token, valid = _program_rows(groups_ptr, ranks_ptr, rows_ptr, pad_ptr, stride_pad,
                                                           depth, rank_bound, BLOCK_M)
    if own_rank == 0:  # the null slot, or an adapter that does not target this layer: y stays as it is
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_size
    b_slot = b_ptr + slot * stride_bs
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r0 in range(0, own_rank, BLOCK_R):  # stops at the slot's own rank: no work on the rank padding
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < own_rank
        h = _sum_splits(part_ptr, grid_row, offs_r, valid[:, None] & r_ok[None, :], splits, num_rows, r_pad,
                        BLOCK_M, BLOCK_R)
        bt = tl.load(b_slot + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mm(h, bt, acc, F32_DOT)  # [BLOCK_M, BLOCK_R] @ [BLOCK_R, BLOCK_N]
    if HAS_W:  # a merged token's weight for this pass, [BLOCK_M] fp32 (1.0 on plain rows of pass 0: exact)
        acc = acc * tl.load(w_ptr + grid_row, mask=valid, other=0.0)[:, None]
    y_tile = y_ptr + token[:, None] * stride_yt + offs_n[None, :] * stride_yn  # int64 offsets
    mask = valid[:, None] & n_ok[None, :]  # padding rows store nothing: each token has one valid row
    y = tl.load(y_tile, mask=mask, other=0.0)
    tl.store(y_tile, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Launch:
    """One call's kernel configuration, from host-known ints only (the same for every replay of a graph)."""

    block_m: int  # grid rows of one group per program (16 to 64, tl.dot's M)
    block_k: int  # input features per shrink loop step
    block_n: int  # output features per expand program
    r_tiles: int  # rank slices at the step's bound; a slot's slices past its own rank return at once
    splits: int  # shrink programs along the input dim (split-K)
    k_chunk: int  # input features per split, a multiple of block_k

    def m_tiles(self, depth: int) -> int:
        return triton.cdiv(depth, self.block_m)


def plan_launch(groups: int, depth: int, rank: int, k: int, n: int, sms: int, f32_dot: bool = False) -> Launch:
    """Tiles for a grid of `groups` x `depth` rows at rank bound `rank`, x [*, k] -> y [*, n], on `sms` SMs.
    Split-K only when the grid is too small to give every SM PROGRAMS_PER_SM shrink programs."""
    block_m = min(64, max(16, triton.next_power_of_2(depth)))
    block_k, block_n = (128, 128) if depth == 1 else (64, 64)  # a lone token streams its adapter: longer tiles
    if depth == 1 and f32_dot:  # fp32 expand at 128 columns spills on sm_80 (bench/results/gpu_aot.md)
        block_n = 64
    r_tiles = triton.cdiv(rank, BLOCK_R)
    programs = groups * triton.cdiv(depth, block_m) * r_tiles
    k_blocks = triton.cdiv(k, block_k)
    wanted = max(1, min(k_blocks, MAX_SPLITS, triton.cdiv(PROGRAMS_PER_SM * sms, programs)))
    per_split = triton.cdiv(k_blocks, wanted)  # k blocks per split; no split is left empty
    return Launch(block_m, block_k, block_n, r_tiles, triton.cdiv(k_blocks, per_split), per_split * block_k)


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """SMs to fill (a host-side device property, no sync); the interpreter's CPU counts as INTERPRETER_SMS."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def _f32_dot(dtype: torch.dtype, device: torch.device) -> bool:
    """tl.dot in fp32 (IEEE) for fp32 stacks; also for bf16 ones on the CPU, where only the interpreter runs
    triton and its tl.dot multiplies bf16's raw bits (it stores bf16 as uint16): the CPU tests then check
    the kernels' indexing and masks in bf16, a GPU the bf16 tensor-core dot."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and device.type != "cuda")


class TritonLoRABackend(LoRABackend):
    name = "triton"

    def apply(self, y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
              batch: LoRABatch, rank: int, slot_ranks: torch.Tensor) -> None:
        g, d = batch.num_groups, batch.depth
        f32_dot = _f32_dot(a_stack.dtype, x.device)
        cfg = plan_launch(g, d, rank, x.shape[1], y.shape[1], _sm_count(x.device), f32_dot)
        rows, r_pad = g * d, cfg.r_tiles * BLOCK_R
        # [splits, G*D, r_pad] fp32; only entries of valid rows below their slot's rank are written and read.
        part = torch.empty(cfg.splits, rows, r_pad, dtype=torch.float32, device=x.device)
        meta = (batch.rows, batch.padding.view(torch.uint8), batch.group_slots, slot_ranks)  # [G*D], [G*D, 1], [G]
        common = {"BLOCK_M": cfg.block_m, "BLOCK_R": BLOCK_R, "F32_DOT": f32_dot}
        _shrink_kernel[(g * cfg.m_tiles(d), cfg.splits, cfg.r_tiles)](
            x, a_stack, part, *meta, d, rank, x.shape[1], cfg.k_chunk, rows, r_pad,
            *x.stride(), *a_stack.stride(), batch.padding.stride(0), BLOCK_K=cfg.block_k, **common)
        weights = batch.row_weights  # [G*D] fp32, or None: the kernel never reads w_ptr then
        _expand_kernel[(g * cfg.m_tiles(d), triton.cdiv(y.shape[1], cfg.block_n))](
            part, b_stack, y, *meta, part if weights is None else weights, d, rank, y.shape[1], cfg.splits, rows,
            r_pad, *y.stride(), *b_stack.stride(), batch.padding.stride(0), BLOCK_N=cfg.block_n,
            HAS_W=weights is not None, **common)
