"""Runs one step's scheduled chunks as a single packed ragged batch through the transformers model.

All tokens of the step become one [1, T] sequence with per-token `position_ids`; paged-attention metadata
travels as a keyword to our registered attention function; the per-token adapter slot goes to the LoRA
layers through the shared batch context. Only the rows that sample a token are projected to logits.
"""

from __future__ import annotations

import torch

from loraplex.adapters.context import LoRABatchContext
from loraplex.server.engine.attention import AttentionMetadata, PagedKVCache, PrefillPart
from loraplex.server.engine.scheduler import ScheduledChunk


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv: PagedKVCache, block_size: int,
                 lora_context: LoRABatchContext | None, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.lora_context = lora_context
        self.device = device

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Forward every chunk; return fp32 logits [K, V] for the K chunks that sample, in chunk order."""
        ids, pos, slots, keep = self._pack(chunks)
        meta = self._attention_metadata(chunks)
        if self.lora_context is not None:
            self.lora_context.set_tokens(slots)
        out = self.model(
            input_ids=self._tensor(ids)[None],
            position_ids=self._tensor(pos)[None],
            loraplex_attn=meta,
            loraplex_kv=self.kv,
            logits_to_keep=self._tensor(keep),
            use_cache=False,
        )
        return out.logits[0].float()

    def _pack(self, chunks: list[ScheduledChunk]) -> tuple[list[int], list[int], list[int], list[int]]:
        """Token ids, positions, adapter slots (per token) and the row indices whose logits we keep."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        keep: list[int] = []
        for c in chunks:
            ids += c.request.token_at(c.start, c.start + c.n)
            pos += range(c.start, c.start + c.n)
            slots += [c.request.slot] * c.n
            if c.samples:
                keep.append(len(ids) - 1)
        return ids, pos, slots, keep

    def _attention_metadata(self, chunks: list[ScheduledChunk]) -> AttentionMetadata:
        slot_mapping: list[torch.Tensor] = []
        decode_rows: list[int] = []
        decode_ctx: list[torch.Tensor] = []
        prefills: list[PrefillPart] = []
        row = 0
        for c in chunks:
            ctx = self._flat_positions(c.request.blocks, c.start + c.n)  # [L] pool positions
            slot_mapping.append(ctx[c.start:])
            if c.n == 1:
                decode_rows.append(row)
                decode_ctx.append(ctx)
            else:
                prefills.append(PrefillPart(row, row + c.n, ctx.to(self.device), _chunk_mask(c, self.device)))
            row += c.n
        mapping = torch.cat(slot_mapping).to(self.device)
        if not decode_rows:
            return AttentionMetadata(mapping, None, None, None, tuple(prefills))
        index, mask = _pad_contexts(decode_ctx)
        return AttentionMetadata(mapping, self._tensor(decode_rows), index.to(self.device),
                                 mask.to(self.device), tuple(prefills))

    def _flat_positions(self, blocks: list[int], length: int) -> torch.Tensor:
        """Pool positions of a sequence's first `length` tokens: block b holds [b*bs, (b+1)*bs)."""
        b = torch.tensor(blocks, dtype=torch.long)
        flat = (b[:, None] * self.block_size + torch.arange(self.block_size)).flatten()
        return flat[:length]

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)


def _chunk_mask(c: ScheduledChunk, device: torch.device) -> torch.Tensor | None:
    """[n, L] causal mask for a chunk after `start` cached tokens (None: plain causal from position 0)."""
    if c.start == 0:
        return None
    length = c.start + c.n
    return torch.ones(c.n, length, dtype=torch.bool, device=device).tril(diagonal=c.start)


def _pad_contexts(contexts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad decode contexts: index [D, Lmax] (pad -> position 0) and mask [D, 1, 1, Lmax]."""
    lmax = max(len(c) for c in contexts)
    index = torch.zeros(len(contexts), lmax, dtype=torch.long)
    mask = torch.zeros(len(contexts), 1, 1, lmax, dtype=torch.bool)
    for i, c in enumerate(contexts):
        index[i, : len(c)] = c
        mask[i, 0, 0, : len(c)] = True
    return index, mask
