"""Paged attention plugged into transformers' own model classes through `AttentionInterface`.

The runner packs every scheduled token of one step into a single [1, T] sequence and passes an
`AttentionMetadata` as the `loraplex_attn` keyword of `model(...)`; transformers forwards unknown
keywords down to the registered attention function. There we (1) write this step's K/V into the block
pool, (2) attend each sequence's queries over its whole cached context. Decode sequences (1 query
token each) are batched into one SDPA call over a padded gather; prefill chunks run one SDPA each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_IMPL = "loraplex_paged"


@dataclass(frozen=True)
class PrefillPart:
    """One sequence's prefill chunk: query rows [q_start, q_end) of the packed batch.

    kv_index: [L] flat pool positions of the sequence's context (cached + this chunk), in order.
    mask:     [n, L] bool (True = attend) or None when the chunk is the whole context (plain causal).
    """

    q_start: int
    q_end: int
    kv_index: torch.Tensor
    mask: torch.Tensor | None


@dataclass(frozen=True)
class AttentionMetadata:
    """Built once per step by the runner, shared by every layer.

    slot_mapping:  [T] flat pool position where each packed token's K/V is written.
    decode_rows:   [D] packed row of each decode token (one per decoding sequence), or None.
    decode_index:  [D, Lmax] flat pool positions of each decode sequence's context, right-padded.
    decode_mask:   [D, 1, 1, Lmax] bool, True on real context positions.
    prefills:      the prefill chunks.
    """

    slot_mapping: torch.Tensor
    decode_rows: torch.Tensor | None
    decode_index: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefills: tuple[PrefillPart, ...]


class PagedKVCache:
    """The preallocated block pool's tensors: per layer K and V of [num_blocks * block_size, kv_heads, dim]."""

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_slots, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

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
    k_pool[meta.slot_mapping] = key[0].transpose(0, 1).to(k_pool.dtype)
    v_pool[meta.slot_mapping] = value[0].transpose(0, 1).to(v_pool.dtype)
    q = query[0]  # [H, T, D]
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)  # [T, H, D]
    if meta.decode_rows is not None:
        out[meta.decode_rows] = _decode_attention(q, k_pool, v_pool, meta, scaling)
    for part in meta.prefills:
        out[part.q_start:part.q_end] = _prefill_attention(q, k_pool, v_pool, part, scaling)
    return out.unsqueeze(0), None


def _decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      meta: AttentionMetadata, scaling: float | None) -> torch.Tensor:
    """One query token per sequence, contexts gathered and right-padded: returns [D, H, dim]."""
    qd = q[:, meta.decode_rows].transpose(0, 1).unsqueeze(2)  # [D, H, 1, dim]
    k = k_pool[meta.decode_index].transpose(1, 2).to(q.dtype)  # [D, KVH, Lmax, dim]
    v = v_pool[meta.decode_index].transpose(1, 2).to(q.dtype)
    o = F.scaled_dot_product_attention(qd, k, v, attn_mask=meta.decode_mask, scale=scaling,
                                       enable_gqa=True)  # [D, H, 1, dim]
    return o.squeeze(2)


def _prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                       part: PrefillPart, scaling: float | None) -> torch.Tensor:
    """One sequence's chunk of n queries over its L context positions: returns [n, H, dim]."""
    qp = q[:, part.q_start:part.q_end].unsqueeze(0)  # [1, H, n, dim]
    k = k_pool[part.kv_index].transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, KVH, L, dim]
    v = v_pool[part.kv_index].transpose(0, 1).unsqueeze(0).to(q.dtype)
    causal = part.mask is None
    o = F.scaled_dot_product_attention(qp, k, v, attn_mask=part.mask, is_causal=causal, scale=scaling,
                                       enable_gqa=True)  # [1, H, n, dim]
    return o[0].transpose(0, 1)


def register_paged_attention() -> str:
    """Register once (idempotent) and return the implementation name for `set_attn_implementation`."""
    AttentionInterface.register(ATTN_IMPL, paged_attention)
    return ATTN_IMPL
