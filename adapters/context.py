"""The per-forward LoRA batch every wrapped layer of one model reads.

Layers receive no kwargs from transformers' model code, so (as vLLM's punica wrapper does) the runner puts
one `LoRABatch` here before each forward (LoRAInjection.set_token_slots) and every wrapped layer reads it.
Layers plan nothing: the batch was laid out once, for the whole forward.

Two batches: `batch` describes the forward's tokens (every decoder layer and the embedding see all of them);
`logits_batch` the rows the output projection (lm_head) sees, which are only the rows the runner keeps for
logits (`logits_to_keep`). Without a separate one (a forward projecting every row) they are the same batch.
"""

from __future__ import annotations

from loraplex.adapters.ops.batch import LoRABatch

_SAME = object()


class LoRABatchContext:
    """The batches of the next forward(s); None means base model only."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None
        self.logits_batch: LoRABatch | None = None

    def set(self, batch: LoRABatch | None, logits: LoRABatch | None | object = _SAME) -> None:
        """`logits`: the lm_head rows' batch; left out, the same as `batch` (every row is projected)."""
        self.batch = batch
        self.logits_batch = batch if logits is _SAME else logits  # type: ignore[assignment]

    def batch_for(self, *, logits: bool) -> LoRABatch | None:
        return self.logits_batch if logits else self.batch

    def rank_for(self, kind: str, *, logits: bool = False) -> int:
        """The step's rank bound for layers of this kind ("q_proj", ...); 0 = skip LoRA."""
        batch = self.batch_for(logits=logits)
        return 0 if batch is None else batch.ranks.get(kind, 0)
