"""Structured output never lies, whatever the tokenizer (issue 19 item 6, issue 20 item 10).

- A byte-level BPE trained on a small ASCII corpus lacks some bytes. llguidance then let through tokens its own
  parser refused ("sampled token 40 breaks the grammar ... forced bytes"), and a grammar that needs a missing byte
  offered only EOS, so the request ended "stop" with an empty or cut output. Now: what the start of the grammar
  already shows is a GuidedError at compile time (the API's 400 before admission), naming what cannot be spelled;
  a dead end met later empties the mask (the engine's "allows no token" error, with `dead_end` saying why).
- A grammar that hits a library limit, or that allows no output (`$ref` cycles), is a GuidedError at compile time
  instead of a mask that offers only EOS.
- Random walks over the mask: every allowed token is accepted by the parser, and EOS is offered only where the
  grammar accepts.
"""

from __future__ import annotations

import random

import pytest
from tiny_models import CORPUS, EOS_TOKEN, SPECIAL_TOKENS
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loraplex.server.engine.guided import GuidedCompiler, GuidedError, GuidedSpec, GuidedState, fill_bitmasks


def _small_bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the tiny corpus *without* the 256-byte initial alphabet: '#', 'X', '\\' ... are
    not in its vocabulary (as in tiny test tokenizers built the usual way)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN)


def _sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """Llama-2 style ('▁' for spaces, the ByteFallback decoder) but trained without byte tokens: characters the
    corpus never showed have no token at all."""
    tok = Tokenizer(models.BPE(byte_fallback=False, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS_TOKEN, "<unk>"], show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, unk_token="<unk>")


def _wordpiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=[EOS_TOKEN, "[UNK]"], show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, unk_token="[UNK]")


@pytest.fixture(scope="module")
def small() -> GuidedCompiler:
    tokenizer = _small_bpe()
    return GuidedCompiler(tokenizer, len(tokenizer), eos_token_ids=[0])


@pytest.fixture(scope="module")
def full(tokenizer) -> GuidedCompiler:
    return GuidedCompiler(tokenizer, 512, eos_token_ids=[0])


def _schema(schema: dict) -> GuidedSpec:
    return GuidedSpec.json_schema(schema)


def _walk(compiler: GuidedCompiler, state: GuidedState, rnd: random.Random, steps: int = 60) -> str:
    """Sample uniformly among allowed tokens; assert the parser takes each one and EOS comes only when complete.
    Returns how the walk ended: "complete", "dead end: ...", or "running"."""
    for _ in range(steps):
        row = fill_bitmasks([state], compiler.vocab_size)[0]
        allowed = [t for t in range(compiler.vocab_size) if (int(row[t // 32]) >> (t % 32)) & 1]
        if not allowed:
            assert state.dead_end, "an empty mask must say why"
            return f"dead end: {state.dead_end}"
        token = rnd.choice(allowed)
        if token == 0:
            assert state.can_end, "EOS offered where the output is incomplete"
            return "complete"
        assert state.accept(token), f"the mask allowed token {token} that the parser refused: {state.error}"
        if state.terminated:
            return "complete"
    return "running"


# ---- issue 19 item 6: a vocabulary without some bytes -----------------------------------------------------
@pytest.mark.parametrize("spec, missing", [
    (_schema({"type": "object", "properties": {"tag": {"enum": ["Xq"]}}, "required": ["tag"]}), "'X'"),
    (_schema({"type": "object", "properties": {"c#x": {"type": "integer"}}, "required": ["c#x"]}), "'#'"),
    (GuidedSpec.regex("J{3}"), "'J'"),
    (GuidedSpec.choice(["#tag"]), "'#'"),
    (_schema({"type": "string", "pattern": "^\\\\$"}), "'\\\\'"),
], ids=["enum", "key", "regex", "choice", "pattern"])
def test_a_forced_start_the_vocabulary_cannot_spell_is_refused_at_compile_time_naming_it(small, spec, missing):
    with pytest.raises(GuidedError) as err:
        small.compile(spec)
    assert err.value.field == spec.field
    assert "vocabulary cannot spell" in err.value.reason and missing in err.value.reason, err.value.reason


def test_a_dead_end_met_mid_output_empties_the_mask_and_says_why(small):
    """The start is fine (a free string); the const after it needs 'X', which no token holds."""
    spec = _schema({"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}, "b": {"const": "X"}},
                    "required": ["a", "b"]})
    compiled = small.compile(spec)
    ends = {_walk(small, compiled.new_state(), random.Random(seed), steps=40).split(":")[0] for seed in range(20)}
    assert ends == {"dead end"}, ends
    state = compiled.new_state()
    for _ in range(40):
        if _walk(small, state, random.Random(0), steps=1) != "running":
            break
    assert "vocabulary cannot spell" in (state.dead_end or "") and "'X'" in state.dead_end


@pytest.mark.parametrize("spec", [
    _schema({"type": "object", "properties": {"name": {"type": "string"}, "t": {"enum": ["ab", "X"]}},
             "required": ["name", "t"]}),
    _schema({"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
             "required": ["n", "ok"]}),
    GuidedSpec.json_object(),
    GuidedSpec.regex("[a-z]{2,5}( [a-z]{2,5})*"),
    GuidedSpec.choice(["c#tag", "cat", "dog"]),
], ids=["schema-enum", "schema-int-bool", "json-object", "regex", "choice"])
@pytest.mark.parametrize("vocab", ["small-bpe", "sentencepiece", "full-bpe"])
def test_every_token_the_mask_allows_is_accepted_for_any_tokenizer(small, full, vocab, spec):
    if vocab == "sentencepiece":
        tokenizer = _sentencepiece_bpe()
        compiler = GuidedCompiler(tokenizer, len(tokenizer), eos_token_ids=[0])
    else:
        compiler = small if vocab == "small-bpe" else full
    try:
        compiled = compiler.compile(spec)
    except GuidedError as exc:  # an honest refusal is fine; a mask that lies is not
        assert "cannot" in exc.reason
        return
    for seed in range(25):
        _walk(compiler, compiled.new_state(), random.Random(seed))


def test_a_tokenizer_the_library_cannot_read_is_refused_when_the_compiler_is_built():
    """WordPiece (BERT style) has no decoder llguidance knows (nor has a Metaspace decoder): the engine then
    serves without structured output and says so (a 400 "unavailable for this model's tokenizer"), rather than
    guessing at masks."""
    tokenizer = _wordpiece()
    with pytest.raises(ValueError, match="decoder"):
        GuidedCompiler(tokenizer, len(tokenizer), eos_token_ids=[0])


# ---- issue 20 item 10: limits and unsatisfiable grammars ---------------------------------------------------
@pytest.mark.parametrize("spec, words", [
    (GuidedSpec.regex("(?:a{1000}){1000}"), "too many"),
    (_schema({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}), "no token can continue"),
    (_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/b"}}, "required": ["a"],
              "$defs": {"b": {"type": "object", "properties": {"c": {"$ref": "#/$defs/b"}}, "required": ["c"]}}}),
     "too many items"),
    (_schema({"type": "array", "items": {"$ref": "#"}, "minItems": 1}), "too many items"),
], ids=["regex-a1000x1000", "ref-self-cycle", "ref-required-cycle", "array-of-itself"])
def test_a_grammar_over_a_limit_or_without_any_output_is_refused_at_compile_time(full, spec, words):
    with pytest.raises(GuidedError) as err:
        full.compile(spec)
    assert words in err.value.reason.lower(), err.value.reason
    with pytest.raises(GuidedError):  # refusals are cached, and still raised
        full.compile(spec)


def test_eos_is_never_offered_before_the_grammar_accepts(full):
    compiled = full.compile(GuidedSpec.regex("abc"))
    state = compiled.new_state()
    row = fill_bitmasks([state], full.vocab_size)[0]
    assert not int(row[0]) & 1  # EOS (id 0) not allowed at the start of "abc"
