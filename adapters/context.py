"""The per-forward LoRA batch every MultiLoRALinear of one model reads.

Linear layers receive no kwargs from transformers' model code, so (as vLLM's punica wrapper does) the
runner puts one `LoRABatch` here before each forward (LoRAInjection.set_token_slots) and every wrapped
layer reads it. Layers plan nothing: the batch was laid out once, for the whole forward.
"""

from __future__ import annotations

from loraplex.adapters.ops.batch import LoRABatch


class LoRABatchContext:
    """The batch of the next forward(s); None means base model only."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None

    def set(self, batch: LoRABatch | None) -> None:
        self.batch = batch

    def rank_for(self, kind: str) -> int:
        """The step's rank bound for layers of this kind ("q_proj", ...); 0 = skip LoRA."""
        batch = self.batch
        return 0 if batch is None else batch.ranks.get(kind, 0)
