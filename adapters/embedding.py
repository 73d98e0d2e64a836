"""MultiLoRAEmbedding: the token embedding plus per-slot LoRA, as PEFT's LoRA `Embedding` computes it.

    y_t = E[id_t] + scale_s * B_s A_s[:, id_t]       A_s: [r, vocab] (PEFT's lora_embedding_A), B_s: [dim, r]

that is a linear layer of in = vocab, out = dim applied to the one-hot of the token: the slot stacks, their
loading and DoRA's factors (g over the embedding dims, PEFT's DoraEmbeddingLayer) are MultiLoRALinear's
(layer.py `LoRASlots`); only the shrink differs, a gather of A's column at the token id (ops/torch_ops.py
`embedding_lora_apply`, the torch ops on every device: it runs once per forward, not per layer). Every token of
the forward goes through it, so an embedding adapter changes the K/V from the first prompt token on (the
prefix cache keys blocks by adapter registration, so none is shared with another adapter's).
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.adapters.context import LoRABatchContext
from loraplex.adapters.layer import LoRASlots
from loraplex.adapters.ops import embedding_lora_apply


class MultiLoRAEmbedding(LoRASlots):
    def __init__(self, base_layer: nn.Embedding, *, kind: str, num_slots: int, max_rank: int,
                 context: LoRABatchContext, dtype: torch.dtype) -> None:
        super().__init__(base_layer, kind=kind, in_features=base_layer.num_embeddings,
                         out_features=base_layer.embedding_dim, num_slots=num_slots, max_rank=max_rank,
                         context=context, dtype=dtype)

    # What model code may read of an nn.Embedding (transformers' get_input_embeddings() users).
    @property
    def num_embeddings(self) -> int:
        return self.in_features

    @property
    def embedding_dim(self) -> int:
        return self.out_features

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(ids)
        batch, rank, dora = self._batch()
        if not rank:  # no adapter of this step targets the embedding
            return y
        y = y.contiguous()
        embedding_lora_apply(y.view(-1, self.out_features), ids.reshape(-1), self.lora_a, self.lora_b, batch, rank,
                             dora)
        return y
