"""The per-forward batch context that tells every MultiLoRALinear which slot each token uses.

Linear layers receive no kwargs from transformers' model code, so (as vLLM's punica wrapper does) the
runner fills one shared context object before each forward and every wrapped layer reads it. The
LoRAMeta is built once per forward (per input shape) and reused by all layers of that forward.
"""

from __future__ import annotations

import torch

from loraplex.adapters.ops.meta import LoRAMeta


class LoRABatchContext:
    """Slot assignment for the next forward(s): per packed token, or per batch row (HF-style [B, L])."""

    def __init__(self) -> None:
        self._token_slots: list[int] | None = None
        self._row_slots: list[int] | None = None
        self._memo: dict[tuple[tuple[int, ...], torch.device], LoRAMeta | None] = {}

    def set_tokens(self, token_slots: list[int]) -> None:
        """Packed ragged batch: one slot per token of the flattened [1, T] input (-1 = base only)."""
        self._token_slots, self._row_slots, self._memo = list(token_slots), None, {}

    def set_rows(self, row_slots: list[int]) -> None:
        """Padded [B, L] batch: one slot per row, applied to every position of that row (any L)."""
        self._token_slots, self._row_slots, self._memo = None, list(row_slots), {}

    def clear(self) -> None:
        self._token_slots, self._row_slots, self._memo = None, None, {}

    def meta_for(self, x: torch.Tensor) -> LoRAMeta | None:
        """LoRAMeta for input x [..., in], or None when no token of it uses an adapter (fast path)."""
        key = (tuple(x.shape[:-1]), x.device)
        if key not in self._memo:
            self._memo[key] = self._build(key[0], x.device)
        return self._memo[key]

    def _build(self, lead: tuple[int, ...], device: torch.device) -> LoRAMeta | None:
        slots = self._slots_for(lead)
        if slots is None or all(s < 0 for s in slots):
            return None
        return LoRAMeta.from_slots(slots, device)

    def _slots_for(self, lead: tuple[int, ...]) -> list[int] | None:
        num_tokens = 1
        for d in lead:
            num_tokens *= d
        if self._token_slots is not None:
            if len(self._token_slots) != num_tokens:
                raise ValueError(f"LoRA context has {len(self._token_slots)} token slots, input has {num_tokens}")
            return self._token_slots
        if self._row_slots is not None:
            rows = len(self._row_slots)
            if rows == 0 or num_tokens % rows:
                raise ValueError(f"LoRA context has {rows} rows, input shape {lead} does not split into them")
            per_row = num_tokens // rows
            return [s for s in self._row_slots for _ in range(per_row)]
        return None
