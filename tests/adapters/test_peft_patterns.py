"""rank_pattern / alpha_pattern / target_modules regexes: PEFT's semantics exactly, in linear time (issue 20 item 1).

PEFT matches these with Python's `re`, which backtracks: `(?:[\\w.]?){22}[\\w.]{22}!` took seconds per module name
while holding the GIL (the whole server stalled). We match with RE2; these tests pin that the answers are PEFT's
own (`peft.utils.other.get_pattern_key`, `match_target_against_key`) on random configs, that hostile patterns cost
microseconds, and that what RE2 cannot do in linear time is refused with a 400 naming the field.
"""

from __future__ import annotations

import random
import time

import pytest
from peft.utils.other import get_pattern_key, match_target_against_key

from loraplex.adapters.errors import AdapterValidationError
from loraplex.adapters.peft_config import MAX_PATTERNS, PatternKeys, parse_adapter_config

EVIL = r"(?:[\w.]?){22}[\w.]{22}!"  # Python's re: seconds per name, tripling with each +2
NAMES = [f"model.layers.{layer}.{module}" for layer in range(24) for module in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")]
POOL = [r"q_proj", r"layers\.1\.self_attn\.q_proj", r".*_proj", r"(k|v)_proj", r"self_attn\.o_proj", r"mlp\..*",
        r"layers\.1\d\..*", r"x", r"layers\.[0-4]\.mlp\.up_proj", r"up_proj|down_proj", r"layers.1.self", r"attn",
        r"\d\.mlp\.gate_proj", r"", r".*", r"layers\.(?:2|3)\.self_attn\.(?:q|k)_proj", r"(?i)layers\.5\..*",
        r"model\.layers\.7\.mlp\.down_proj", r"[a-z]+_proj", r"layers\.\d+\.self_attn\.v_proj"]


def config(**fields: object) -> dict:
    return {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]} | fields


def test_rank_and_alpha_patterns_give_peft_s_answer_for_every_name():
    rnd = random.Random(20)
    for _ in range(80):
        keys = list(dict.fromkeys(rnd.sample(POOL, rnd.randint(1, 8))))
        keys = [k for k in keys if not k.startswith("(?i)")]  # PEFT's own re refuses it inside (.*\.)?(...)$
        ranks = {k: rnd.randint(1, 16) for k in keys}
        spec = parse_adapter_config(config(rank_pattern=ranks, alpha_pattern={k: 2.0 * v for k, v in ranks.items()}))
        for name in NAMES:
            key = get_pattern_key(list(ranks), name)  # PEFT: the name itself when no key matches
            assert spec.rank_for(name) == ranks.get(key, 8), (keys, name)
            assert spec.alpha_for(name) == (2.0 * ranks[key] if key in ranks else 16)


@pytest.mark.parametrize("target", [r".*\.(q|v)_proj", r"model\.layers\.[0-3]\.self_attn\..*", r"q_proj",
                                    r".*layers\.1\d\.mlp\.(up|down)_proj", r"(?i).*MLP.*"])
def test_a_string_target_modules_is_peft_s_fullmatch(target):
    spec = parse_adapter_config(config(target_modules=target))
    assert [spec.targets(n) for n in NAMES] == [match_target_against_key(target, n) is not None for n in NAMES]


def test_a_target_list_selects_a_name_by_equality_or_dotted_suffix_as_peft_does():
    spec = parse_adapter_config(config(target_modules=["q_proj", "mlp.up_proj", "layers.3.self_attn.v_proj", "proj"]))
    for name in NAMES:
        want = any(name == t or name.endswith(f".{t}") for t in spec.target_modules)
        assert spec.targets(name) == want, name
    assert spec.unmatched_targets(NAMES) == ["proj"]


def test_catastrophic_patterns_cost_microseconds():
    spec = parse_adapter_config(config(rank_pattern={EVIL: 4, "q_proj": 2}, alpha_pattern={EVIL: 1.0}))
    t0 = time.perf_counter()
    ranks = [spec.rank_for(n) for n in NAMES] + [spec.targets(n) for n in NAMES]
    assert time.perf_counter() - t0 < 0.5  # Python's re: ~seconds per name (minutes for the whole model)
    assert ranks[:7] == [2, 8, 8, 8, 8, 8, 8]
    target = parse_adapter_config(config(target_modules=EVIL))
    t0 = time.perf_counter()
    assert target.unmatched_targets(NAMES) == [EVIL]
    assert time.perf_counter() - t0 < 0.5


def test_a_thousand_keys_match_quickly():
    keys = {rf"model\.layers\.{i}\.self_attn\.q_proj": 1 + i % 16 for i in range(1024)}
    spec = parse_adapter_config(config(rank_pattern=keys))
    t0 = time.perf_counter()
    assert [spec.rank_for(f"model.layers.{i}.self_attn.q_proj") for i in range(24)] == [1 + i % 16 for i in range(24)]
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("field, pattern, words", [
    ("rank_pattern", r"(q)\1_proj", "linear time"),
    ("rank_pattern", r"(?=q)q_proj", "linear time"),
    ("alpha_pattern", r"(?<!x)q_proj", "linear time"),
    ("rank_pattern", r"[[:alpha:]]+_proj", "posix"),
    ("rank_pattern", r"(?i)q_proj", "invalid regex"),  # PEFT's re: global flags inside (.*\.)?(...)$
    ("rank_pattern", r"a)|(b", "invalid regex"),
    ("target_modules", r"(.)\1", "linear time"),
])
def test_patterns_beyond_linear_time_or_ambiguous_are_refused_naming_the_field(field, pattern, words):
    raw = config(target_modules=pattern) if field == "target_modules" else config(**{field: {pattern: 4}})
    with pytest.raises(AdapterValidationError) as err:
        parse_adapter_config(raw)
    assert err.value.field == field and words in err.value.message.lower(), err.value.message


def test_error_messages_quote_at_most_a_bounded_prefix_of_a_pattern():
    with pytest.raises(AdapterValidationError) as err:
        parse_adapter_config(config(rank_pattern={"(a)\\1" + "x" * 100_000: 4}))
    assert len(err.value.message) < 400


def test_pattern_counts_are_bounded():
    with pytest.raises(AdapterValidationError, match=str(MAX_PATTERNS)):
        parse_adapter_config(config(rank_pattern={f"k{i}": 1 for i in range(MAX_PATTERNS + 1)}))
    with pytest.raises(AdapterValidationError, match=str(MAX_PATTERNS)):
        parse_adapter_config(config(target_modules=[f"m{i}" for i in range(MAX_PATTERNS + 1)]))


def test_pattern_keys_without_keys_match_nothing():
    assert PatternKeys((), "rank_pattern").first_match("model.layers.0.self_attn.q_proj") is None
