"""Small Hugging Face causal-LM directories built locally with seeded weights (no hub, no network).

Used by the tests (tiny models per family), the benchmarks (`bench-small`, the SmolLM2-135M shape) and
the server's built-in demo model. Everything is deterministic: the tokenizer is a byte-level BPE trained
on the corpus embedded below, the weights come from `torch.manual_seed(seed)`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# The trainer adds special tokens first, in this order, so their ids are fixed: 0, 1, 2.
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
EOS_ID = 0
# One token ends text, starts it and pads it (as in Qwen / GPT-2); every config here uses these ids.
_SPECIAL_IDS = {"bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}

# Shape shared by every tiny test family: GQA (4 query heads over 2 KV heads), head_dim 16 so that
# heads * head_dim == hidden; every linear's in_features (64 or 128) is a multiple of bitsandbytes'
# 4-bit block size (64), so nf4 quantization works on all targets.
# initializer_range: HF's default 0.02 leaves the layers' output far below the token embedding at this
# width, so tied-embedding models (qwen) greedily repeat their last input token forever. ~1.6/sqrt(hidden)
# makes attention/MLP dominate the residual and greedy text varies (checked: 16-32 distinct ids in 32 steps).
_TINY_SHAPE: dict[str, object] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "initializer_range": 0.2,
}

# A few KB of mixed text. Non-ASCII (accents, emoji, CJK, Cyrillic, Greek) is here on purpose: with a
# byte-level BPE it exercises multi-byte merges and tokens that end mid-character, which is what the
# incremental detokenizer must get right.
CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs into the woods.
Once upon a time there was a small village by the sea. Every morning the fishermen went out in their
boats, and every evening they came back with baskets full of fish. The children played on the beach,
building castles of sand and watching the waves roll in and out again.
A good server answers every request. It reads the prompt, runs the model, and streams the tokens back
to the client as soon as they are ready. When the queue is full it says so politely and asks the client
to try again later. When it is asked to stop, it finishes the work already accepted before it exits.
Adapters are small: a low-rank update to a few projection matrices. One base model can serve thousands
of them at once, because each adapter only adds two thin matrices, A and B, to every target layer.
The weather today is cloudy with a chance of rain in the afternoon. Tomorrow will be sunny and warm,
with a light breeze from the west. Temperatures will reach twenty-five degrees by noon.
She opened the book and began to read. The first chapter was about a journey across the mountains,
the second about a city of glass, and the third about a library that had no end.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 3.14159 2.71828 1e-4 -7 +12 50% $19.99
Dates: 2024-01-15, 1999-12-31, 12:30, 23:59:59. Phone: +1 (555) 010-2030. Email: hello@example.com
def add(a, b):
    return a + b

for i in range(10):
    print(i * i)

if x > 0 and y < 10:
    result = {"name": "loraplex", "rank": 16, "alpha": 32.0, "targets": ["q_proj", "v_proj"]}
User: What is the capital of France?
Assistant: The capital of France is Paris.
User: Can you write a short poem about the moon?
Assistant: Silver lamp above the hill, the night is deep, the wind is still.
User: How many legs does a spider have?
Assistant: A spider has eight legs.
Le café est très bon ce matin. Nous avons mangé une crêpe au citron à la gare.
Il était une fois un garçon naïf qui voulait voir la mer. Où est la bibliothèque ? À gauche, merci.
Die Straße ist lang und schön. Über den Bergen fliegt ein Vogel. Grüße aus München!
El niño comió una manzana. ¿Dónde está la estación? ¡Qué día tan bonito! Mañana vamos a la playa.
Привет, мир! Как дела? Сегодня хорошая погода. Москва, Санкт-Петербург.
Καλημέρα κόσμε. Η θάλασσα είναι γαλάζια. αβγδεζηθικλμνξοπρστυφχψω
你好，世界！今天天气很好。我们一起去公园散步吧。机器学习和自然语言处理。
こんにちは、世界。今日はいい天気ですね。東京、大阪、京都。ありがとうございます。
안녕하세요 세계. 오늘 날씨가 좋아요. 감사합니다.
Emoji: 😀 😂 🎉 🚀 ❤️ 👍 🐍 🦊 🌍 ☕ ✨ 🔥 — and symbols: © ® ™ € £ ¥ ° ± × ÷ ≤ ≥ ≠ ∞ → ← ↑ ↓ … « » “ ” ‘ ’
The naïve café owner served a crème brûlée and a piña colada to the façade inspector from Zürich.
In the beginning the model knows nothing. It sees text, predicts the next token, and slowly learns the
patterns of language: which words follow which, how sentences end, where a question needs an answer.
Training takes many steps; each step nudges the weights a little in the direction that lowers the loss.
The library opened at nine o'clock. People came to borrow books, to read the newspapers, and to sit
quietly by the window. The librarian knew every reader by name and every book by its place on the shelf.
Rivers flow to the sea, the sea rises into clouds, the clouds rain on the hills, and the hills feed the
rivers again. Nothing is lost; everything changes form. This is the water cycle, old as the world.
Cooking rice: rinse one cup of rice, add two cups of water, bring it to a boil, cover, and simmer for
fifteen minutes. Let it rest for five minutes before you open the lid. Serve warm with vegetables.
The train leaves at 7:45 from platform 3. Passengers should have their tickets ready. The journey takes
two hours and ten minutes, with a short stop in the middle of the valley.
Questions and answers, requests and replies, prompts and completions: the rhythm of a conversation.
"""


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train once per vocab size per process; the JSON string is immutable, so caching is safe."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False like GPT-2 / Llama-3 style byte-level BPE: decode(encode(s)) == s exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any UTF-8 text is encodable even if the corpus never showed a byte.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special token ids {ids} are not 0..{len(SPECIAL_TOKENS) - 1}")
    return tok.to_str()


def train_tokenizer(out_dir: Path | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE with ChatML special tokens; saved to `out_dir` when given.

    A corpus this small may run out of merges before `vocab_size`: `len(tokenizer) <= vocab_size`.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (256 bytes + special tokens), got {vocab_size}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(Path(out_dir))
    return tokenizer


def tiny_config(family: str, vocab_size: int, **overrides: object) -> PretrainedConfig:
    """The tiny test shape for one family; `overrides` replace any config field."""
    if family not in _CONFIG_CLASSES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    fields: dict[str, object] = {
        **_TINY_SHAPE,
        "vocab_size": vocab_size,
        # Variety on purpose: llama/mistral keep a separate lm_head, the qwen families tie it.
        "tie_word_embeddings": family.startswith("qwen"),
        **_SPECIAL_IDS,
    }
    if family == "qwen2":
        fields["use_sliding_window"] = False
    if family == "mistral":
        fields["sliding_window"] = None
    fields.update(overrides)
    return _CONFIG_CLASSES[family](**fields)


def bench_small_config(vocab_size: int = 49152) -> LlamaConfig:
    """`bench-small`: the Llama shape of SmolLM2-135M (see BENCHMARK.md)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        **_SPECIAL_IDS,
    )


def build_model_dir(
    out_dir: Path,
    family: str = "llama",
    *,
    seed: int = 0,
    config: PretrainedConfig | None = None,
    vocab_size: int = 512,
) -> Path:
    """Write a seeded random fp32 model + tokenizer (safetensors) into `out_dir` and return it.

    `vocab_size` is the tokenizer's target size (and the model's when `config` is None). With a larger
    `config.vocab_size` (bench-small: 49152) the ids past the tokenizer are simply never produced by it.
    """
    if config is None:
        config = tiny_config(family, vocab_size)
    tokenizer = train_tokenizer(vocab_size=min(vocab_size, config.vocab_size))
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size}")
    # fork_rng: seed the weights without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
