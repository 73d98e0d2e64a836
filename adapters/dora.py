"""DoRA (weight-decomposed LoRA, PEFT's `use_dora=True`): the per-output-channel factor, computed once per load.

PEFT's DoRA layer computes, in every forward,

    y = g * (W x + s B A x) + (1 - g) * bias        g = m / ||W + s B A||_row     (PEFT: mag_norm_scale)

with m the adapter's trained magnitude vector [out], W the base weight (dequantized for nf4 / int8 bases, as
PEFT's `dequantize_module_weight` does) and the norm taken per output channel (row of the linear view; for an
embedding, whose linear view is E^T [dim, vocab], per embedding dimension over the vocabulary). g depends only
on the adapter and the base weight, so it is computed here once per read of the adapter's files (registration,
then any re-read after the host tier evicted it), on the loader's thread, never on the engine's, and travels
with the adapter's weights to its device slot (layer.py `LoRASlots`); the forward then costs one multiply (and
an add with a bias) per DoRA-targeted layer, and only in steps that contain a DoRA row.
"""

from __future__ import annotations

import torch

# Rows of W + s B A materialised at once: bounds the temporary to this many elements (fp32) whatever the layer.
CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def dora_factor(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                magnitude: torch.Tensor) -> torch.Tensor:
    """g = magnitude / ||W + scale * B A|| per row, fp32 on the CPU: PEFT's `DoraLinearLayer.get_weight_norm`
    (W + scaling * lora_weight, torch.linalg.norm over dim 1), computed in fp32 on W's device in row chunks.
    weight: [out, in] (the linear view); a: [r, in]; b: [out, r]; magnitude: [out]. Entries whose norm is 0
    come out inf or NaN: the caller refuses them."""
    device = weight.device
    a32 = a.to(device, torch.float32)
    b32 = b.to(device, torch.float32)
    out = weight.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, weight.shape[1]))
    norms = torch.empty(out, dtype=torch.float32, device=device)
    for lo in range(0, out, step):
        rows = slice(lo, min(out, lo + step))
        adapted = weight[rows].to(torch.float32) + scale * (b32[rows] @ a32)  # [rows, in]
        norms[rows] = torch.linalg.norm(adapted, dim=1)
    return (magnitude.to(device, torch.float32) / norms).cpu()
