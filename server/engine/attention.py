"""Paged attention plugged into transformers' own model classes through `AttentionInterface`.

The runner packs every scheduled token of one step into a single [1, T] sequence and passes an
`AttentionMetadata` as the `loraplex_attn` keyword of `model(...)`; transformers forwards unknown
keywords down to the registered attention function. There we (1) write this step's K/V into the block
pool, (2) attend each sequence's queries over its whole cached context. The runner packs decode tokens
(1 query each) first, so they are rows [0, D) and run as one SDPA call over a padded gather; prefill
chunks follow, one SDPA each.

Everything that is the same for all layers (pool positions, masks) is built once per step by the runner;
per layer this file only issues tensor ops. On CUDA, when a paged kernel passed its probe at start
(paged_kernels.py), every sequence of the step attends in one kernel call per layer straight from the
pool's pages (`AttentionMetadata.paged`); the gather below is the CPU path. Measured on CPU (bench-small
decode, 16 sequences): a flat `index_select` gathers the context ~10x faster than advanced indexing with a
2-D index, and folding the query heads of each KV group into the query axis (see `_decode_attention`)
avoids SDPA's GQA expansion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from loraplex.adapters.lazy_zeros import lazy_zeros
from loraplex.server.engine.paged_kernels import PagedKernel, PagedMetadata

ATTN_IMPL = "loraplex_paged"


@dataclass(frozen=True)
class PrefillPart:
    """One sequence's prefill chunk: query rows [q_start, q_end) of the packed batch.

    kv_index: [L] flat pool positions of the sequence's context (cached + this chunk), in order; None when
              the chunk is the whole context (it starts at position 0): its K/V are this step's own rows.
    mask:     [n, L] bool (True = attend) or None when the chunk is the whole context (plain causal).
    """

    q_start: int
    q_end: int
    kv_index: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass(frozen=True)
class AttentionMetadata:
    """Built once per step by the runner, shared by every layer.

    slot_mapping:  [T] flat pool position where each packed token's K/V is written.
    num_decodes:   D, the decode tokens (one per decoding sequence); they are packed rows [0, D).
    decode_index:  [D * Lmax] flat pool positions of each decode sequence's context, right-padded (pads
                   point at position 0 and are masked out), flattened for one `index_select`; or None.
    decode_mask:   [D, 1, 1, Lmax] bool, True on real context positions; None when D == 0.
    prefills:      the prefill chunks, packed after the decodes.
    paged:         set when the cache has a paged kernel: then it alone describes the step's sequences (the
                   decode/prefill fields above are unused).
    """

    slot_mapping: torch.Tensor
    num_decodes: int
    decode_index: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefills: tuple[PrefillPart, ...]
    paged: PagedMetadata | None = None


class PagedKVCache:
    """The preallocated block pool's tensors: per layer K and V of [(num_blocks + 1) * block_size, kv_heads, dim].

    One block past the pool is scratch (block `scratch_block`, first position `scratch`): pad rows of a
    bucketed decode step write and read it, so padding never touches a sequence's cache. `kernel`: the paged
    attention kernel chosen at start (None: the gather path).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        self.scratch_block = num_blocks
        self.scratch = num_blocks * block_size
        shape = ((num_blocks + 1) * block_size, kv_heads, head_dim)
        # On the CPU lazily committed (adapters/lazy_zeros.py): resident memory grows with the blocks used.
        self.k = [lazy_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.v = [lazy_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.kernel: PagedKernel | None = None

    def pages(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer's K and V as pages [num_blocks + 1, block_size, kv_heads, dim] (views)."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, self.block_size, *k.shape[1:]), v.view(-1, self.block_size, *v.shape[1:])

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    loraplex_attn: AttentionMetadata | None = None,
    loraplex_kv: PagedKVCache | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """query [1, H, T, D], key/value [1, KVH, T, D] -> output [1, T, H, D] (what eager attention returns)."""
    if loraplex_attn is None or loraplex_kv is None:
        raise RuntimeError("loraplex_paged attention needs loraplex_attn/loraplex_kv metadata")
    meta, layer = loraplex_attn, module.layer_idx
    k_pool, v_pool = loraplex_kv.k[layer], loraplex_kv.v[layer]
    # [1, KVH, T, D] -> [T, KVH, D], written at each token's pool position.
    k_pool.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1).to(k_pool.dtype))
    v_pool.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1).to(v_pool.dtype))
    q = query[0].transpose(0, 1)  # [T, H, D]; a view (the projection wrote it token-major)
    if meta.paged is not None:  # one kernel call for every sequence, reading the pages in place
        k_pages, v_pages = loraplex_kv.pages(layer)
        return loraplex_kv.kernel(q, k_pages, v_pages, meta.paged, scaling).unsqueeze(0), None
    num_tokens, d = q.shape[0], meta.num_decodes
    decoded = _decode_attention(q[:d], k_pool, v_pool, meta, scaling) if d else None
    if not meta.prefills:
        return decoded.unsqueeze(0), None  # a pure decode step: no [T, H, D] buffer, no copy
    out = torch.empty(num_tokens, q.shape[1], q.shape[2], dtype=q.dtype, device=q.device)  # [T, H, D]
    if decoded is not None:
        out[:d] = decoded
    for part in meta.prefills:
        out[part.q_start:part.q_end] = _prefill_attention(query, key, value, k_pool, v_pool, part, scaling)
    return out.unsqueeze(0), None


def _decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      meta: AttentionMetadata, scaling: float | None) -> torch.Tensor:
    """One query token per sequence over its gathered, right-padded context: q [D, H, dim] -> [D, H, dim].

    GQA without expanding K/V: query head h reads KV head h // G (G = H / KVH, as transformers'
    `repeat_kv` lays heads out), so the G query heads of a group become G query rows of that KV head.
    """
    num_seqs, heads, dim = q.shape
    kv_heads = k_pool.shape[1]
    q4 = q.reshape(num_seqs, kv_heads, heads // kv_heads, dim)  # [D, KVH, G, dim]
    lmax = meta.decode_mask.shape[-1]
    # [D*Lmax, KVH, dim] -> [D, KVH, Lmax, dim] (a view; SDPA reads the strides)
    k = k_pool.index_select(0, meta.decode_index).view(num_seqs, lmax, kv_heads, dim).transpose(1, 2)
    v = v_pool.index_select(0, meta.decode_index).view(num_seqs, lmax, kv_heads, dim).transpose(1, 2)
    o = F.scaled_dot_product_attention(q4, k.to(q.dtype), v.to(q.dtype), attn_mask=meta.decode_mask,
                                       scale=scaling)  # [D, KVH, G, dim]
    return o.reshape(num_seqs, heads, dim)


def _prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_pool: torch.Tensor,
                       v_pool: torch.Tensor, part: PrefillPart, scaling: float | None) -> torch.Tensor:
    """One sequence's chunk of n queries over its L context positions: returns [n, H, dim]."""
    qp = query[:, :, part.q_start:part.q_end]  # [1, H, n, dim]
    if part.kv_index is None:  # the chunk is the whole context: attend over this step's own K/V rows
        k = key[:, :, part.q_start:part.q_end]  # [1, KVH, n, dim]
        v = value[:, :, part.q_start:part.q_end]
    else:
        k = k_pool.index_select(0, part.kv_index).transpose(0, 1).unsqueeze(0).to(qp.dtype)  # [1, KVH, L, dim]
        v = v_pool.index_select(0, part.kv_index).transpose(0, 1).unsqueeze(0).to(qp.dtype)
    causal = part.mask is None
    o = F.scaled_dot_product_attention(qp, k, v, attn_mask=part.mask, is_causal=causal, scale=scaling,
                                       enable_gqa=True)  # [1, H, n, dim]
    return o[0].transpose(0, 1)


def register_paged_attention() -> str:
    """Register once (idempotent) and return the implementation name for `set_attn_implementation`."""
    AttentionInterface.register(ATTN_IMPL, paged_attention)
    return ATTN_IMPL
