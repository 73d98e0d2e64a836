"""Per-forward LoRA batch metadata shared by every MultiLoRALinear of one forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAMeta:
    """Which adapter slot each of the T flattened tokens of one forward uses.

    token_slots: [T] int64 on the compute device; -1 means "base model only" for that token.
    segments:    host-side runs of consecutive tokens sharing one slot >= 0, as (start, end, slot),
                 end exclusive, in token order. Base-only runs are omitted. (SGMV walks these.)
    slot_tokens: host-side {slot: [N_s] int64 token indices on the device} for every slot >= 0 that
                 occurs, in ascending slot order. (BGMV-style gather walks these.)
    """

    num_tokens: int
    token_slots: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    slot_tokens: dict[int, torch.Tensor]

    @property
    def active_slots(self) -> tuple[int, ...]:
        return tuple(self.slot_tokens)

    @property
    def is_fragmented(self) -> bool:
        """True when slots are interleaved (more segments than slots), e.g. a decode batch."""
        return len(self.segments) > len(self.slot_tokens)

    @staticmethod
    def from_slots(slots: list[int] | torch.Tensor, device: torch.device | str = "cpu") -> LoRAMeta:
        """Build from a per-token slot list (host-side; one small sync if given a device tensor)."""
        host = slots.tolist() if isinstance(slots, torch.Tensor) else list(slots)
        segments: list[tuple[int, int, int]] = []
        per_slot: dict[int, list[int]] = {}
        start = 0
        for i in range(1, len(host) + 1):
            if i == len(host) or host[i] != host[start]:
                if host[start] >= 0:
                    segments.append((start, i, host[start]))
                    per_slot.setdefault(host[start], []).extend(range(start, i))
                start = i
        slot_tokens = {
            s: torch.tensor(per_slot[s], dtype=torch.long, device=device) for s in sorted(per_slot)
        }
        token_slots = torch.tensor(host, dtype=torch.long, device=device)
        return LoRAMeta(len(host), token_slots, tuple(segments), slot_tokens)
