"""Runs one step's scheduled chunks as a single packed ragged batch through the transformers model.

All tokens of the step become one [1, T] sequence with per-token `position_ids`; paged-attention metadata
travels as a keyword to our registered attention function; the LoRA description of the step (which slot
each token uses, laid out once) goes to every wrapped layer through the injection's shared context. Only
the rows that sample a token are projected to logits. Decode chunks (one token) are packed first, so
attention finds them at rows [0, D) without an index.

With `decode_buckets` (what CUDA-graph capture needs) a step of decodes only is padded to a bucket of
batch sizes (1, 2, 4, 8, ...) and its context width to a power of two of blocks, and LoRA takes the static
gather form: two such steps in one bucket have the same shapes and dispatch the same ops, whatever their
adapters. Pad rows read and write only the KV pool's scratch block and use the null LoRA slot.

A padded decode step is described by host tensors with fixed names and shapes (`_decode_inputs`) and run by
`_forward_decode` over device copies of them: eagerly, or by `DecodeGraphs` (cuda_graphs.py), which keeps one
set of device buffers per captured graph and replays it. With a paged attention kernel (CUDA) every step's
sequences are described by `PagedMetadata`; decode steps then use a block table as wide as --max-model-len,
so one graph per bucket serves every context length.

A linearly merged request (adapters/merge.py) holds a slot per adapter (`request.merge_slots`); its rows take
the first as their slot and all of them, weighted, through `set_token_slots(..., merges=)`, which adds passes
to the LoRA op. A padded decode step with such rows runs eagerly: a captured graph holds one slot per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.adapters.inject import LoRAInjection
from loraplex.adapters.ops import LoRABatch, TokenMerges
from loraplex.adapters.ops.staging import HostStaging
from loraplex.server.engine.attention import AttentionMetadata, PagedKVCache, PrefillPart
from loraplex.server.engine.cuda_graphs import DecodeGraphs
from loraplex.server.engine.paged_kernels import PagedMetadata, padded_table, paged_metadata
from loraplex.server.engine.scheduler import ScheduledChunk

DecodeInputs = dict[str, torch.Tensor]  # name -> tensor of one padded decode step (see _decode_inputs)


@dataclass(frozen=True)
class RunnerOutput:
    """One step's logits: `logits` [K, V] fp32 for the K chunks that sample, in chunk order; `prompt_logits`
    for each chunk whose request wants prompt logprobs, [m, V] for its m rows that predict a prompt token
    (row i of the chunk predicts token start + i + 1)."""

    logits: torch.Tensor
    prompt_logits: list[tuple[ScheduledChunk, torch.Tensor]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv: PagedKVCache, block_size: int,
                 lora: LoRAInjection | None, device: torch.device, *, decode_buckets: bool = False,
                 max_model_len: int = 2048) -> None:
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.lora = lora
        self.device = device
        self.decode_buckets = decode_buckets
        self.max_blocks = -(-max_model_len // block_size)  # block table width of a paged decode step
        self.graphs: DecodeGraphs | None = None  # set by the engine when CUDA graphs are on
        # The step's small host -> device inputs go through one page-locked buffer (the LoRA layout's too).
        self.staging = lora.buffers.staging if lora is not None else HostStaging(device)

    @torch.inference_mode()
    def use_graphs(self, graphs: DecodeGraphs, max_num_seqs: int) -> None:
        """Serve padded decode steps from `graphs`. With a paged kernel every bucket up to `max_num_seqs` has
        one shape: capture them all now (on pad rows). Nothing is captured while serving, so on the gather path
        (a shape per context width) every step runs eagerly; the engine does not use graphs there."""
        self.decode_buckets = True
        self.graphs = graphs
        if self.kv.kernel is not None:
            sizes = [1 << i for i in range(bucket(max_num_seqs).bit_length())]  # 1, 2, 4, ..., bucket(max)
            graphs.capture_buckets(lambda n: self._decode_inputs([], n, [0] * n, [0] * n, [-1] * n), sizes)

    def static_tensors(self) -> list[torch.Tensor]:
        """What a captured decode forward may read besides its input buffers: the model's parameters and buffers
        (the LoRA slot stacks among them) and the KV pool."""
        return [*self.model.parameters(), *self.model.buffers(), *self.kv.k, *self.kv.v]

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> RunnerOutput:
        self.staging.reset()  # the previous step's copies landed: its tokens were read on the host
        return self._execute(chunks)

    def _execute(self, chunks: list[ScheduledChunk]) -> RunnerOutput:
        """Forward every chunk; fp32 logits [K, V] for the K chunks that sample, in chunk order, plus the rows
        that predict prompt tokens for the chunks whose request asked for prompt logprobs."""
        order = sorted(range(len(chunks)), key=lambda i: chunks[i].n != 1)  # decodes first, else stable
        packed = [chunks[i] for i in order]
        static = self.decode_buckets and all(c.n == 1 for c in packed)
        pad = bucket(len(packed)) - len(packed) if static else 0
        ids, pos, slots, last_row = self._pack(packed, pad)
        keep = [last_row[k] for k in sorted(range(len(order)), key=order.__getitem__) if packed[k].samples]
        scored = _prompt_rows(packed, last_row)  # [(chunk, first row, rows)]: rows predicting prompt tokens
        keep += [row for _, first, n in scored for row in range(first, first + n)]
        if static:
            logits = self._run_decode(self._decode_inputs(packed, pad, ids, pos, slots), slots,
                                      _merged_rows(packed))  # [bucket, V]
            return _split(logits.index_select(0, self._tensor(keep)).float(), scored)
        meta = self._attention_metadata(packed)
        if self.lora is not None:
            self.lora.set_token_slots(slots, merges=_merged_rows(packed))
        out = self.model(
            input_ids=self._tensor(ids)[None],
            position_ids=self._tensor(pos)[None],
            loraplex_attn=meta,
            loraplex_kv=self.kv,
            logits_to_keep=self._tensor(keep),
            use_cache=False,
        )
        return _split(out.logits[0].float(), scored)

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

    # ---- padded decode steps (static shapes: eager or a captured graph) ---------------------------
    def _run_decode(self, inputs: DecodeInputs, slots: list[int], merges: TokenMerges) -> torch.Tensor:
        """Logits [bucket, V] of a padded decode step (`slots`: its token slots, as `inputs` holds them):
        replayed from a graph when graphs are on, else eager. A step with linearly merged rows (`merges`)
        runs eagerly: a graph replays the one-slot-per-row gather form only."""
        use_lora = self.lora is not None and max(slots) >= 0
        if self.graphs is not None and not merges and self.graphs.serves(inputs, use_lora):
            return self.graphs.run(inputs, use_lora)
        device_inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        batch = None
        if use_lora:
            self.lora.set_token_slots(slots, gather=True, merges=merges)
            batch = self.lora.context.batch
        return self.forward_decode(device_inputs, batch)

    def forward_decode(self, inputs: DecodeInputs, batch: LoRABatch | None) -> torch.Tensor:
        """The forward of a padded decode step, reading only `inputs` (device tensors) and `batch`: what a
        CUDA graph captures. Returns logits [bucket, V] for every row."""
        if self.lora is not None:
            self.lora.context.set(batch)
        n = inputs["input_ids"].shape[0]
        if "block_table" in inputs:
            paged = PagedMetadata(inputs["cu_seq_q"], inputs["cu_seq_k"], inputs["seqused_k"],
                                  inputs["block_table"], 1, inputs["block_table"].shape[1] * self.block_size)
            meta = AttentionMetadata(inputs["slot_mapping"], n, None, None, (), paged)
        else:
            meta = AttentionMetadata(inputs["slot_mapping"], n, inputs["decode_index"], inputs["decode_mask"], ())
        out = self.model(input_ids=inputs["input_ids"][None], position_ids=inputs["position_ids"][None],
                         loraplex_attn=meta, loraplex_kv=self.kv, logits_to_keep=0, use_cache=False)
        return out.logits[0]

    def _decode_inputs(self, decodes: list[ScheduledChunk], pad: int, ids: list[int], pos: list[int],
                       slots: list[int]) -> DecodeInputs:
        """Host tensors of a padded decode step; their names and shapes depend only on the bucket (and, on
        the gather path, the context width). Pad rows write and attend the scratch block only."""
        bs, null = self.block_size, self.lora.null_slot if self.lora is not None else 0
        mapping = [_pool_position(c.request.blocks, c.start, bs) for c in decodes] + [self.kv.scratch] * pad
        inputs = {
            "input_ids": _long(ids), "position_ids": _long(pos), "slot_mapping": _long(mapping),
            "token_slots": _long(slots), "group_slots": _long([s if s >= 0 else null for s in slots]),
        }
        lengths = [c.start + 1 for c in decodes] + [1] * pad
        tables = [c.request.blocks for c in decodes] + [[self.kv.scratch_block]] * pad
        if self.kv.kernel is not None:
            meta = paged_metadata([1] * len(lengths), lengths, tables, width=self.max_blocks,
                                  device=torch.device("cpu"), pad_page=self.kv.scratch_block)
            inputs.update(cu_seq_q=meta.cu_seq_q, cu_seq_k=meta.cu_seq_k, seqused_k=meta.seqused_k,
                          block_table=meta.block_table)
        else:
            inputs["decode_index"], inputs["decode_mask"] = self._gather_contexts(lengths, tables, static=True)
        return inputs

    # ---- eager steps -----------------------------------------------------------------------------
    def _attention_metadata(self, chunks: list[ScheduledChunk]) -> AttentionMetadata:
        """Pool positions and, per sequence, what it attends for all layers of this step; `chunks` come
        decodes first. With a paged kernel one PagedMetadata describes every sequence."""
        bs = self.block_size
        mapping = self._tensor([_pool_position(c.request.blocks, p, bs)
                                for c in chunks for p in range(c.start, c.start + c.n)])
        decodes = [c for c in chunks if c.n == 1]
        if self.kv.kernel is not None:
            width = max(-(-(c.start + c.n) // bs) for c in chunks)
            paged = paged_metadata([c.n for c in chunks], [c.start + c.n for c in chunks],
                                   [c.request.blocks for c in chunks], width=width, device=self.device)
            return AttentionMetadata(mapping, len(decodes), None, None, (), paged)
        prefills: list[PrefillPart] = []
        row = len(decodes)
        for c in chunks[len(decodes):]:
            ctx = None if c.start == 0 else self._tensor(_flat_positions(c.request.blocks, c.start + c.n, bs))
            prefills.append(PrefillPart(row, row + c.n, ctx, _chunk_mask(c, self.device)))
            row += c.n
        index, mask = None, None
        if decodes:
            index, mask = self._gather_contexts([c.start + 1 for c in decodes], [c.request.blocks for c in decodes],
                                                static=False)
            index, mask = index.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
        return AttentionMetadata(mapping, len(decodes), index, mask, tuple(prefills))

    def _gather_contexts(self, lengths: list[int], tables: list[list[int]], *, static: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Host tensors for the gather path: flat pool positions [D * Lmax] of each decode context,
        right-padded, and the mask [D, 1, 1, Lmax].

        Built from a padded block table in three tensor ops, whatever D is: position j of sequence i
        lies in block table[i, j // bs] at offset j % bs; pads are masked out. `static`: the width is
        rounded up to a power of two of blocks (a graph per width, not per length).
        """
        bs = self.block_size
        width = -(-max(lengths) // bs)
        width = bucket(width) if static else width
        lmax = width * bs if static else max(lengths)
        table = padded_table(tables, width, 0, torch.long)  # [D, width]
        index = (table[:, :, None] * bs + torch.arange(bs)).view(len(tables), -1)[:, :lmax]  # [D, Lmax]
        mask = torch.arange(lmax)[None, :] < torch.tensor(lengths)[:, None]  # [D, Lmax]
        return index.reshape(-1), mask.view(len(tables), 1, 1, lmax)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return self.staging.to_device(values, torch.long)


def _merged_rows(chunks: list[ScheduledChunk]) -> TokenMerges:
    """Row -> (slot, weight) of each adapter, for the rows of linearly merged requests (in `_pack`'s row
    order); empty when the step has none, and the LoRA op then runs as it always did."""
    rows: dict[int, tuple[tuple[int, float], ...]] = {}
    row = 0
    for c in chunks:
        merge = c.request.merge
        if merge is not None and not merge.virtual:  # a ties / dare merge runs on its virtual adapter's slot
            pairs = tuple(zip(c.request.merge_slots, merge.weights, strict=True))
            rows.update(dict.fromkeys(range(row, row + c.n), pairs))
        row += c.n
    return rows


def _long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _prompt_rows(packed: list[ScheduledChunk], last_row: list[int]) -> list[tuple[ScheduledChunk, int, int]]:
    """(chunk, first row, row count) of the rows whose next token is a prompt token, for the chunks whose
    request asked for prompt logprobs (none of them: an empty list, and the step keeps only sampling rows)."""
    out = []
    for chunk, last in zip(packed, last_row, strict=True):
        req = chunk.request
        if req.params.prompt_logprobs is None:
            continue
        n = min(chunk.start + chunk.n, len(req.prompt_ids) - 1) - chunk.start  # rows predicting prompt tokens
        if n > 0:
            out.append((chunk, last - chunk.n + 1, n))
    return out


def _split(logits: torch.Tensor, scored: list[tuple[ScheduledChunk, int, int]]) -> RunnerOutput:
    """logits [K + Σm, V]: the sampling rows, then each scored chunk's prompt rows (as `execute` kept them)."""
    k = logits.shape[0] - sum(n for _, _, n in scored)
    parts, at = [], k
    for chunk, _, n in scored:
        parts.append((chunk, logits[at : at + n]))
        at += n
    return RunnerOutput(logits[:k], parts)


def bucket(n: int) -> int:
    """The smallest power of two >= n (1, 2, 4, 8, ...): the batch sizes a captured decode step comes in."""
    return 1 << max(0, n - 1).bit_length()


def _pool_position(blocks: list[int], p: int, block_size: int) -> int:
    """The pool position of a sequence's token p: block b holds [b*bs, (b+1)*bs)."""
    return blocks[p // block_size] * block_size + p % block_size


def _flat_positions(blocks: list[int], length: int, block_size: int) -> list[int]:
    """Pool positions of a sequence's first `length` tokens."""
    return [_pool_position(blocks, p, block_size) for p in range(length)]


def _chunk_mask(c: ScheduledChunk, device: torch.device) -> torch.Tensor | None:
    """[n, L] causal mask for a chunk after `start` cached tokens (None: plain causal from position 0)."""
    if c.start == 0:
        return None
    length = c.start + c.n
    return torch.ones(c.n, length, dtype=torch.bool, device=device).tril(diagonal=c.start)
