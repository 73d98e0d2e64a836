"""Automatic prefix caching: the keys that say which full KV blocks hold the same thing.

A full block's key hashes its parent block's key and its token ids; the first block's parent is the request's
*KV identity*: what produced the K/V (the base model; one adapter registration, name and epoch; a merge recipe
over registrations) plus an optional `cache_salt` (vLLM's field: tenants that must not share timing side
channels give different salts). So a block is found again only by a request that would compute exactly the
same K/V into it: the same tokens before and in it, through the same weights. A re-registered adapter has a new
epoch: the old registration's blocks are never found again (and BlockPool.forget frees them first).

Keys are 16-byte BLAKE2b digests, not Python's hash(): a collision would let one tenant read another's KV.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

# A registration of an adapter as the SlotTable numbers them: (name, epoch). The base model has none.
Component = tuple[str, int]


@dataclass(frozen=True)
class KVIdentity:
    """What a request's K/V depends on besides its tokens. `components`: the adapter registrations it reads
    (their removal frees the blocks); `label`: everything else (strategy, weights, salt) as text."""

    label: str
    components: tuple[Component, ...] = ()

    @property
    def root(self) -> bytes:
        """The key the first block chains from."""
        text = f"{self.label}|{';'.join(f'{n}#{e}' for n, e in self.components)}"
        return hashlib.blake2b(text.encode(), digest_size=16).digest()


def extend_keys(keys: list[bytes], tokens: Sequence[int], root: bytes, block_size: int, num_blocks: int) -> None:
    """Append to `keys` (the keys of blocks 0 .. len(keys) - 1 of `tokens`) up to `num_blocks` keys: key i hashes
    key i - 1 (or `root`) and tokens [i * bs, (i + 1) * bs). The caller passes only full blocks."""
    while len(keys) < num_blocks:
        i = len(keys)
        block = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        keys.append(hashlib.blake2b((keys[-1] if keys else root) + block, digest_size=16).digest())
