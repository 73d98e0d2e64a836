"""Pick one next token per sequence from the model's last-position logits, and its raw log-probability.

Per row, in vLLM's order: logit_bias → grammar bitmask → min_tokens EOS/stop ban → repetition penalty →
frequency/presence penalties → temperature → min-p → top-k → top-p → draw. Greedy rows (temperature ~ 0 or
top_k == 1) take the argmax after the bias, mask, ban and penalties. Every step is batched over the rows
that use it, and a batch where no row uses a feature pays nothing for it.

The draw is one batched inverse-CDF lookup for every sampled row: row i takes the first token whose cumulative
probability exceeds u_i × its total, with u_i a uniform computed from (the request's seed, its output position)
by a counter-based hash (`counter_uniforms`). A request's tokens therefore depend only on its seed and its own
logits, never on which requests share the batch, where its row sits, or how often it was preempted; a request
without a seed gets a random one at creation (`request_seed`). Penalties read per-request token counts kept
incrementally (`TokenCounts`) when the row names one, else count its token lists (the plain twin).
Log-probabilities are always those of the raw logits (before any of the above), as vLLM reports.
"""

from __future__ import annotations

import secrets
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch

from loraplex.server.engine.sampling_params import SamplingParams

# (rows [M] int64, packed allowed-token words [M, ceil(V/32)] int32): bit j of word w ↔ token 32·w + j,
# set = allowed (xgrammar / llguidance layout).
Bitmask = tuple[torch.Tensor, torch.Tensor]


@dataclass(slots=True)
class SampleRow:
    """What the sampler needs to know about one row of the logits (one sequence, this step).

    `seed`: the request's sampling seed (None: a fresh random draw each time). `prompt_ids` / `output_ids` are
    references to the request's own lists (not copies): `len(output_ids)` is how many tokens were generated so
    far (min_tokens, and the draw's position); the penalties count them unless `counts_row` names the
    request's row of the step's `TokenCounts`.
    """

    params: SamplingParams
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    counts_row: int | None = None


@dataclass(frozen=True, slots=True)
class SampleOutput:
    """One step's picks. Tensors stay on the logits' device; the caller syncs them once.

    `no_token[i]`: row i's grammar bitmask (with its min_tokens ban) allowed no token at all; its token was
    picked as if unmasked and means nothing: fail that request alone. `errors[i]`: row i's parameters cannot
    apply to this model (a logit_bias id beyond the vocabulary); its token means nothing either.
    """

    tokens: torch.Tensor  # [N] int64
    logprobs: torch.Tensor  # [N] fp32: log p(token) under log_softmax(raw logits)
    top_ids: torch.Tensor | None  # [N, K] int64, K = max logprobs asked in the batch; None when K == 0
    top_logprobs: torch.Tensor | None  # [N, K] fp32, raw distribution, descending
    no_token: torch.Tensor  # [N] bool
    errors: dict[int, str] = field(default_factory=dict)


def request_seed(seed: int | None) -> int:
    """A request's sampling seed: its own, else a random one (unseeded requests differ from each other, and
    each still draws the same token again should it be recomputed)."""
    return secrets.randbits(63) if seed is None else seed


# splitmix64's constants as signed int64 (torch has no uint64 arithmetic; products wrap the same way).
_GOLDEN, _MIX1, _MIX2 = (c - 2**64 for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def counter_uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """seeds, positions [M] int64 -> [M] float64 uniforms in [0, 1): splitmix64 of (seed, position), a pure
    function (the same pair gives the same number on any device, in any batch)."""
    x = seeds * _GOLDEN + positions
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return _shift_right(x, 11).double() * 2.0**-53


def check_vocab(params: SamplingParams, vocab_size: int) -> None:
    """ValueError when `params` name a token the model cannot produce (call it at admission for a 400)."""
    for token, _ in params.logit_bias:
        if token >= vocab_size:
            raise ValueError(f"logit_bias token id {token} is out of range for this model's vocabulary "
                             f"of {vocab_size} tokens")


def bitmask_row(bitmask: Bitmask | None, i: int) -> Bitmask | None:
    """The part of `bitmask` for row i, re-indexed as row 0 (to sample that row alone); syncs with the host."""
    if bitmask is None:
        return None
    rows, words = bitmask
    hit = (rows == i).nonzero()[:, 0]  # [<=1]
    if hit.numel() == 0:
        return None
    return torch.zeros_like(rows[hit]), words[hit]


class TokenCounts:
    """Per-request token statistics the penalties read, kept incrementally by the engine: a row of a growing
    [capacity, V] table per request with penalties, filled from its prompt and outputs once (`open`), then
    one accumulate per step for all rows (`record`), instead of recounting prompt + outputs every step."""

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.output = torch.zeros(0, vocab_size, device=self.device)  # [capacity, V] fp32: output token counts
        self.prompt_seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=self.device)  # [capacity, V]
        self._free: list[int] = []

    def open(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> int:
        """A row for a request, counting what it holds so far; close it when the request ends."""
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.output[row] = _token_counts(self.output, [(output_ids,)])[0]
        self.prompt_seen[row] = _token_counts(self.output, [(prompt_ids,)])[0] > 0
        return row

    def close(self, row: int) -> None:
        self._free.append(row)

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """rows [R] int64, tokens [R] int64 (on the table's device): each row generated one more token."""
        ones = torch.ones((), device=self.device)
        self.output.index_put_((rows, tokens.clamp(0, self.vocab_size - 1)), ones, accumulate=True)

    def _grow(self) -> None:
        n = self.output.shape[0]
        more = max(8, n)  # doubling: a step never waits for more than one growth
        self.output = torch.cat([self.output, torch.zeros(more, self.vocab_size, device=self.device)])
        self.prompt_seen = torch.cat([self.prompt_seen, torch.zeros(more, self.vocab_size, dtype=torch.bool,
                                                                    device=self.device)])
        self._free.extend(range(n + more - 1, n - 1, -1))


class Sampler:
    """Stateless but for `counts` (the engine's TokenCounts, read for rows that name a row of it)."""

    def __init__(self, counts: TokenCounts | None = None) -> None:
        self.counts = counts

    def sample(self, logits: torch.Tensor, rows: list[SampleRow], bitmask: Bitmask | None = None) -> SampleOutput:
        """logits [N, V] (any float dtype) → tokens, raw logprobs and top alternatives, on logits' device.

        Never modifies `logits`. Raises only on malformed arguments (shapes), never for one row's parameters.
        """
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [N={len(rows)}, V], got {tuple(logits.shape)}")
        raw = logits.float()  # fp32: softmax, cumsum and logsumexp want it anyway
        errors = _row_errors(rows, raw.shape[1])
        processed, no_token = _processed_logits(raw, rows, bitmask, errors, self.counts)
        tokens = _pick(processed, rows)
        return SampleOutput(tokens, *raw_logprobs(raw, tokens, rows), no_token, errors)


def _row_errors(rows: list[SampleRow], vocab: int) -> dict[int, str]:
    errors: dict[int, str] = {}
    for i, row in enumerate(rows):
        try:
            check_vocab(row.params, vocab)
        except ValueError as exc:
            errors[i] = str(exc)
    return errors


def _processed_logits(raw: torch.Tensor, rows: list[SampleRow], bitmask: Bitmask | None,
                      errors: dict[int, str], counts: TokenCounts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """raw [N, V] fp32 → (logits [N, V] after bias, mask, min_tokens ban and penalties; no_token [N] bool).

    Returns `raw` itself when no row uses any of them (no [N, V] work); otherwise edits one private copy in
    place. A row left with every logit at -inf (the grammar, or the grammar and the ban, allow nothing) is
    flagged in no_token and gets its raw logits back, so it cannot poison the batch with a NaN softmax.
    """
    no_token = torch.zeros(raw.shape[0], dtype=torch.bool, device=raw.device)
    banned = _early_stop_bans(rows, raw.shape[1])
    if bitmask is None and not banned[0] and not any(r.params.logit_bias or r.params.has_penalties for r in rows):
        return raw, no_token
    logits = raw.clone()
    _add_logit_bias(logits, rows, errors)
    if bitmask is not None:
        _apply_bitmask(logits, bitmask)
    if banned[0]:
        logits.index_put_(_index(banned, logits.device), torch.tensor(float("-inf"), device=logits.device))
    _apply_repetition_penalty(logits, rows, counts)
    _apply_frequency_presence(logits, rows, counts)
    if bitmask is not None or banned[0]:
        no_token = torch.isneginf(logits.amax(dim=-1))  # [N]
        logits = torch.where(no_token[:, None], raw, logits)
    return logits, no_token


def _index(pairs: tuple[list[int], list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(pairs[0], device=device), torch.tensor(pairs[1], device=device)


def _add_logit_bias(logits: torch.Tensor, rows: list[SampleRow], errors: dict[int, str]) -> None:
    """One accumulate index_put_ over all (row, token) pairs; rows whose ids are out of vocab are skipped."""
    row_idx: list[int] = []
    tok_idx: list[int] = []
    bias: list[float] = []
    for i, row in enumerate(rows):
        if i in errors:
            continue
        for token, value in row.params.logit_bias:
            row_idx.append(i)
            tok_idx.append(token)
            bias.append(value)
    if row_idx:
        values = torch.tensor(bias, dtype=logits.dtype, device=logits.device)
        logits.index_put_(_index((row_idx, tok_idx), logits.device), values, accumulate=True)


def _apply_bitmask(logits: torch.Tensor, bitmask: Bitmask) -> None:
    """-inf on the tokens each listed row's packed mask disallows; unlisted rows untouched.

    Tokens beyond the mask's 32·W bits are disallowed (a grammar cannot want a token it does not know);
    words beyond ceil(V/32) are ignored.
    """
    rows, words = bitmask
    if rows.dim() != 1 or words.dim() != 2 or words.shape[0] != rows.shape[0] or words.dtype != torch.int32:
        raise ValueError(f"bitmask must be (rows [M] int64, words [M, ceil(V/32)] int32), got rows "
                         f"{tuple(rows.shape)} and words {tuple(words.shape)} {words.dtype}")
    if rows.numel() == 0:
        return
    vocab = logits.shape[1]
    rows = rows.to(device=logits.device, dtype=torch.int64)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)  # [32]
    # [M, W, 32] → [M, 32·W]: bit j of word w is token 32·w + j; `& 1` is right for the sign bit too.
    bits = ((words.to(logits.device)[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab].bool()
    if bits.shape[1] < vocab:
        bits = torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]), value=False)
    sub = logits.index_select(0, rows).masked_fill_(~bits, float("-inf"))  # [M, V]
    logits.index_copy_(0, rows, sub)


def _early_stop_bans(rows: list[SampleRow], vocab: int) -> tuple[list[int], list[int]]:
    """(row, token) pairs to forbid: rows still short of min_tokens may not emit EOS or a stop token."""
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i, row in enumerate(rows):
        if len(row.output_ids) >= row.params.min_tokens:
            continue
        # ignore_eos does not matter here: EOS is forbidden either way until min_tokens is reached.
        banned = {t for t in (*row.eos_token_ids, *row.params.stop_token_ids) if 0 <= t < vocab}
        row_idx.extend([i] * len(banned))
        tok_idx.extend(banned)
    return row_idx, tok_idx


def _token_counts(logits: torch.Tensor, lists: list[tuple[Sequence[int], ...]]) -> torch.Tensor:
    """[R, V] fp32: how often each token id occurs in lists[j] (the id sequences of the j-th picked row).

    One accumulating scatter over flattened (row, id) pairs instead of a padded [R, L] tensor; ids outside
    [0, V) land in a dummy column V that is dropped.
    """
    vocab, device = logits.shape[1], logits.device
    lengths = [sum(len(seq) for seq in seqs) for seqs in lists]
    counts = torch.zeros(len(lists), vocab + 1, dtype=logits.dtype, device=device)
    if sum(lengths):
        # array('q') from the chained lists: ~2x faster than torch.tensor(list) on long prompts (no copy per list).
        flat = array("q", chain.from_iterable(chain.from_iterable(lists)))
        ids = torch.frombuffer(flat, dtype=torch.int64).to(device)  # [T]
        ids = torch.where((ids >= 0) & (ids < vocab), ids, vocab)
        owner = torch.repeat_interleave(torch.tensor(lengths, device=device), output_size=len(flat))  # [T]
        counts.index_put_((owner, ids), torch.ones((), dtype=logits.dtype, device=device), accumulate=True)
    return counts[:, :vocab]


def _apply_repetition_penalty(logits: torch.Tensor, rows: list[SampleRow], counts: TokenCounts | None) -> None:
    """vLLM: tokens seen in prompt or output get positive logits divided, negative ones multiplied by p."""
    picked = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1]
    if not picked:
        return
    device = logits.device
    if counts is not None and all(rows[i].counts_row is not None for i in picked):
        at = torch.tensor([rows[i].counts_row for i in picked], device=counts.device)
        seen = (counts.prompt_seen[at] | (counts.output[at] > 0)).to(device)  # [R, V]
    else:
        seen = _token_counts(logits, [(rows[i].prompt_ids, rows[i].output_ids) for i in picked]) > 0  # [R, V]
    idx = torch.tensor(picked, device=device)
    penalty = torch.tensor([rows[i].params.repetition_penalty for i in picked], device=device)[:, None]  # [R, 1]
    penalty = torch.where(seen, penalty, 1.0)  # [R, V]
    sub = logits.index_select(0, idx)
    logits.index_copy_(0, idx, torch.where(sub > 0, sub / penalty, sub * penalty))


def _apply_frequency_presence(logits: torch.Tensor, rows: list[SampleRow], counts: TokenCounts | None) -> None:
    """OpenAI: logit -= frequency · count + presence · (count > 0), counting the output tokens only."""
    picked = [i for i, r in enumerate(rows) if r.params.frequency_penalty != 0 or r.params.presence_penalty != 0]
    if not picked:
        return
    device = logits.device
    if counts is not None and all(rows[i].counts_row is not None for i in picked):
        output = counts.output[torch.tensor([rows[i].counts_row for i in picked], device=counts.device)].to(device)
    else:
        output = _token_counts(logits, [(rows[i].output_ids,) for i in picked])  # [R, V]
    idx = torch.tensor(picked, device=device)
    freq = torch.tensor([rows[i].params.frequency_penalty for i in picked], device=device)[:, None]  # [R, 1]
    pres = torch.tensor([rows[i].params.presence_penalty for i in picked], device=device)[:, None]  # [R, 1]
    logits.index_copy_(0, idx, logits.index_select(0, idx) - (freq * output + pres * (output > 0)))


def _pick(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Processed logits [N, V] fp32 → tokens [N] int64: argmax for greedy rows, a draw for the others."""
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not sampled:  # all greedy (common): no [N, V] gather of the rows
        return logits.argmax(dim=-1)
    out = torch.empty(len(rows), dtype=torch.int64, device=logits.device)
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        out[idx] = logits[idx].argmax(dim=-1)
    idx = torch.tensor(sampled, device=logits.device)
    out[idx] = _draw_sampled(logits[idx], [rows[i] for i in sampled])
    return out


def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[SampleRow]
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """logits [N, V], tokens [N] → (log p(token) [N], top ids [N, K] | None, top logprobs [N, K] | None), fp32.

    The raw distribution (log_softmax of the logits as given), K = the most `logprobs` any row asks for.
    logit − logsumexp: no [N, V] log_softmax; the only [N, V] extra is the top-K when some row asks for it.
    """
    raw = logits.float()
    lse = torch.logsumexp(raw, dim=-1)  # [N]
    logprobs = raw.gather(1, tokens[:, None])[:, 0] - lse
    k = min(max((r.params.logprobs or 0 for r in rows), default=0), raw.shape[1])
    if k == 0:
        return logprobs, None, None
    top_values, top_ids = raw.topk(k, dim=-1)  # [N, K]; log_softmax is a per-row shift: same order
    return logprobs, top_ids, top_values - lse[:, None]


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [M, V] fp32 of sampled rows → probabilities [M, V] after temperature, min-p, top-k and top-p: the
    distribution every sampled row draws from, over the whole vocabulary (the plain twin of `_draw_sampled`'s
    candidate path, and its fallback)."""
    device = logits.device
    logits = _scaled(logits, params)
    vocab = logits.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]  # vocab = "keep all"
    top_p = [p.top_p for p in params]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _top_k_top_p(logits, torch.tensor(top_k, device=device), torch.tensor(top_p, device=device))
    return torch.softmax(logits, dim=-1)


def _scaled(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then min-p: logits [M, V] with each row's max at 0 (tokens min-p drops at -inf)."""
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    # Shift each row so its max is 0 before dividing: the distribution is the same, and a small temperature
    # (>= GREEDY_TEMPERATURE_EPS) can no longer overflow a large finite logit to +inf (softmax -> NaN).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temps[:, None]  # [M, V] / [M, 1]
    if any(p.min_p > 0 for p in params):
        logits = _min_p(logits, torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device))
    return logits


def _min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits [M, V] whose row max is 0, min_p [M] (0 = off) → logits with tokens below min-p at -inf.

    p_j / p_max = exp(logit_j - max) = exp(logit_j): keeping p_j >= min_p · p_max is keeping logit_j >= log(min_p)
    (log 0 = -inf keeps every token; the top token, at 0 >= log(min_p), is always kept).
    """
    return logits.masked_fill(logits < torch.log(min_p)[:, None], float("-inf"))


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


CANDIDATES = 256  # a top-p row draws from its 256 likeliest tokens when they hold its top-p mass


def _draw_sampled(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Processed logits [M, V] of sampled rows → tokens [M]: temperature, min-p, top-k, top-p, then one
    inverse-CDF lookup per row with u from (seed, output position) (`counter_uniforms`; random for rows with no
    seed), from the same distribution as `_filtered_probs` (the plain twin). Rows without top-k / top-p draw
    over the vocabulary in id order; the others over their candidates in descending order: their top-k (a
    partial sort of the raw logits: order and top-k do not change with temperature), or for top-p alone the 256
    likeliest when those hold the top-p mass (nearly always, for a language model's next token; else the whole
    row, sorted). Which way a row goes depends on its own parameters and logits only: its token never depends
    on the batch. No [M, V] sort on the common paths: a draw costs about what the argmax does."""
    device = logits.device
    params = [r.params for r in rows]
    vocab = logits.shape[1]
    u = _row_uniforms(rows, device)  # [M] float64
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    plain = [i for i, p in enumerate(params) if not 0 < p.top_k < vocab and p.top_p >= 1.0]
    ranked = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
    out = torch.empty(len(rows), dtype=torch.int64, device=device)
    for picked, draw in ((plain, _draw_plain), (ranked, _draw_ranked)):
        if picked:
            at = torch.tensor(picked, device=device)
            x = logits if len(picked) == len(rows) else logits.index_select(0, at)
            out[at] = draw(x, temps[at], min_p[at], top_k[at], top_p[at], u[at])
    return out


def _weights(x: torch.Tensor, top: torch.Tensor, temps: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Scaled logits [R, K] of raw logits x [R, K] whose row maximum is `top` [R, 1]: (x - top) / T, at most 0,
    with the tokens min-p drops at -inf (p_j / p_max = exp(scaled_j) < min_p)."""
    scaled = (x - top) / temps[:, None]
    if bool((min_p > 0).any()):
        scaled = scaled.masked_fill(scaled < torch.log(min_p)[:, None], float("-inf"))
    return scaled


def _draw_plain(x: torch.Tensor, temps: torch.Tensor, min_p: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rows with neither top-k nor top-p: inverse CDF over the vocabulary in id order."""
    return _inverse_cdf(_weights(x, x.amax(dim=-1, keepdim=True), temps, min_p).exp_(), u)


def _draw_ranked(x: torch.Tensor, temps: torch.Tensor, min_p: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rows with top-k (V = off) and/or top-p (1 = off), raw logits [R, V] → tokens [R] (see `_draw_sampled`)."""
    vocab = x.shape[1]
    p_only = top_k >= vocab  # [R]: top-p alone, normalised over the whole row
    needs = [int(top_k[~p_only].max())] if bool((~p_only).any()) else []  # the largest top-k
    if bool(p_only.any()):
        needs.append(CANDIDATES)
    width = min(vocab, max(needs))
    raw, ids = x.topk(width, dim=-1)  # [R, K], descending
    values = _weights(raw, raw[:, :1], temps, min_p)
    lse = torch.zeros(x.shape[0], device=x.device)  # [R]: the whole row's normaliser, for p_only rows
    covered = ~p_only
    if bool(p_only.any()):
        rows = p_only.nonzero()[:, 0]
        lse[rows] = torch.logsumexp(_weights(x[rows], raw[rows, :1], temps[rows], min_p[rows]), dim=-1)
        head = torch.exp(values[:, :CANDIDATES] - lse[:, None]).sum(dim=-1)  # mass of the 256 likeliest
        covered = covered | (head >= top_p)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for rows, candidates in ((covered, True), (~covered, False)):
        if not bool(rows.any()):
            continue
        if candidates:
            vals, order = values[rows], ids[rows]
        else:  # a flat distribution: its top-p set reaches past the candidates, sort the whole row
            full = _weights(x[rows], raw[rows, :1], temps[rows], min_p[rows])
            vals, order = full.sort(dim=-1, descending=True)
        pick = _inverse_cdf(_top_k_top_p_sorted(vals, top_k[rows], top_p[rows], lse[rows], vocab), u[rows])
        out[rows] = order.gather(1, pick[:, None])[:, 0]
    return out


def _row_uniforms(rows: list[SampleRow], device: torch.device) -> torch.Tensor:
    seeded = [r.seed is not None for r in rows]
    seeds = torch.tensor([r.seed if r.seed is not None else 0 for r in rows], dtype=torch.int64)
    positions = torch.tensor([len(r.output_ids) for r in rows], dtype=torch.int64)
    u = counter_uniforms(seeds, positions).to(device)  # [M] float64
    if all(seeded):
        return u
    return torch.where(torch.tensor(seeded, device=device), u, torch.rand(len(rows), dtype=torch.float64,
                                                                          device=device))


def _top_k_top_p_sorted(values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, lse: torch.Tensor,
                        vocab: int) -> torch.Tensor:
    """Descending logits [R, K] (a row's K likeliest, or all of it) → the probabilities [R, K] of what top-k then
    top-p keep, renormalised. As `_top_k_top_p`: top-p is over the top-k renormalised distribution (the whole
    row's, via `lse`, when top-k is off) and keeps token j iff the mass before it is < top_p."""
    ranks = torch.arange(values.shape[1], device=values.device)  # [K]
    values = values.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    kept_lse = torch.where(top_k < vocab, torch.logsumexp(values, dim=-1), lse)  # [R]
    probs = torch.exp(values - kept_lse[:, None])  # [R, K]
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0) & (ranks[None, :] > 0)
    return probs.masked_fill(drop, 0.0)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [M, V'] (any non-negative weights) → per row the first index whose cumulative weight exceeds
    u × the row's total. Candidates (a few hundred) sum in float64; a whole vocabulary in float32, whose
    rounding (~1e-7 relative per add) shifts a token's share by far less than sampling noise ever shows."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64 if probs.shape[1] <= 4096 else torch.float32)  # [M, V']
    target = (u * cdf[:, -1].double()).to(cdf.dtype)[:, None]
    picks = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[1] - 1)
    # u × total rounding up to the total (or a zero-weight tail) would pick what cannot be drawn: take the
    # heaviest instead (probability ~2**-53).
    drawable = probs.gather(1, picks[:, None])[:, 0] > 0
    return torch.where(drawable, picks, probs.argmax(dim=-1))
