"""Pick one next token per sequence from the model's last-position logits.

Greedy rows take an argmax; sampled rows go through temperature → top-k → top-p → softmax (fp32) and one
`torch.multinomial` draw. A seeded request draws only from its own `torch.Generator`, so its tokens do not
depend on which other requests share the batch or where its row sits.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from loraplex.server.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SampleRow:
    """What the sampler needs to know about one row of the logits (one sequence, this step)."""

    params: SamplingParams
    generator: torch.Generator | None = None
    num_output_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A per-request generator on `device`; `seed=None` draws a random seed so unseeded requests differ."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


class Sampler:
    """Stateless: all per-request state (generator, counts) arrives in the `SampleRow`s."""

    def sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """logits [N, V] (any float dtype) → next token ids [N] int64, on logits' device."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [N={len(rows)}, V], got {tuple(logits.shape)}")
        logits = _mask_early_stops(logits.float(), rows)  # fp32: softmax and cumsum want it anyway
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not sampled:  # all greedy (common): no [N, V] gather of the rows
            return logits.argmax(dim=-1)
        out = torch.empty(len(rows), dtype=torch.int64, device=logits.device)
        if greedy:
            idx = torch.tensor(greedy, device=logits.device)
            out[idx] = logits[idx].argmax(dim=-1)
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            probs = _filtered_probs(logits[idx], [rows[i].params for i in sampled])
            out[idx] = _draw(probs, [rows[i].generator for i in sampled])
        return out


def _mask_early_stops(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Rows still short of min_tokens may not emit EOS or a stop token: those logits become -inf.

    Out of place (`index_put`), so the caller's logits are never modified, and no copy when no row needs it.
    """
    vocab = logits.shape[1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i, row in enumerate(rows):
        if row.num_output_tokens >= row.params.min_tokens:
            continue
        # ignore_eos does not matter here: EOS is forbidden either way until min_tokens is reached.
        banned = {t for t in (*row.eos_token_ids, *row.params.stop_token_ids) if 0 <= t < vocab}
        row_idx.extend([i] * len(banned))
        tok_idx.extend(banned)
    if not row_idx:
        return logits
    device = logits.device
    index = (torch.tensor(row_idx, device=device), torch.tensor(tok_idx, device=device))
    return logits.index_put(index, torch.tensor(float("-inf"), device=device))


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [M, V] fp32 of sampled rows → probabilities [M, V] after temperature, top-k and top-p."""
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    # Shift each row so its max is 0 before dividing: the distribution is the same, and a small temperature
    # (>= GREEDY_TEMPERATURE_EPS) can no longer overflow a large finite logit to +inf (softmax -> NaN).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temps[:, None]  # [M, V] / [M, 1]
    vocab = logits.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]  # vocab = "keep all"
    top_p = [p.top_p for p in params]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _top_k_top_p(logits, torch.tensor(top_k, device=device), torch.tensor(top_p, device=device))
    return torch.softmax(logits, dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [M, V], top_k [M] (V = off), top_p [M] (1.0 = off) → logits with dropped tokens at -inf.

    One descending sort serves both filters. Top-p keeps token j (in sorted order) iff the probability
    mass strictly before it is < top_p: the smallest prefix whose mass reaches top_p, and never empty
    since the first token has zero mass before it.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [M, V] each
    ranks = torch.arange(logits.shape[1], device=logits.device)  # [V]
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [M, V] exclusive cumulative sum
    # Rows with top_p == 1 skip the test: fp rounding could otherwise push the cumsum to 1 early. The top
    # token is never dropped: a top_p that rounds to 0 in fp32 (subnormal) still keeps one token.
    drop_p = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0) & (ranks[None, :] > 0)
    sorted_logits = sorted_logits.masked_fill(drop_p, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """probs [M, V] → one token per row [M]. Seeded rows draw alone from their own generator."""
    out = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        # Unseeded rows share the global RNG, so one batched call is as good as many.
        idx = torch.tensor(shared, device=probs.device)
        out[idx] = torch.multinomial(probs[idx], 1).squeeze(-1)
    for i, generator in enumerate(generators):
        if generator is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=generator)[0]
    return out
