"""vLLM-style sampling parameters in the Sampler: logit_bias, grammar bitmasks, repetition / frequency /
presence penalties, raw logprobs and top alternatives. The vectorised sampler is checked against a plain
per-row loop reference, row by row isolation is checked against each row sampled alone."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from loraplex.server.engine import sampler as sampler_module
from loraplex.server.engine.sampler import (
    Sampler,
    SampleRow,
    _filtered_probs,
    _processed_logits,
    bitmask_row,
    check_vocab,
)
from loraplex.server.engine.sampling_params import SamplingParams

VOCAB = 70  # not a multiple of 32: the last bitmask word is partial
INF = float("inf")


# --- SamplingParams: the new fields -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"presence_penalty": 2.5}, r"presence_penalty must be a number in \[-2, 2\]"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"presence_penalty": "1"}, "presence_penalty"),
        ({"frequency_penalty": -3}, r"frequency_penalty must be a number in \[-2, 2\]"),
        ({"frequency_penalty": True}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be a number in \(0, 10\]"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": 10.5}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"logit_bias": {1: 101}}, r"logit_bias values must be numbers in \[-100, 100\]"),
        ({"logit_bias": {1: float("nan")}}, "logit_bias values"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias token ids must be integers >= 0"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias token ids"),
        ({"logit_bias": {1.5: 1.0}}, "logit_bias token ids"),
        ({"logit_bias": [(1, 2.0), (1, 3.0)]}, "more than once"),
        ({"logit_bias": [(1, 2.0, 3.0)]}, "pairs"),
        ({"logit_bias": 5}, "logit_bias must be a mapping"),
        ({"logit_bias": "12"}, "logit_bias must be a mapping"),
        ({"logit_bias": {i: 1.0 for i in range(301)}}, "at most 300"),
        ({"logprobs": 21}, r"logprobs must be an integer in \[0, 20\]"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 2.0}, "logprobs"),
        ({"prompt_logprobs": 21}, r"prompt_logprobs must be an integer in \[0, 20\]"),
        ({"prompt_logprobs": True}, "prompt_logprobs"),
        ({"max_tokens": 0}, "0 only with prompt_logprobs"),
        ({"max_tokens": 0, "prompt_logprobs": 0, "min_tokens": 1}, "min_tokens"),
        ({"max_tokens": -1, "prompt_logprobs": 1}, "max_tokens"),
    ],
)
def test_new_fields_reject_bad_values_naming_field_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_new_fields_accept_edges_and_normalise_logit_bias():
    p = SamplingParams(presence_penalty=-2, frequency_penalty=2.0, repetition_penalty=10,
                       logit_bias={"7": 100, 3: -100.0, 5: 0.5}, logprobs=20, prompt_logprobs=0)
    assert p.logit_bias == ((3, -100.0), (5, 0.5), (7, 100.0))
    assert SamplingParams(logit_bias=[(9, 1), [2, -1.5]]).logit_bias == ((2, -1.5), (9, 1.0))
    assert SamplingParams(logit_bias={i: 1.0 for i in range(300)}).logit_bias[-1] == (299, 1.0)
    assert hash(p) == hash(SamplingParams(presence_penalty=-2, frequency_penalty=2.0, repetition_penalty=10,
                                          logit_bias=[(7, 100), (5, 0.5), (3, -100)], logprobs=20,
                                          prompt_logprobs=0))
    assert p.has_penalties and not SamplingParams().has_penalties
    assert SamplingParams(repetition_penalty=1e-3).has_penalties
    # Scoring a prompt without generating; the guided spec is stored as given.
    spec = object()
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=5, guided=spec)
    assert scoring.max_tokens == 0 and scoring.guided is spec
    with pytest.raises(AttributeError):
        p.logit_bias = ()  # frozen


# --- a plain reference: one row at a time, Python loops over tokens -----------------------------------


def _ref_processed(logits: list[float], row: SampleRow, allowed: set[int] | None) -> list[float]:
    """Bias → mask → min_tokens ban → repetition → frequency/presence, in float64."""
    x = list(logits)
    vocab = len(x)
    for token, bias in row.params.logit_bias:
        x[token] += bias
    if allowed is not None:
        x = [v if t in allowed else -INF for t, v in enumerate(x)]
    if len(row.output_ids) < row.params.min_tokens:
        for t in (*row.eos_token_ids, *row.params.stop_token_ids):
            if 0 <= t < vocab:
                x[t] = -INF
    rep = row.params.repetition_penalty
    for t in set(row.prompt_ids) | set(row.output_ids):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t, count in Counter(row.output_ids).items():
        x[t] -= row.params.frequency_penalty * count + row.params.presence_penalty
    return x


def _ref_probs(x: list[float], p: SamplingParams) -> list[float]:
    """Temperature → top-k → top-p → renormalise (sampled rows only)."""
    order = sorted(range(len(x)), key=lambda t: -x[t])
    if 0 < p.top_k < len(x):
        order = order[: p.top_k]
    scaled = [x[t] / p.temperature for t in order]
    top = max(scaled)
    weights = [math.exp(v - top) for v in scaled]
    total = sum(weights)
    kept: dict[int, float] = {}
    mass = 0.0
    for t, w in zip(order, weights, strict=True):
        if p.top_p < 1.0 and mass >= p.top_p and kept:
            break
        kept[t] = w
        mass += w / total
    norm = sum(kept.values())
    return [kept.get(t, 0.0) / norm for t in range(len(x))]


def _random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.5, 1.0, 1.7]),
        top_k=rng.choice([0, 1, 5, 30]),
        top_p=rng.choice([1.0, 0.9, 0.6]),
        min_tokens=rng.choice([0, 0, 3]),
        stop_token_ids=tuple(rng.sample(range(VOCAB), rng.choice([0, 2]))),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.7]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.8, -0.5]),
        presence_penalty=rng.choice([0.0, 0.0, 1.2, -1.0]),
        logit_bias={t: rng.uniform(-5, 5) for t in rng.sample(range(VOCAB), rng.choice([0, 0, 3]))},
        logprobs=rng.choice([None, 0, 3]),
    )


def _random_row(rng: random.Random) -> SampleRow:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 12))]
    output = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 8))]
    return SampleRow(_random_params(rng), None, (0, 1), prompt, output)


def _allowed_sets(words: torch.Tensor) -> list[set[int]]:
    """Decode packed words with plain integer arithmetic (the reference side of the bitmask)."""
    return [{32 * w + j for w, word in enumerate(r) for j in range(32) if (word >> j) & 1 and 32 * w + j < VOCAB}
            for r in words.tolist()]


def _random_bitmask(rng: random.Random, n: int, density: float = 0.5) -> tuple[list[int], torch.Tensor]:
    rows = sorted(rng.sample(range(n), rng.randint(0, n)))
    words = [[0] * math.ceil(VOCAB / 32) for _ in rows]
    for r in words:
        r[0] |= 1 << 5  # at least one allowed token per row
        for t in range(VOCAB):
            if rng.random() < density:
                r[t // 32] |= 1 << (t % 32)
    # Two's complement: bit 31 set is a negative int32.
    packed = torch.tensor([[w - 2**32 if w >= 2**31 else w for w in r] for r in words], dtype=torch.int32)
    return rows, packed.reshape(len(rows), math.ceil(VOCAB / 32))


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_pipeline_equals_the_loop_reference(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    raw = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    rows = [_random_row(rng) for _ in range(n)]
    mask_rows, words = _random_bitmask(rng, n)
    bitmask = (torch.tensor(mask_rows, dtype=torch.int64), words) if mask_rows else None
    allowed = dict(zip(mask_rows, _allowed_sets(words), strict=True))
    processed, no_token = _processed_logits(raw, rows, bitmask, {})
    assert not no_token.any()
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    probs = dict(zip(sampled, _filtered_probs(processed[sampled], [rows[i].params for i in sampled]), strict=True))
    out = Sampler().sample(raw, rows, bitmask)
    for i, row in enumerate(rows):
        ref = _ref_processed(raw[i].double().tolist(), row, allowed.get(i))
        torch.testing.assert_close(processed[i].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5,
                                   rtol=1e-5)
        if row.params.greedy:
            assert int(out.tokens[i]) == max(range(VOCAB), key=lambda t: ref[t])
        else:
            ref_probs = _ref_probs(ref, row.params)
            expected = torch.tensor(ref_probs, dtype=torch.float64)
            torch.testing.assert_close(probs[i].double(), expected, atol=1e-5, rtol=0)
            assert ref_probs[int(out.tokens[i])] > 0


def test_filtered_probs_of_the_batch_equal_each_row_alone():
    """The batched top-k/top-p over sampled rows with mixed penalties equals the per-row computation."""
    rng = random.Random(11)
    rows = [SampleRow(SamplingParams(temperature=0.8, top_k=rng.choice([0, 7]), top_p=rng.choice([1.0, 0.7]),
                                     repetition_penalty=1.2, presence_penalty=0.5), None, (),
                      [rng.randrange(VOCAB) for _ in range(5)], [rng.randrange(VOCAB) for _ in range(5)])
            for _ in range(8)]
    raw = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(3))
    processed, _ = _processed_logits(raw, rows, None, {})
    batch = _filtered_probs(processed, [r.params for r in rows])
    for i, row in enumerate(rows):
        alone, _ = _processed_logits(raw[i : i + 1], [row], None, {})
        torch.testing.assert_close(batch[i], _filtered_probs(alone, [row.params])[0], atol=1e-6, rtol=0)


# --- hand-computed semantics ---------------------------------------------------------------------------


def test_repetition_penalty_is_vllms_on_prompt_and_output():
    raw = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0, 1.0]])
    row = SampleRow(SamplingParams(temperature=0.0, repetition_penalty=2.0), None, (), [0, 1], [1, 4])
    processed, _ = _processed_logits(raw, [row], None, {})
    # seen {0, 1, 4}: 2 → 1, -2 → -4, 0 → 0 (multiplied); unseen 2, 3, 5 untouched.
    assert processed[0].tolist() == [1.0, -4.0, 2.0, -2.0, 0.0, 1.0]
    # Ids the logits have no column for (a prompt from a larger tokenizer) are ignored; nothing seen: no change.
    odd = SampleRow(SamplingParams(repetition_penalty=2.0, presence_penalty=1.0), None, (), [-1, 6, 99], [])
    assert torch.equal(_processed_logits(raw, [odd], None, {})[0], raw)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    raw = torch.zeros(1, 5)
    row = SampleRow(SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), None, (), [3, 3, 3], [1, 1, 2, 1])
    processed, _ = _processed_logits(raw, [row], None, {})
    assert processed[0].tolist() == [0.0, -(0.5 * 3 + 1.0), -(0.5 * 1 + 1.0), 0.0, 0.0]
    negative = SampleRow(SamplingParams(frequency_penalty=-1.0), None, (), [], [4, 4])
    assert _processed_logits(raw, [negative], None, {})[0][0].tolist() == [0.0, 0.0, 0.0, 0.0, 2.0]


def test_penalties_and_bias_apply_to_greedy_rows():
    raw = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    sampler = Sampler()

    def pick(**kwargs: object) -> int:
        output = kwargs.pop("output", [])
        row = SampleRow(SamplingParams(temperature=0.0, **kwargs), None, (), [], output)
        return int(sampler.sample(raw, [row]).tokens)

    assert pick() == 0
    assert pick(presence_penalty=2.0, output=[0]) == 1  # 5 - 2 = 3 < 4
    assert pick(repetition_penalty=2.0, output=[0]) == 1  # 5 / 2 < 4
    assert pick(logit_bias={3: 100}) == 3
    assert pick(logit_bias={0: -100, 1: -100}) == 2


def test_logit_bias_minus_100_bans_and_plus_100_forces_sampled_tokens():
    torch.manual_seed(0)
    raw = torch.randn(200, 10)
    banned = Sampler().sample(raw, [SampleRow(SamplingParams(logit_bias={t: -100 for t in range(5)}))] * 200)
    assert set(banned.tokens.tolist()) <= set(range(5, 10))
    forced = Sampler().sample(raw, [SampleRow(SamplingParams(temperature=0.7, logit_bias={7: 100}))] * 200)
    assert set(forced.tokens.tolist()) == {7}


# --- raw logprobs and top alternatives ---------------------------------------------------------------


def test_logprobs_and_top_k_are_the_raw_distribution_whatever_the_row_does():
    rng = random.Random(4)
    n = 7
    raw = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(4)) * 4
    rows = [_random_row(rng) for _ in range(n)]
    rows[2] = SampleRow(SamplingParams(logprobs=5, temperature=0.3, repetition_penalty=3.0,
                                       logit_bias={9: 50}), (1), (), [1, 2], [3])
    out = Sampler().sample(raw, rows)
    expected = torch.log_softmax(raw, dim=-1)
    torch.testing.assert_close(out.logprobs, expected.gather(1, out.tokens[:, None])[:, 0], atol=1e-5, rtol=0)
    assert out.top_ids.shape == (n, 5) and out.top_ids.dtype == torch.int64
    assert out.top_logprobs.dtype == out.logprobs.dtype == torch.float32
    top_values, top_ids = expected.topk(5, dim=-1)
    assert torch.equal(out.top_ids, top_ids)
    torch.testing.assert_close(out.top_logprobs, top_values, atol=1e-5, rtol=0)


def test_logprobs_of_half_precision_logits_are_computed_in_fp32():
    raw = torch.randn(3, VOCAB).to(torch.bfloat16)
    out = Sampler().sample(raw, [SampleRow(SamplingParams(temperature=0.0, logprobs=2))] * 3)
    expected = torch.log_softmax(raw.float(), dim=-1)
    torch.testing.assert_close(out.logprobs, expected.max(dim=-1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.top_logprobs, expected.topk(2).values, atol=1e-5, rtol=0)


def test_no_top_alternatives_unless_asked():
    raw = torch.randn(2, VOCAB)
    out = Sampler().sample(raw, [SampleRow(SamplingParams(logprobs=0)), SampleRow(SamplingParams())])
    assert out.top_ids is None and out.top_logprobs is None
    assert out.logprobs.shape == (2,) and out.no_token.tolist() == [False, False] and out.errors == {}


# --- the grammar bitmask -----------------------------------------------------------------------------


def test_bitmask_rows_only_ever_pick_allowed_tokens():
    rng = random.Random(9)
    sampler = Sampler()
    for step in range(25):
        n = 6
        raw = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(step)) * 2
        params = [SamplingParams(temperature=rng.choice([0.0, 1.0, 2.0]), top_p=rng.choice([1.0, 0.8]))
                  for _ in range(n)]
        rows = [SampleRow(p, (step * 10 + i)) for i, p in enumerate(params)]
        mask_rows, words = _random_bitmask(rng, n, density=0.1)
        out = sampler.sample(raw, rows, (torch.tensor(mask_rows, dtype=torch.int64), words))
        for r, allowed in zip(mask_rows, _allowed_sets(words), strict=True):
            assert int(out.tokens[r]) in allowed
            if params[r].greedy:
                assert int(out.tokens[r]) == max(allowed, key=lambda t: float(raw[r, t]))
        for r in set(range(n)) - set(mask_rows):
            if params[r].greedy:
                assert int(out.tokens[r]) == int(raw[r].argmax())
        assert not out.no_token.any()


def test_bitmask_bit_layout_last_partial_word_and_sign_bit():
    raw = torch.zeros(3, VOCAB)
    raw[:, 0] = 10.0  # the unmasked favourite
    words = torch.zeros(3, 3, dtype=torch.int32)
    words[0, 0] = -(2**31)  # bit 31 of word 0 only: token 31
    words[1, 2] = 1 << 5  # token 69, the last one in the vocabulary
    words[2, 1] = 1 << 0  # token 32
    rows = [SampleRow(SamplingParams(temperature=0.0)) for _ in range(3)]
    out = Sampler().sample(raw, rows, (torch.tensor([0, 1, 2]), words))
    assert out.tokens.tolist() == [31, 69, 32]
    # Bits past the vocabulary never make a token allowed; a mask narrower than the vocabulary disallows the
    # tokens it has no bit for.
    beyond = torch.tensor([[1 << 6 | 1 << 5, 0, 0]], dtype=torch.int32)  # bits 5 and 6 of word 0
    beyond[0, 2] = 1 << 7  # token 71 > V
    assert int(Sampler().sample(raw[:1], rows[:1], (torch.tensor([0]), beyond)).tokens) in (5, 6)
    narrow = torch.tensor([[0, 1 << 3]], dtype=torch.int32)  # words for tokens 0..63 only: token 35
    assert int(Sampler().sample(raw[:1], rows[:1], (torch.tensor([0]), narrow)).tokens) == 35


def test_a_mask_that_allows_nothing_fails_its_row_alone():
    raw = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2))
    rows = [SampleRow(SamplingParams(temperature=1.0), (i), (0,)) for i in range(3)]
    rows[2] = SampleRow(SamplingParams(temperature=1.0, min_tokens=2), (2), (0,))
    words = torch.zeros(3, 3, dtype=torch.int32)
    words[1, 0] = 1 << 4
    words[2, 0] = 1  # only EOS (0), but min_tokens bans it: nothing left
    out = Sampler().sample(raw, rows, (torch.tensor([0, 1, 2]), words))
    assert out.no_token.tolist() == [True, False, True]
    assert int(out.tokens[1]) == 4
    assert torch.isfinite(out.logprobs).all()


def test_bitmask_row_extracts_one_rows_mask():
    words = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    rows, one = bitmask_row((torch.tensor([4, 1]), words), 1)
    assert rows.tolist() == [0] and one.tolist() == [[3, 4, 5]]
    assert bitmask_row((torch.tensor([4, 1]), words), 2) is None and bitmask_row(None, 0) is None


def test_malformed_bitmask_is_a_clear_error():
    with pytest.raises(ValueError, match="bitmask"):
        Sampler().sample(torch.zeros(1, VOCAB), [SampleRow(SamplingParams())],
                         (torch.tensor([0]), torch.zeros(1, 3, dtype=torch.int64)))


# --- per-row isolation ---------------------------------------------------------------------------------


def _isolation_rows(step: int, gens: list[int]) -> list[SampleRow]:
    """One row per feature, each seeded; outputs grow with the step so penalties keep changing."""
    out = [(step * 7 + k) % VOCAB for k in range(step)]
    return [
        SampleRow(SamplingParams(temperature=0.9, seed=1), gens[0], (0,), [1, 2, 3], out),
        SampleRow(SamplingParams(temperature=0.9, repetition_penalty=1.8, seed=2), gens[1], (0,), [1, 2, 3], out),
        SampleRow(SamplingParams(temperature=0.9, frequency_penalty=1.0, presence_penalty=-0.5, seed=3), gens[2],
                  (0,), [], out),
        SampleRow(SamplingParams(temperature=0.9, logit_bias={5: 3.0, 6: -3.0}, top_k=10, seed=4), gens[3],
                  (0,), [], out),
        SampleRow(SamplingParams(temperature=0.9, max_tokens=200, min_tokens=100, top_p=0.8, seed=5), gens[4],
                  (0,), [], out),
        SampleRow(SamplingParams(temperature=0.0, repetition_penalty=3.0, logprobs=4), None, (0,), [9], out),
        SampleRow(SamplingParams(temperature=0.9, seed=7, logit_bias={VOCAB + 3: 1.0}), gens[6], (0,), [], out),
        SampleRow(SamplingParams(temperature=1.2, seed=8), gens[7], (0,), [], out),  # under a grammar
    ]


def test_each_parameter_affects_only_its_own_row():
    words = torch.tensor([[0b1011_0110, 0, 1 << 3]], dtype=torch.int32)  # tokens 1, 2, 4, 5, 7, 67
    bitmask = (torch.tensor([7]), words)
    batch_gens = [(100 + i) for i in range(8)]
    alone_gens = [(100 + i) for i in range(8)]
    plain_gens = [(100 + i) for i in range(8)]
    sampler = Sampler()
    differs = [False] * 8
    for step in range(30):
        raw = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(step))
        batch = sampler.sample(raw, _isolation_rows(step, batch_gens), bitmask)
        assert batch.errors == {6: f"logit_bias token id {VOCAB + 3} is out of range for this model's vocabulary "
                                   f"of {VOCAB} tokens"}
        for i, row in enumerate(_isolation_rows(step, alone_gens)):
            alone = sampler.sample(raw[i : i + 1], [row], bitmask_row(bitmask, i))
            assert int(alone.tokens) == int(batch.tokens[i]), (step, i)
            assert float(alone.logprobs) == pytest.approx(float(batch.logprobs[i]), abs=1e-6)
        # Control: the same seeds without the row's feature give different tokens somewhere.
        plain = [SampleRow(SamplingParams(temperature=r.params.temperature), plain_gens[i], (0,),
                           output_ids=r.output_ids)  # the same output position: the same uniform
                 for i, r in enumerate(_isolation_rows(step, batch_gens))]
        plain_tokens = sampler.sample(raw, plain).tokens
        differs = [d or int(a) != int(b) for d, a, b in zip(differs, batch.tokens, plain_tokens, strict=True)]
    assert differs[:6] == [False, True, True, True, True, True] and differs[7]


def test_out_of_vocab_logit_bias_is_reported_per_row_and_by_check_vocab():
    with pytest.raises(ValueError, match=f"logit_bias token id {VOCAB} .* vocabulary of {VOCAB} tokens"):
        check_vocab(SamplingParams(logit_bias={VOCAB: 1.0}), VOCAB)
    check_vocab(SamplingParams(logit_bias={VOCAB - 1: 1.0}), VOCAB)


# --- cost and hygiene ----------------------------------------------------------------------------------


def test_a_batch_without_features_does_no_vocab_sized_work(monkeypatch):
    raw = torch.randn(4, VOCAB)
    rows = [SampleRow(SamplingParams(temperature=0.0, min_tokens=1), None, (0,), [1, 2], [3]),
            SampleRow(SamplingParams(top_k=5, logprobs=0), (0), (0,), [1], [])]
    rows += [SampleRow(SamplingParams()) for _ in range(2)]
    processed, no_token = _processed_logits(raw, rows, None, {})
    assert processed is raw and no_token.shape == (4,)
    calls = []
    for name in ("_add_logit_bias", "_apply_bitmask", "_apply_repetition_penalty", "_apply_frequency_presence"):
        monkeypatch.setattr(sampler_module, name, lambda *a, _n=name: calls.append(_n))
    Sampler().sample(raw, rows)
    assert calls == []


def test_sampler_never_modifies_caller_logits_with_every_feature_on():
    raw = torch.randn(3, VOCAB)
    before = raw.clone()
    rows = [SampleRow(SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, logit_bias={1: 5.0},
                                     min_tokens=3, logprobs=3), None, (0,), [1, 2], [2]) for _ in range(3)]
    Sampler().sample(raw, rows, (torch.tensor([1]), torch.full((1, 3), -1, dtype=torch.int32)))
    assert torch.equal(raw, before)


def test_incremental_token_counts_equal_recounting_the_lists():
    """The engine's TokenCounts (opened once, one accumulate per step) give the penalties the same numbers as
    counting each row's prompt and output lists (the plain twin), step after step, rows closed and reused."""
    from loraplex.server.engine.sampler import TokenCounts

    rng = random.Random(11)
    counts = TokenCounts(VOCAB, "cpu")
    rows = [_random_row(rng) for _ in range(9)]
    for row in rows:
        row.counts_row = counts.open(row.prompt_ids, row.output_ids)
    for step in range(6):
        raw = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(step)) * 3
        plain = [SampleRow(r.params, r.seed, r.eos_token_ids, r.prompt_ids, r.output_ids) for r in rows]
        incremental, _ = _processed_logits(raw, rows, None, {}, counts)
        recounted, _ = _processed_logits(raw, plain, None, {})
        torch.testing.assert_close(incremental, recounted, atol=0, rtol=0)
        tokens = torch.randint(0, VOCAB, (len(rows),), generator=torch.Generator().manual_seed(100 + step))
        counts.record(torch.tensor([r.counts_row for r in rows]), tokens)
        for row, token in zip(rows, tokens.tolist(), strict=True):
            row.output_ids.append(token)
        counts.close(rows[step].counts_row)  # one request ends, a new one takes its row
        rows[step] = _random_row(rng)
        rows[step].counts_row = counts.open(rows[step].prompt_ids, rows[step].output_ids)
