"""The KV block pool's bookkeeping: which fixed-size blocks are held, free, or free but still cached.
Tensors live in PagedKVCache.

A block is *held* by every sequence whose block table lists it (a prefix-cache hit adds a holder), and is given
back when its last holder lets go. A full block whose K/V is final can be *published* under its prefix-cache
key (prefix_cache.py); once nobody holds it, it stays in the pool as *cached*: free to evict (least recently
released first) yet found by `lookup` until then. Allocation takes never-cached blocks first, then evicts.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from loraplex.server.engine.prefix_cache import Component


class BlockPool:
    """`num_blocks` blocks of `block_size` token positions each; all-or-nothing allocation."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("--num-kv-blocks and --block-size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))  # nobody holds them, no cached content
        self._cached: OrderedDict[int, None] = OrderedDict()  # nobody holds them, published: LRU first
        self._holders = [0] * num_blocks  # sequences holding each block
        self._key: list[bytes | None] = [None] * num_blocks  # published blocks' keys
        self._components: list[tuple[Component, ...]] = [()] * num_blocks
        self._by_key: dict[bytes, int] = {}
        self._by_component: dict[Component, set[int]] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation can have: free ones and cached ones (evicted on demand)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Blocks nobody holds that a prefix-cache lookup can still find."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, blocks: list[int], num_tokens: int) -> bool:
        """Extend `blocks` in place to hold `num_tokens` positions; False (and no change) if the pool is short."""
        missing = self.blocks_needed(num_tokens) - len(blocks)
        if missing <= 0:
            return True
        if missing > self.num_free:
            return False
        for _ in range(missing):
            block = self._free.popleft() if self._free else self._evict()
            self._holders[block] = 1
            blocks.append(block)
        return True

    def holders(self, block: int) -> int:
        return self._holders[block]

    def release(self, blocks: list[int]) -> None:
        """Let go of every block of a finished, aborted or preempted sequence, and empty the list; a block
        nobody holds any more is cached when it was published, else free."""
        for block in blocks:
            self._holders[block] -= 1
            if self._holders[block] == 0:
                if self._key[block] is not None:
                    self._cached[block] = None
                else:
                    self._free.append(block)
        blocks.clear()

    # ---- the prefix cache ----------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The blocks of the longest prefix of `keys` that is published (not held by the caller yet)."""
        found: list[int] = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def take(self, blocks: Sequence[int]) -> list[int]:
        """Hold `blocks` (found by `lookup`) for one more sequence: a new list the new holder owns."""
        for block in blocks:
            if self._holders[block] == 0:
                del self._cached[block]  # no longer evictable
            self._holders[block] += 1
        return list(blocks)

    def publish(self, block: int, key: bytes, components: tuple[Component, ...]) -> None:
        """`block` (held, full, its K/V final) is found under `key` from now on. A key already published for
        another block keeps that one (two sequences computed the same prefix at once): this one is not cached."""
        if key in self._by_key or self._key[block] is not None:
            return
        self._key[block], self._components[block] = key, components
        self._by_key[key] = block
        for component in components:
            self._by_component.setdefault(component, set()).add(block)

    def forget(self, component: Component) -> int:
        """An adapter registration is gone: unpublish every block computed with it (lookups never find them
        again; cached ones are free at once, held ones when released). Returns how many were unpublished."""
        blocks = self._by_component.pop(component, set())
        for block in blocks:
            self._unpublish(block)
            if block in self._cached:
                del self._cached[block]
                self._free.appendleft(block)  # reused first
        return len(blocks)

    def _evict(self) -> int:
        block, _ = self._cached.popitem(last=False)  # least recently released
        self._unpublish(block)
        return block

    def _unpublish(self, block: int) -> None:
        key = self._key[block]
        if key is None:
            return
        del self._by_key[key]
        for component in self._components[block]:
            owners = self._by_component.get(component)
            if owners is not None:
                owners.discard(block)
                if not owners:
                    del self._by_component[component]
        self._key[block], self._components[block] = None, ()
