"""SamplingParams validation and the Sampler's greedy / filtered / seeded sampling semantics."""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.server.engine.sampler import Sampler, SampleRow, counter_uniforms
from loraplex.server.engine.sampling_params import SamplingParams

VOCAB = 50


# --- SamplingParams -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.2}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"max_tokens": 1_000_001}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"stop": tuple(f"s{i}" for i in range(17))}, "stop"),
        ({"stop": ("x" * 257,)}, "stop"),
        ({"stop": ("ok", "")}, "stop"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"seed": 2**63}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": float("nan")}, "min_p"),
    ],
)
def test_params_reject_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_accept_edges_and_normalise_sequences():
    p = SamplingParams(
        max_tokens=1_000_000,
        min_tokens=1_000_000,
        top_p=1.0,
        top_k=-1,
        stop=["a", "x" * 256, *[f"s{i}" for i in range(14)]],
        stop_token_ids=[3, 4],
        seed=-(2**63),
    )
    assert p.stop[0] == "a" and len(p.stop) == 16
    assert isinstance(p.stop, tuple) and p.stop_token_ids == (3, 4)
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy
    with pytest.raises(AttributeError):
        p.max_tokens = 3  # frozen


# --- Sampler ------------------------------------------------------------------------------------------


def _rows(params: SamplingParams, n: int, **kwargs) -> list[SampleRow]:
    return [SampleRow(params=params, **kwargs) for _ in range(n)]


def test_greedy_rows_take_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB)
    out = Sampler().sample(logits, _rows(SamplingParams(temperature=0.0), 6)).tokens
    assert out.dtype == torch.int64 and out.shape == (6,)
    assert torch.equal(out, logits.argmax(-1))


def test_greedy_accepts_half_precision_logits():
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB).to(torch.bfloat16)
    out = Sampler().sample(logits, _rows(SamplingParams(temperature=0.0), 3)).tokens
    assert torch.equal(out, logits.float().argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(2)
    logits = torch.randn(8, VOCAB) * 0.5  # fairly flat: sampling without the filters would wander
    expected = logits.argmax(-1)
    sampler = Sampler()
    for _ in range(20):
        top_k_one = _rows(SamplingParams(temperature=1.5, top_k=1), 8)
        assert torch.equal(sampler.sample(logits, top_k_one).tokens, expected)
        tiny_p = _rows(SamplingParams(temperature=1.5, top_p=1e-6), 8, seed=None)
        assert torch.equal(sampler.sample(logits, tiny_p).tokens, expected)


def test_flat_logits_without_filters_do_wander():
    """Control for the test above: the same setup with no filter does not always give the argmax."""
    torch.manual_seed(2)
    logits = torch.randn(8, VOCAB) * 0.5
    out = Sampler().sample(
        logits, _rows(SamplingParams(temperature=1.5), 8, seed=3)
    ).tokens
    assert not torch.equal(out, logits.argmax(-1))


def _seeded_stream(
    logit_steps: list[torch.Tensor], seed: int, position: int, others: int, device: str = "cpu"
) -> list[int]:
    """Sample `seed`'s row at `position` among `others` unrelated rows (seeded and unseeded) per step."""
    sampler = Sampler()
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=seed)
    tokens: list[int] = []
    mine = SampleRow(params, seed, output_ids=tokens)  # its output position advances as a request's does
    other_gens = [(1000 + j if j % 2 else None) for j in range(others)]
    for step, logits in enumerate(logit_steps):
        rows = [
            SampleRow(SamplingParams(temperature=0.5 + 0.1 * j, top_p=0.8), g)
            for j, g in enumerate(other_gens)
        ]
        rows.insert(position, mine)
        batch = torch.randn(others + 1, VOCAB, generator=torch.Generator().manual_seed(step))
        batch[position] = logits
        tokens.append(int(sampler.sample(batch.to(device), rows).tokens[position]))
    return tokens


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(device):
    gen = torch.Generator().manual_seed(7)
    steps = [torch.randn(VOCAB, generator=gen) for _ in range(40)]
    alone = _seeded_stream(steps, seed=42, position=0, others=0, device=device)
    assert alone == _seeded_stream(steps, seed=42, position=0, others=0, device=device)
    assert alone == _seeded_stream(steps, seed=42, position=3, others=5, device=device)
    assert alone == _seeded_stream(steps, seed=42, position=1, others=2, device=device)
    assert alone != _seeded_stream(steps, seed=43, position=0, others=0, device=device)


def test_unseeded_rows_differ():
    draws = set()
    probs_logits = torch.zeros(1, 1000)  # uniform over 1000 tokens
    for _ in range(5):
        draws.add(
            tuple(int(Sampler().sample(probs_logits, [SampleRow(SamplingParams(), None)]).tokens) for _ in range(5))
        )
    assert len(draws) == 5


def _frequencies(logits: torch.Tensor, params: SamplingParams, n: int, seeded: bool) -> torch.Tensor:
    sampler = Sampler()
    if seeded:  # one seeded row, many steps (its output position moves): the counter-based draw
        tokens = torch.cat([sampler.sample(logits[None], [SampleRow(params, 123, output_ids=[0] * i)]).tokens
                            for i in range(n)])
    else:  # many unseeded rows in one batch: exercises the batched path
        torch.manual_seed(123)
        tokens = sampler.sample(logits.expand(n, -1), _rows(params, n)).tokens
    return torch.bincount(tokens, minlength=logits.numel()).double() / n


def _assert_close_to(freq: torch.Tensor, probs: torch.Tensor, n: int) -> None:
    # Each frequency is within 5 standard deviations of its expectation (fails ~never by chance).
    sd = torch.sqrt(probs * (1 - probs) / n)
    assert torch.all((freq - probs).abs() <= 5 * sd + 1e-12), (freq, probs)


@pytest.mark.parametrize("seeded", [False, True])
def test_temperature_distribution(seeded):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20_000 if not seeded else 3_000
    for temperature in (1.0, 0.5):
        freq = _frequencies(logits, SamplingParams(temperature=temperature), n, seeded)
        _assert_close_to(freq, torch.softmax(logits / temperature, -1).double(), n)


def test_top_k_and_top_p_renormalise_the_kept_tokens():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    n = 20_000
    # top_k=2 keeps {0, 1}: 0.4/0.7, 0.3/0.7.
    freq = _frequencies(logits, SamplingParams(top_k=2), n, seeded=False)
    _assert_close_to(freq, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0], dtype=torch.float64), n)
    # top_p=0.75: 0.4 + 0.3 < 0.75, so token 2 is needed too → {0, 1, 2} renormalised over 0.9.
    freq = _frequencies(logits, SamplingParams(top_p=0.75), n, seeded=False)
    _assert_close_to(freq, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0], dtype=torch.float64), n)
    # top_p=0.69: the mass before token 1 (0.4) is below it, before token 2 (0.7) is not → {0, 1}.
    freq = _frequencies(logits, SamplingParams(top_p=0.69), n, seeded=False)
    _assert_close_to(freq, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0], dtype=torch.float64), n)
    # Both filters on the same row: top_k=3 then top_p=0.5 over {0.4, 0.3, 0.2}/0.9 → {0, 1}.
    freq = _frequencies(logits, SamplingParams(top_k=3, top_p=0.5), n, seeded=False)
    _assert_close_to(freq, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0], dtype=torch.float64), n)


def test_min_p_keeps_tokens_within_a_fraction_of_the_top_one():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    n = 20_000
    # min_p=0.45: keep p >= 0.45 * 0.4 = 0.18 → {0, 1, 2} renormalised over 0.9.
    freq = _frequencies(logits, SamplingParams(min_p=0.45), n, seeded=False)
    _assert_close_to(freq, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0], dtype=torch.float64), n)
    # After temperature 0.5 the probabilities are ∝ p²: 16, 9, 4, 1 (of 30); min_p=0.5 keeps 16 and 9 only.
    freq = _frequencies(logits, SamplingParams(min_p=0.5, temperature=0.5), n, seeded=True)
    _assert_close_to(freq, torch.tensor([16 / 25, 9 / 25, 0.0, 0.0], dtype=torch.float64), n)
    # min_p=1 keeps only the top token (ties included); min_p=0 is off.
    assert set(_frequencies(logits, SamplingParams(min_p=1.0), 200, seeded=False).nonzero()[:, 0].tolist()) == {0}
    freq = _frequencies(logits, SamplingParams(min_p=0.0), n, seeded=False)
    _assert_close_to(freq, torch.exp(logits).double(), n)


def test_min_p_applies_per_row_beside_other_filters():
    params = [SamplingParams(min_p=0.6), SamplingParams(), SamplingParams(top_k=3, min_p=0.45)]
    allowed = [{0, 1}, {0, 1, 2, 3}, {0, 1, 2}]  # 0.6·0.4=0.24 keeps 0.4, 0.3; 0.45·0.4=0.18 keeps 0.2 too
    reps = 400
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1])).expand(len(params) * reps, -1)
    torch.manual_seed(7)
    out = Sampler().sample(logits, [SampleRow(p) for _ in range(reps) for p in params]).tokens
    assert [set(out[i :: len(params)].tolist()) for i in range(len(params))] == allowed


def test_filters_apply_per_row_in_a_mixed_batch():
    params = [
        SamplingParams(top_k=1),  # greedy
        SamplingParams(top_k=2),
        SamplingParams(top_p=0.5),  # {0, 1}: 0.4 < 0.5
        SamplingParams(temperature=0.0),
        SamplingParams(),  # unfiltered: everything
    ]
    allowed = [{0}, {0, 1}, {0, 1}, {0}, {0, 1, 2, 3}]
    reps = 300  # the same five rows, interleaved, 300 times in one batch
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1])).expand(len(params) * reps, -1)
    torch.manual_seed(5)
    out = Sampler().sample(logits, [SampleRow(p) for _ in range(reps) for p in params]).tokens
    seen = [set(out[i :: len(params)].tolist()) for i in range(len(params))]
    assert seen == allowed


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    logits = torch.full((1, 8), -5.0)
    logits[0, 0] = 10.0  # EOS would win by far
    logits[0, 5] = 9.0  # then a stop token
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(5,))
    sampler = Sampler()
    early = sampler.sample(logits, [SampleRow(params, None, eos_token_ids=(0,), output_ids=[1, 1])]).tokens
    assert int(early) not in (0, 5)
    assert int(sampler.sample(logits, [SampleRow(params, None, (0,), output_ids=[1, 1, 1])]).tokens) == 0
    # ignore_eos does not lift the mask; an out-of-vocab eos id is ignored rather than crashing.
    ignore = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)
    assert int(sampler.sample(logits, [SampleRow(ignore, None, (0, 99))]).tokens) == 5
    # Sampled rows are masked too: EOS never appears before min_tokens.
    sampled = SamplingParams(temperature=1.0, min_tokens=1)
    torch.manual_seed(0)
    out = sampler.sample(logits.expand(500, -1), [SampleRow(sampled, None, (0,)) for _ in range(500)]).tokens
    assert 0 not in out.tolist()


def test_logits_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="logits"):
        Sampler().sample(torch.zeros(2, VOCAB), [SampleRow(SamplingParams())])


def test_sampler_does_not_modify_caller_logits():
    logits = torch.randn(2, VOCAB)
    before = logits.clone()
    rows = [
        SampleRow(SamplingParams(min_tokens=2, top_k=3), None, (0,)),
        SampleRow(SamplingParams(top_p=0.3)),
    ]
    Sampler().sample(logits, rows)
    assert torch.equal(logits, before)


def test_random_batches_always_return_allowed_tokens():
    """Property: whatever mix of params, the token is inside the row's top-k and top-p set."""
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(30):
        n = rng.randint(1, 6)
        logits = torch.randn(n, VOCAB) * 3
        params = [
            SamplingParams(
                temperature=rng.choice([0.0, 0.3, 1.0, 2.0]),
                top_k=rng.choice([0, -1, 1, 3, 10]),
                top_p=rng.choice([1.0, 0.9, 0.5, 0.1]),
            )
            for _ in range(n)
        ]
        out = Sampler().sample(
            logits, [SampleRow(p, (rng.randint(0, 99))) for p in params]
        ).tokens
        for i, p in enumerate(params):
            assert int(out[i]) in _allowed(logits[i], p)


def _allowed(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Plain reference for the kept set (a loop, no vectorization)."""
    order = logits.argsort(descending=True).tolist()
    if p.greedy:
        return {order[0]}
    if p.top_k > 0:
        order = order[: p.top_k]
    probs = torch.softmax(logits[order] / p.temperature, -1).tolist()
    kept, mass = set(), 0.0
    for tok, prob in zip(order, probs, strict=True):
        if p.top_p < 1.0 and mass >= p.top_p:
            break
        kept.add(tok)
        mass += prob
    return kept


def test_counter_uniforms_equal_plain_splitmix64():
    """The int64 tensor arithmetic (wrapping products, logical shifts) is splitmix64 as plain integers give it."""
    mask = (1 << 64) - 1

    def plain(seed: int, position: int) -> float:
        x = (seed * 0x9E3779B97F4A7C15 + position) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
        return (x >> 11) * 2.0**-53

    pairs = [(0, 0), (1, 0), (42, 7), (-1, 3), (2**63 - 1, 2**40), (-(2**63), 1), (123456789, 999)]
    seeds = torch.tensor([s for s, _ in pairs], dtype=torch.int64)
    positions = torch.tensor([p for _, p in pairs], dtype=torch.int64)
    got = counter_uniforms(seeds, positions).tolist()
    assert got == [plain(s & mask, p) for s, p in pairs]
    assert all(0.0 <= u < 1.0 for u in got)


def test_a_seeded_row_draws_the_same_token_at_the_same_position_whatever_else_runs():
    """Recomputed after a preemption, a request meets the same (seed, position): the same token."""
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=1.0, seed=9)
    first = Sampler().sample(logits[:1], [SampleRow(params, 9, output_ids=[1, 2])]).tokens
    rows = [SampleRow(SamplingParams(temperature=0.7), None), SampleRow(params, 9, output_ids=[1, 2]),
            SampleRow(SamplingParams(temperature=0.0)), SampleRow(params, 10)]
    batch = Sampler().sample(logits[[1, 0, 2, 3]], rows).tokens
    assert int(batch[1]) == int(first)


@pytest.mark.parametrize(("params", "flat"), [
    (SamplingParams(temperature=0.8, top_k=40), False),  # top-k: its candidates
    (SamplingParams(temperature=1.1, top_p=0.9), False),  # top-p held by the 256 likeliest
    (SamplingParams(temperature=1.0, top_p=0.9), True),  # flat: top-p reaches past 256, the whole row sorted
    (SamplingParams(temperature=0.7, top_k=300, top_p=0.8, min_p=0.01), False),
    (SamplingParams(temperature=1.3, min_p=0.05), False),  # neither: the vocabulary in id order
])
def test_every_draw_path_samples_the_filtered_distribution(params, flat):
    """Each path of the batched draw gives the distribution of `_filtered_probs` (the plain twin): every token's
    frequency over 40,000 draws on a 1,000-token vocabulary within 5 standard deviations of its probability."""
    from loraplex.server.engine.sampler import _filtered_probs

    vocab, n = 1000, 40_000
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(vocab, generator=gen) * (0.05 if flat else 3.0)
    expected = _filtered_probs(logits[None], [params])[0].double()
    torch.manual_seed(4)  # the rows have no seed: their uniforms come from torch's generator
    tokens = Sampler().sample(logits.expand(n, -1), [SampleRow(params, None) for _ in range(n)]).tokens
    freq = torch.bincount(tokens, minlength=vocab).double() / n
    _assert_close_to(freq, expected, n)
    assert not freq[expected == 0].any()  # nothing the filters drop is ever drawn
