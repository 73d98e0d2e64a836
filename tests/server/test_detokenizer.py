"""IncrementalDetokenizer: streamed deltas are whole characters and add up to the tokenizer's decode."""

from __future__ import annotations

import random

import pytest
from tiny_models import EOS_ID, train_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from loraplex.server.engine.detokenizer import IncrementalDetokenizer

TEXT = "café naïve 日本語 🎉 — the quick brown fox 🦊 says héllo to 世界! Grüße, Привет. 👍🏽 done"


@pytest.fixture(scope="module")
def tokenizer():
    # Byte-level BPE trained here with `tokenizers` on text full of multi-byte characters (the project's
    # tiny-model tokenizer: its corpus holds accents, CJK, Cyrillic and emoji), wrapped by transformers.
    return train_tokenizer(vocab_size=512)


def _stream(detok: IncrementalDetokenizer, ids: list[int], chunk_sizes: list[int]) -> list[str]:
    deltas, pos = [], 0
    for size in chunk_sizes:
        deltas.append(detok.push(ids[pos : pos + size]))
        pos += size
    deltas.append(detok.flush())
    return deltas


def test_streams_text_with_multibyte_chars_split_across_tokens(tokenizer):
    ids = tokenizer.encode(TEXT)
    # The premise: some tokens are partial characters on their own.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hello:"), skip_special_tokens=True)
    deltas = _stream(detok, ids, [1] * len(ids))
    assert "".join(deltas) == TEXT == detok.text
    assert all("\ufffd" not in d for d in deltas)  # never a broken fragment mid-stream
    assert deltas[-1] == ""  # nothing was left held: the text ends on a whole character


def test_keeps_leading_spaces_of_words(tokenizer):
    prompt = tokenizer.encode("The weather today")
    ids = tokenizer.encode(" is cloudy with a chance of rain")
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
    deltas = _stream(detok, ids, [1] * len(ids))
    assert "".join(deltas) == " is cloudy with a chance of rain"
    assert [d for d in deltas if d.strip() == "is"] == [" is"]


def test_partial_character_at_the_end_is_released_by_flush(tokenizer):
    ids = tokenizer.encode("ok 🎉")
    cut = next(n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    partial = ids[:cut]  # generation stopped (max_tokens) in the middle of the emoji
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    assert "".join(detok.push([i]) for i in partial) == "ok "
    assert detok.flush() == tokenizer.decode(partial)[len("ok ") :]
    assert detok.text == tokenizer.decode(partial)
    assert detok.flush() == ""  # idempotent


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_follow_skip_special_tokens(tokenizer, skip_special_tokens):
    ids = [*tokenizer.encode("Paris"), EOS_ID, *tokenizer.encode(" café")]
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Capital:"), skip_special_tokens)
    text = "".join(_stream(detok, ids, [1] * len(ids)))
    assert text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert ("<|endoftext|>" in text) is not skip_special_tokens


@pytest.mark.parametrize("seed", range(6))
def test_random_sequences_concatenate_to_decode(tokenizer, seed):
    """Property: for random ids (random bytes, broken UTF-8 included) in random chunks, with or without
    a prompt, the concatenated deltas equal `decode(all_output_ids)`, and no delta ends inside a
    character that later tokens complete."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    prompts = [[], tokenizer.encode("日本語 prompt 🎉"), tokenizer.encode("x")]
    for trial in range(25):
        skip = trial % 2 == 0
        # Mostly real text pieces (so multi-byte merges occur), sometimes arbitrary ids (special included).
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        if trial % 3:
            ids = tokenizer.encode(rng.choice([TEXT, TEXT[::-1], TEXT.upper()]))[: rng.randint(1, 60)]
        chunks = _random_chunks(rng, len(ids))
        detok = IncrementalDetokenizer(tokenizer, rng.choice(prompts), skip_special_tokens=skip)
        deltas = _stream(detok, ids, chunks)
        expected = tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == expected == detok.text
        for d in deltas[:-1]:  # only flush may emit a trailing replacement char
            assert not d.endswith("\ufffd")


def _random_chunks(rng: random.Random, n: int) -> list[int]:
    sizes = []
    while n > 0:
        size = min(n, rng.choice([0, 1, 1, 1, 2, 3]))  # 0: an empty push must be harmless
        sizes.append(size)
        n -= size
    return sizes


def test_push_decodes_a_bounded_window(tokenizer):
    """O(window): the tokenizer never decodes more than a few tokens per push, however long the text."""
    calls: list[int] = []

    class CountingTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode(TEXT * 20)
    detok = IncrementalDetokenizer(CountingTokenizer(), tokenizer.encode(TEXT * 5), skip_special_tokens=True)
    for i in ids:
        detok.push([i])
    assert detok.text == TEXT * 20
    assert max(calls) <= 12  # 5 prompt-context tokens plus a held multi-token emoji at most


def _metaspace_tokenizer() -> Tokenizer:
    """A SentencePiece-style tokenizer: its decoder drops the leading "▁" of the first token decoded."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False)
    tok.train_from_iterator(["hello world the quick brown fox jumps over the lazy dog"] * 5, trainer=trainer)
    return tok


def test_metaspace_tokenizer_keeps_the_space_before_the_first_generated_word():
    tok = _metaspace_tokenizer()
    prompt = tok.encode("hello").ids
    ids = tok.encode("world the fox").ids
    assert tok.decode(ids) == "world the fox"  # decoded alone the first word loses its space...
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True)
    # ...streamed after the prompt, it keeps it.
    assert "".join(_stream(detok, ids, [1] * len(ids))) == " world the fox"


def test_skipped_special_token_does_not_drop_the_next_words_space():
    tok = _metaspace_tokenizer()
    unk = tok.token_to_id("<unk>")
    detok = IncrementalDetokenizer(tok, tok.encode("hello").ids, skip_special_tokens=True)
    ids = [*tok.encode("the").ids, unk, *tok.encode("fox").ids]
    assert "".join(_stream(detok, ids, [1] * len(ids))) == " the fox"



class _CountingDecoder:
    """Wraps a tokenizer's decode and counts the token ids it is asked to decode (cost, not time).
    `knows_specials=False` hides the Rust tokenizer, as a tokenizer without added-token info would."""

    def __init__(self, tokenizer, knows_specials: bool) -> None:
        self.tokenizer = tokenizer
        self.calls: list[int] = []
        if knows_specials:
            self.backend_tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)

    def decode(self, ids, skip_special_tokens=True):
        self.calls.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _lone_continuation_byte_id(tokenizer) -> int:
    """A token that is one stray UTF-8 continuation byte: every one of a run decodes to its own "\\ufffd"."""
    return next(i for i in range(len(tokenizer)) if tokenizer.decode([i] * 3) == "\ufffd" * 3)


def _long_run_case(name: str):
    """(tokenizer, prompt, output ids) with a 3000-token run between words that decodes to "" (skipped
    special tokens) or to no whole character (stray bytes, held as partial characters)."""
    tok, meta, run = train_tokenizer(vocab_size=512), _metaspace_tokenizer(), 3000
    if name == "skipped-specials":
        return tok, tok.encode("Capital:"), [*tok.encode("Paris"), *[EOS_ID] * run, *tok.encode(" café 日本")]
    if name == "stray-bytes":
        stray = _lone_continuation_byte_id(tok)
        return tok, tok.encode("Capital:"), [*tok.encode("ok "), *[stray] * run, *tok.encode("🎉 done")]
    if name == "metaspace-unk":
        unk = meta.token_to_id("<unk>")
        return meta, meta.encode("hello").ids, [*meta.encode("the").ids, *[unk] * run, *meta.encode("fox").ids]
    assert name == "empty-prompt"
    return tok, [], [*[EOS_ID] * run, *tok.encode("Paris")]


@pytest.mark.parametrize("knows_specials", [True, False])
@pytest.mark.parametrize("case", ["skipped-specials", "stray-bytes", "metaspace-unk", "empty-prompt"])
def test_cost_is_linear_when_many_tokens_decode_to_nothing(case, knows_specials):
    """A long run of tokens that add no whole character costs O(1) decoded tokens each, not O(run)."""
    tok, prompt, ids = _long_run_case(case)
    counting = _CountingDecoder(tok, knows_specials)
    detok = IncrementalDetokenizer(counting, prompt, skip_special_tokens=True)
    deltas = _stream(detok, ids, [1] * len(ids))
    # The text the output adds after the prompt (for byte-level BPE that is decode(ids) itself; a
    # SentencePiece decoder keeps the first word's space after a prompt).
    full, before = (tok.decode(x, skip_special_tokens=True) for x in ([*prompt, *ids], list(prompt)))
    assert "".join(deltas) == detok.text == full[len(before) :]
    assert max(counting.calls) <= 16  # context, a few silent/held tokens and the new one
    assert sum(counting.calls) <= 30 * len(ids)  # was ~len(ids)**2 / 2: every push re-decoded the run


def test_leading_metaspace_token_at_the_very_start_keeps_its_space():
    """A first "▁" decodes to "" alone, but gives the next word its space: the silent tail is not dropped."""
    tok = _metaspace_tokenizer()
    ids = [tok.token_to_id("▁"), tok.token_to_id("▁the")]
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert "".join(_stream(detok, ids, [1, 1])) == tok.decode(ids) == " the"


def test_skipped_special_tokens_inside_a_split_character_do_not_break_it(tokenizer):
    """Skipped special tokens never enter the window, so however many arrive between the bytes of one
    character, the character is emitted whole."""
    first, *rest = tokenizer.encode("衡")
    assert rest and tokenizer.decode([first]) == "\ufffd"  # the premise: a character split across tokens
    ids = [*tokenizer.encode("ok "), first, *[EOS_ID] * 20, *rest]
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    deltas = _stream(detok, ids, [1] * len(ids))
    assert "".join(deltas) == "ok 衡" == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)


def _random_piece(rng: random.Random, tokenizer, stray: int) -> list[int]:
    """Up to 30 ids of one kind: text, skipped-special run, stray-byte run, random ids, or an emoji prefix."""
    n = rng.randint(1, 30)
    kind = rng.choice(["text", "specials", "stray", "random", "emoji-prefix"])
    if kind == "text":
        return tokenizer.encode(rng.choice([TEXT, TEXT[::-1]]))[:n]
    if kind == "specials":
        return [EOS_ID] * n
    if kind == "stray":
        return [stray] * n
    if kind == "random":
        return [rng.randrange(len(tokenizer)) for _ in range(n)]
    emoji = tokenizer.encode("🎉👍🏽")
    return emoji[: rng.randint(1, len(emoji))]


@pytest.mark.parametrize("seed", range(4))
def test_long_silent_and_stray_runs_still_concatenate_to_decode(tokenizer, seed):
    """Property, for the window bounds: text, runs of special tokens, runs of stray bytes and random ids,
    mixed and pushed in random chunks, stream exactly `decode(all_output_ids)`."""
    rng = random.Random(seed)
    stray = _lone_continuation_byte_id(tokenizer)
    for trial in range(10):
        skip = trial % 2 == 0
        ids = [i for _ in range(rng.randint(1, 8)) for i in _random_piece(rng, tokenizer, stray)]
        detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("日本語 🎉"), skip_special_tokens=skip)
        deltas = _stream(detok, ids, _random_chunks(rng, len(ids)))
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip) == detok.text
