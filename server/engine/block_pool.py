"""The KV block pool's bookkeeping: which fixed-size blocks are free. Tensors live in PagedKVCache."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """`num_blocks` blocks of `block_size` token positions each; all-or-nothing allocation.

    A block may be held by several sequences (choices of one request sharing their prompt's full blocks, which
    no holder writes again): each holder counts once, and the block is free again when the last one releases it.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("--num-kv-blocks and --block-size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._holders = [0] * num_blocks  # sequences holding each block

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
        new = [self._free.popleft() for _ in range(missing)]
        for block in new:
            self._holders[block] = 1
        blocks.extend(new)
        return True

    def share(self, blocks: list[int]) -> list[int]:
        """Hold `blocks` (already held by another sequence) for one more: a new list the new holder owns."""
        for block in blocks:
            if self._holders[block] < 1:
                raise ValueError(f"block {block} is free: only a held block can be shared")
            self._holders[block] += 1
        return list(blocks)

    def holders(self, block: int) -> int:
        return self._holders[block]

    def release(self, blocks: list[int]) -> None:
        """Let go of every block of a finished, aborted or preempted sequence, and empty the list; a block
        returns to the free list when its last holder lets go."""
        for block in blocks:
            self._holders[block] -= 1
            if self._holders[block] == 0:
                self._free.append(block)
        blocks.clear()
