"""Structured output (engine side): specs, compile cache, bitmask layout, accept/terminate, random outputs under
the mask valid for their grammar. The tiny tokenizer (vocab 512, ids 0-2 special: EOS, <|im_start|>, <|im_end|>)."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from loraplex.server.engine.guided import (
    MAX_CHOICE_CHARS,
    MAX_CHOICES,
    MAX_SPEC_BYTES,
    GuidedCompiler,
    GuidedError,
    GuidedSpec,
    GuidedState,
    apply_bitmask,
    fill_bitmasks,
    unpack_bitmask,
)

EOS, IM_START, IM_END = 0, 1, 2
PADDED = 600  # a model whose logits are wider than the tokenizer (512) and not a multiple of 32

FLAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer"},
        "active": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "active", "color"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
                 "additionalProperties": False},
        "items": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": {"type": "object", "properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 9},
                                                             "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"}},
                            "required": ["qty", "code"], "additionalProperties": False}},
        "score": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]},
    },
    "required": ["user", "items", "score"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,5}( [A-Z][a-z]{1,6})?"
CHOICES = ("positive", "negative", "neutral", "mixed feelings")


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GuidedCompiler:
    return GuidedCompiler(tokenizer, PADDED, eos_token_ids=(EOS,))


def allowed_ids(bitmask_row: torch.Tensor, vocab_size: int = PADDED) -> set[int]:
    return set(torch.nonzero(unpack_bitmask(bitmask_row.view(1, -1), vocab_size)[0]).flatten().tolist())


def walk(state: GuidedState, tokenizer, text: str) -> None:
    for token in tokenizer.encode(text, add_special_tokens=False):
        assert state.accept(token), (text, tokenizer.decode([token]), state.error)


def generate(state: GuidedState, tokenizer, gen: torch.Generator, max_new: int = 200) -> str | None:
    """Random logits under the mask, as the engine would run it: the text once EOS is sampled or the grammar
    terminates, None when it ran out of tokens. Closers get a bias so random walks end."""
    closers = torch.tensor([any(c in tokenizer.decode([t]) for c in '"}]') for t in range(len(tokenizer))])
    bias = torch.zeros(PADDED)
    bias[: len(tokenizer)][closers] = 4.0
    bias[EOS] = 4.0
    ids: list[int] = []
    for _ in range(max_new):
        mask = fill_bitmasks([state], PADDED)
        logits = apply_bitmask((torch.randn(1, PADDED, generator=gen) * 2 + bias), mask, [0])
        token = int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=gen))
        assert token < len(tokenizer), "a padding id was sampled"
        assert state.accept(token), state.error
        if token == EOS:
            return tokenizer.decode(ids)
        ids.append(token)
        if state.terminated:
            return tokenizer.decode(ids)
    return None


# ---- random outputs are valid ------------------------------------------------------------------------------
def _outputs(compiler, tokenizer, spec: GuidedSpec, n: int = 12) -> list[str]:
    """`n` seeded random outputs under `spec`; every one must end (EOS or the grammar's end) within 400 tokens:
    one that did not would be an output nobody checked."""
    compiled = compiler.compile(spec)
    gen = torch.Generator().manual_seed(0)
    outs = [generate(compiled.new_state(), tokenizer, gen, max_new=400) for _ in range(n)]
    assert None not in outs, f"{outs.count(None)}/{n} random outputs did not end within 400 tokens"
    return outs


@pytest.mark.parametrize("schema", [FLAT, NESTED], ids=["flat", "nested"])
def test_json_schema_outputs_validate(compiler, tokenizer, schema):
    for text in _outputs(compiler, tokenizer, GuidedSpec.json_schema(schema)):
        jsonschema.validate(json.loads(text), schema)


def test_json_object_outputs_are_objects(compiler, tokenizer):
    for text in _outputs(compiler, tokenizer, GuidedSpec.json_object()):
        assert isinstance(json.loads(text), dict), text


def test_regex_outputs_match(compiler, tokenizer):
    for text in _outputs(compiler, tokenizer, GuidedSpec.regex(REGEX)):
        assert re.fullmatch(REGEX, text), text


def test_choice_outputs_are_a_choice(compiler, tokenizer):
    texts = _outputs(compiler, tokenizer, GuidedSpec.choice(CHOICES), n=20)
    assert set(texts) <= set(CHOICES)
    assert len(set(texts)) > 1  # the mask leaves the choice to the logits


def test_choice_with_quotes_backslashes_and_control_characters(compiler, tokenizer):
    odd = ('say "hi"', "back\\slash", "tab\tnew\nline", "ünï")
    compiled = compiler.compile(GuidedSpec.choice(odd))
    for option in odd:
        state = compiled.new_state()
        walk(state, tokenizer, option)
        assert state.can_end


# ---- bitmask layout -------------------------------------------------------------------------------------------
def test_bitmask_matches_the_library_view_step_by_step(compiler, tokenizer):
    """Row bits == llguidance's own one-byte-per-token view (compute_logit_bias), at every step of a walk."""
    state = compiler.compile(GuidedSpec.json_schema(FLAT)).new_state()
    text = '{"name": "Ada", "age": 36, "active": true, "color": "red"}'
    for token in tokenizer.encode(text, add_special_tokens=False)[:12]:
        row = fill_bitmasks([state], PADDED)[0]
        bias = torch.frombuffer(bytearray(state._matcher.compute_logit_bias()), dtype=torch.uint8)
        assert allowed_ids(row) == set(torch.nonzero(bias).flatten().tolist())
        assert token in allowed_ids(row)
        assert state.accept(token)


@pytest.mark.parametrize("parallel", [False, True], ids=["loop", "pool"])
def test_batched_fill_equals_the_library_view(compiler, tokenizer, parallel):
    """Each row of a batched fill (one thread or the pool) allows exactly the tokens llguidance's own one-byte-
    per-token view allows (compute_logit_bias): an oracle independent of our bit packing."""
    states = [compiler.compile(GuidedSpec.json_schema(s)).new_state() for s in (FLAT, NESTED)]
    states.append(compiler.compile(GuidedSpec.regex(REGEX)).new_state())
    walk(states[0], tokenizer, '{"name": "A')
    walk(states[2], tokenizer, "12")
    batch = fill_bitmasks(states, PADDED, parallel=parallel)
    assert batch.shape == (3, (PADDED + 31) // 32) and batch.dtype == torch.int32
    for i, state in enumerate(states):
        library = torch.frombuffer(bytearray(state._matcher.compute_logit_bias()), dtype=torch.uint8)
        assert allowed_ids(batch[i]) == set(torch.nonzero(library).flatten().tolist())
        assert allowed_ids(batch[i])


def test_padding_and_special_ids_are_never_allowed(compiler, tokenizer):
    """vocab_size 600 > 512 tokens: ids 512..599 (and bits past 600 in the last word) stay 0, as do the
    non-EOS special tokens, at every step of random generation."""
    state = compiler.compile(GuidedSpec.json_object()).new_state()
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        row = fill_bitmasks([state], PADDED)[0]
        bits = ((row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(-1)  # [W * 32]
        assert int(bits[len(tokenizer):].sum()) == 0
        assert not bits[IM_START] and not bits[IM_END]
        choices = torch.tensor(sorted(allowed_ids(row)))
        token = int(choices[torch.randint(len(choices), (1,), generator=gen)])
        assert state.accept(token)
        if token == EOS or state.terminated:
            break


def test_narrow_logits_get_their_own_width(tokenizer):
    """A model whose logits are narrower than the tokenizer (500 < 512): rows are ceil(500 / 32) words."""
    narrow = GuidedCompiler(tokenizer, 500)
    state = narrow.compile(GuidedSpec.json_object()).new_state()
    row = fill_bitmasks([state], 500)
    assert row.shape == (1, 16)
    assert allowed_ids(row[0], 500) and max(allowed_ids(row[0], 500)) < 500


def test_apply_bitmask_masks_only_its_rows(compiler):
    state = compiler.compile(GuidedSpec.choice(CHOICES)).new_state()
    mask = fill_bitmasks([state], PADDED)
    logits = torch.randn(3, PADDED)
    before = logits.clone()
    out = apply_bitmask(logits, mask, torch.tensor([1]))
    assert torch.equal(logits, before)  # out of place
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    finite = set(torch.nonzero(torch.isfinite(out[1])).flatten().tolist())
    assert finite == allowed_ids(mask[0])
    assert torch.equal(out[1][sorted(finite)], logits[1][sorted(finite)])


def test_fill_refuses_a_bad_buffer(compiler):
    state = compiler.compile(GuidedSpec.json_object()).new_state()
    words = (PADDED + 31) // 32
    for bad in (torch.zeros(words, dtype=torch.int64), torch.zeros(words + 1, dtype=torch.int32),
                torch.zeros(2 * words, dtype=torch.int32)[::2]):
        with pytest.raises(ValueError, match="bitmask"):
            state.fill(bad)
    with pytest.raises(ValueError, match="vocab"):
        fill_bitmasks([state], 512)


# ---- accept, terminate, fork --------------------------------------------------------------------------------------
def test_accept_refuses_a_token_outside_the_grammar(compiler, tokenizer):
    state = compiler.compile(GuidedSpec.json_schema(FLAT)).new_state()
    walk(state, tokenizer, '{"name": ')
    assert not state.accept(tokenizer.encode("7", add_special_tokens=False)[0])  # name is a string
    assert state.error and not state.terminated
    assert not compiler.compile(GuidedSpec.json_object()).new_state().accept(EOS)  # nothing yet: EOS is early


def test_terminated_after_a_complete_object_and_only_eos_allowed(compiler, tokenizer):
    state = compiler.compile(GuidedSpec.json_schema(FLAT)).new_state()
    walk(state, tokenizer, '{"name": "Bob", "age": 7, "active": false, "color": "blue"')
    assert not state.terminated and not state.can_end
    assert EOS not in allowed_ids(fill_bitmasks([state], PADDED)[0])
    walk(state, tokenizer, "}")
    assert state.terminated and state.can_end
    assert allowed_ids(fill_bitmasks([state], PADDED)[0]) == {EOS}
    assert state.accept(EOS) and state.terminated and state.error is None


def test_eos_allowed_while_the_output_may_still_grow(compiler, tokenizer):
    state = compiler.compile(GuidedSpec.choice(("yes", "yes sir"))).new_state()
    walk(state, tokenizer, "yes")
    assert state.can_end and not state.terminated
    assert EOS in allowed_ids(fill_bitmasks([state], PADDED)[0])


def test_every_eos_id_is_allowed_at_the_end(tokenizer):
    two_eos = GuidedCompiler(tokenizer, 512, eos_token_ids=(EOS, IM_END))
    state = two_eos.compile(GuidedSpec.regex("ok")).new_state()
    walk(state, tokenizer, "ok")
    assert allowed_ids(fill_bitmasks([state], 512)[0], 512) == {EOS, IM_END}
    assert state.accept(IM_END)


def test_copy_forks_an_independent_state(compiler, tokenizer):
    state = compiler.compile(GuidedSpec.choice(CHOICES)).new_state()
    walk(state, tokenizer, "ne")
    fork = state.copy()
    walk(state, tokenizer, "gative")
    walk(fork, tokenizer, "utral")
    assert state.terminated and fork.terminated


# ---- specs and errors -----------------------------------------------------------------------------------------------
def test_spec_is_canonical_and_hashable():
    a = GuidedSpec.json_schema({"type": "object", "properties": {"b": {}, "a": {}}})
    b = GuidedSpec.json_schema('{ "type": "object",\n "properties": {"b": {}, "a": {}} }')
    assert a == b and hash(a) == hash(b)
    assert a.value == '{"type":"object","properties":{"b":{},"a":{}}}'  # key order kept: it is output order
    assert GuidedSpec.choice(["x", "y", "x"]).value == ("x", "y")
    assert GuidedSpec.json_object() == GuidedSpec("json_object", None)


@pytest.mark.parametrize(("make", "field"), [
    (lambda: GuidedSpec.json_schema([1, 2]), "response_format.json_schema.schema"),
    (lambda: GuidedSpec.json_schema("{not json"), "response_format.json_schema.schema"),
    (lambda: GuidedSpec.json_schema({"x": float("nan")}), "response_format.json_schema.schema"),
    (lambda: GuidedSpec.json_schema({"description": "x" * MAX_SPEC_BYTES}), "response_format.json_schema.schema"),
    (lambda: GuidedSpec.regex(""), "guided_regex"),
    (lambda: GuidedSpec.regex("a" * (MAX_SPEC_BYTES + 1)), "guided_regex"),
    (lambda: GuidedSpec.choice([]), "guided_choice"),
    (lambda: GuidedSpec.choice("yes"), "guided_choice"),
    (lambda: GuidedSpec.choice(["ok", ""]), "guided_choice"),
    (lambda: GuidedSpec.choice(["ok", 3]), "guided_choice"),
    (lambda: GuidedSpec.choice(["x" * (MAX_CHOICE_CHARS + 1)]), "guided_choice"),
    (lambda: GuidedSpec.choice([str(i) for i in range(MAX_CHOICES + 1)]), "guided_choice"),
])
def test_bad_specs_raise_naming_the_field(make, field):
    with pytest.raises(GuidedError) as info:
        make()
    assert info.value.field == field and str(info.value) == f"{field}: {info.value.reason}"


@pytest.mark.parametrize(("spec", "field", "reason"), [
    (GuidedSpec.json_schema({"type": "foo"}), "response_format.json_schema.schema", "foo"),
    (GuidedSpec.json_schema({"type": "array", "uniqueItems": True}), "response_format.json_schema.schema",
     "uniqueItems"),
    (GuidedSpec.json_schema({"type": "string", "pattern": "a(b"}), "response_format.json_schema.schema", "unclosed"),
    (GuidedSpec.regex("a(b"), "guided_regex", "unclosed group"),
    (GuidedSpec.regex(r"(a)\1"), "guided_regex", "backreferences"),
])
def test_specs_the_library_rejects_raise_naming_the_field(compiler, spec, field, reason):
    with pytest.raises(GuidedError, match=re.escape(reason)) as info:
        compiler.compile(spec)
    assert info.value.field == field
    assert "<" not in str(info.value) and "\n" not in str(info.value)  # the reason, not a parser dump


# ---- the cache ---------------------------------------------------------------------------------------------------
def test_cache_hit_returns_the_same_compiled_grammar(compiler):
    first = compiler.compile(GuidedSpec.json_schema(FLAT))
    assert compiler.compile(GuidedSpec.json_schema(json.dumps(FLAT, indent=2))) is first
    assert compiler.compile(GuidedSpec.regex(REGEX)) is not first


def test_cache_evicts_the_least_recently_used(tokenizer):
    small = GuidedCompiler(tokenizer, 512, cache_size=2)  # json_object is compiled (cached) at startup
    a, b = small.compile(GuidedSpec.regex("a+")), small.compile(GuidedSpec.regex("b+"))
    assert small.compile(GuidedSpec.regex("a+")) is a  # a is now the most recent
    small.compile(GuidedSpec.regex("c+"))  # evicts b
    assert small.cached() == 2
    assert small.compile(GuidedSpec.regex("a+")) is a
    assert small.compile(GuidedSpec.regex("b+")) is not b


def test_concurrent_compiles_share_one_result_usable_on_another_thread(tokenizer):
    fresh = GuidedCompiler(tokenizer, 512)
    spec = GuidedSpec.json_schema(NESTED)
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(fresh.compile(spec))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r is results[0] for r in results)
    state = results[0].new_state()  # compiled on a worker thread, stepped here (the engine thread)
    walk(state, tokenizer, '{"user": {"id": 1}, "items": [{"qty": 2, "code": "AB1"}], "score": null}')
    assert state.terminated


def test_a_rejected_spec_is_rejected_again(compiler):
    spec = GuidedSpec.regex("x(")
    for _ in range(2):
        with pytest.raises(GuidedError):
            compiler.compile(spec)
