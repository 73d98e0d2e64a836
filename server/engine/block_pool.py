"""The KV block pool's bookkeeping: which fixed-size blocks are free. Tensors live in PagedKVCache."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """`num_blocks` blocks of `block_size` token positions each; all-or-nothing allocation."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("--num-kv-blocks and --block-size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, blocks: list[int], num_tokens: int) -> bool:
        """Extend `blocks` in place to hold `num_tokens` positions; False (and no change) if the pool is short."""
        missing = self.blocks_needed(num_tokens) - len(blocks)
        if missing <= 0:
            return True
        if missing > len(self._free):
            return False
        blocks.extend(self._free.popleft() for _ in range(missing))
        return True

    def release(self, blocks: list[int]) -> None:
        """Return every block of a finished, aborted or preempted sequence, and empty the list."""
        self._free.extend(blocks)
        blocks.clear()
