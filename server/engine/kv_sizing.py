"""How many KV blocks to preallocate when `--num-kv-blocks` is not given."""

from __future__ import annotations

import os

import torch


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    # K and V, every layer: 2 * layers * kv_heads * head_dim * itemsize
    return 2 * num_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def auto_num_blocks(*, bytes_per_token: int, block_size: int, max_num_seqs: int, max_model_len: int,
                    device: torch.device, memory_fraction: float = 0.9) -> int:
    """Enough blocks for every sequence at full length, capped by what the device can spare.

    CUDA: `memory_fraction` of the memory still free after the model loaded. CPU: a quarter of the
    available RAM (the rest is for the model, activations and the host adapter cache).
    """
    want_tokens = max_num_seqs * max_model_len
    spare = _spare_bytes(device, memory_fraction)
    tokens = min(want_tokens, spare // bytes_per_token)
    return max(1, tokens // block_size)


def _spare_bytes(device: torch.device, memory_fraction: float) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * memory_fraction)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError):
        return 2**30
