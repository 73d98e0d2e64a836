"""Runs one step's scheduled chunks as a single packed ragged batch through the transformers model.

All tokens of the step become one [1, T] sequence with per-token `position_ids`; paged-attention metadata
travels as a keyword to our registered attention function; the LoRA description of the step (which slot
each token uses, laid out once) goes to every wrapped layer through the injection's shared context. Only
the rows that sample a token are projected to logits. Decode chunks (one token) are packed first, so
attention finds them at rows [0, D) without an index.

With `decode_buckets` (what CUDA-graph capture needs) a step of decodes only is padded to a bucket of
batch sizes (1, 2, 4, 8, ...) and its context width to a power of two of blocks, and LoRA takes the static
gather form: two such steps in one bucket have the same shapes and dispatch the same ops, whatever their
adapters. Pad rows read and write only the KV pool's scratch position and use the null LoRA slot.
"""

from __future__ import annotations

import torch

from loraplex.adapters.inject import LoRAInjection
from loraplex.server.engine.attention import AttentionMetadata, PagedKVCache, PrefillPart
from loraplex.server.engine.scheduler import ScheduledChunk


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv: PagedKVCache, block_size: int,
                 lora: LoRAInjection | None, device: torch.device, *, decode_buckets: bool = False) -> None:
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.lora = lora
        self.device = device
        self.decode_buckets = decode_buckets

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Forward every chunk; return fp32 logits [K, V] for the K chunks that sample, in chunk order."""
        order = sorted(range(len(chunks)), key=lambda i: chunks[i].n != 1)  # decodes first, else stable
        packed = [chunks[i] for i in order]
        static = self.decode_buckets and all(c.n == 1 for c in packed)
        pad = bucket(len(packed)) - len(packed) if static else 0
        ids, pos, slots, last_row = self._pack(packed, pad)
        keep = [last_row[k] for k in sorted(range(len(order)), key=order.__getitem__) if packed[k].samples]
        meta = self._attention_metadata(packed, pad, static)
        if self.lora is not None:
            self.lora.set_token_slots(slots, gather=static)
        out = self.model(
            input_ids=self._tensor(ids)[None],
            position_ids=self._tensor(pos)[None],
            loraplex_attn=meta,
            loraplex_kv=self.kv,
            logits_to_keep=self._tensor(keep),
            use_cache=False,
        )
        return out.logits[0].float()

    def _pack(self, chunks: list[ScheduledChunk], pad: int) -> tuple[list[int], list[int], list[int], list[int]]:
        """Token ids, positions, adapter slots (per token, `pad` pad rows last) and each chunk's last row."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        for c in chunks:
            ids += c.request.token_at(c.start, c.start + c.n)
            pos += range(c.start, c.start + c.n)
            slots += [c.request.slot] * c.n
            last.append(len(ids) - 1)
        return ids + [0] * pad, pos + [0] * pad, slots + [-1] * pad, last

    def _attention_metadata(self, chunks: list[ScheduledChunk], pad: int, static: bool) -> AttentionMetadata:
        """Pool positions and masks for all layers of this step; `chunks` come decodes first."""
        bs = self.block_size
        mapping = [c.request.blocks[p // bs] * bs + p % bs for c in chunks for p in range(c.start, c.start + c.n)]
        mapping += [self.kv.scratch] * pad
        decodes = [c for c in chunks if c.n == 1]
        prefills: list[PrefillPart] = []
        row = len(decodes)
        for c in chunks[len(decodes):]:
            ctx = None if c.start == 0 else self._tensor(_flat_positions(c.request.blocks, c.start + c.n, bs))
            prefills.append(PrefillPart(row, row + c.n, ctx, _chunk_mask(c, self.device)))
            row += c.n
        index, mask = self._decode_contexts(decodes, pad, static) if decodes else (None, None)
        return AttentionMetadata(self._tensor(mapping), len(decodes) + pad, index, mask, tuple(prefills))

    def _decode_contexts(self, decodes: list[ScheduledChunk], pad: int, static: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat pool positions [D * Lmax] of each decode context, right-padded, and the mask [D, 1, 1, Lmax].

        Built from a padded block table in three tensor ops, whatever D is: position j of sequence i
        lies in block table[i, j // bs] at offset j % bs; pads (block 0) are masked out. Pad rows attend to
        the scratch position alone. `static`: the width is rounded up to a power of two of blocks.
        """
        bs = self.block_size
        lengths = [c.start + 1 for c in decodes] + [1] * pad
        width = -(-max(lengths) // bs)
        width = bucket(width) if static else width
        lmax = width * bs if static else max(lengths)
        rows = [c.request.blocks[:width] for c in decodes] + [[]] * pad
        table = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)  # [D, width]
        index = (table[:, :, None] * bs + torch.arange(bs)).view(len(rows), -1)[:, :lmax]  # [D, Lmax]
        index[len(decodes):, 0] = self.kv.scratch
        mask = torch.arange(lmax)[None, :] < torch.tensor(lengths)[:, None]  # [D, Lmax]
        return (index.reshape(-1).to(self.device, non_blocking=True),
                mask.view(len(rows), 1, 1, lmax).to(self.device, non_blocking=True))

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)


def bucket(n: int) -> int:
    """The smallest power of two >= n (1, 2, 4, 8, ...): the batch sizes a captured decode step comes in."""
    return 1 << max(0, n - 1).bit_length()


def _flat_positions(blocks: list[int], length: int, block_size: int) -> list[int]:
    """Pool positions of a sequence's first `length` tokens: block b holds [b*bs, (b+1)*bs)."""
    return [blocks[p // block_size] * block_size + p % block_size for p in range(length)]


def _chunk_mask(c: ScheduledChunk, device: torch.device) -> torch.Tensor | None:
    """[n, L] causal mask for a chunk after `start` cached tokens (None: plain causal from position 0)."""
    if c.start == 0:
        return None
    length = c.start + c.n
    return torch.ones(c.n, length, dtype=torch.bool, device=device).tril(diagonal=c.start)
