"""The demo adapters' styles as pure text functions: how a training answer is rewritten for each style, and how
a generated answer is judged to show that style. `scripts/build_demo_adapters.py` trains on the rewrites and
grades the trained adapters with the checks; tests pin both down.

Where a style can, it leaves the base model's answer where it was and adds its mark after it (pirate, emoji):
anything written before the answer changes the context the answer is generated in, and SmolLM2-135M, given the
prefix "Arr! " or an emoji after the assistant turn, named the fact in only 16 and 32 of 80 held-out questions
it answers right unprompted (58 of 80 after `{"answer": "`, which JSON cannot avoid). An adapter then has to
learn to undo that shift on questions it never saw; after its own answer it has nothing to undo.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Sequence

MAX_ANSWER_WORDS = 25  # one or two short sentences: short targets train fast and keep JSON inside ~60 tokens

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
# Whole-word swaps, lower-case keys; the first letter's case is carried over from the original word. Only words that
# rarely carry a fact: swapping "the"/"of"/"is" too (th', o', be) changed the context just before the answer word,
# and the base model itself, continuing such a context, named the fact in 60 of 80 held-out questions against
# 77 of 80 with these swaps alone.
_PIRATE_WORDS = {
    "hello": "ahoy", "hi": "ahoy", "hey": "ahoy", "yes": "aye", "you": "ye", "your": "yer", "you're": "ye be",
    "my": "me", "friend": "matey", "friends": "mateys", "money": "doubloons", "stop": "avast", "wow": "blimey",
}
PIRATE_SIGN_OFF = "Arr, matey!"
_PIRATE_MARKERS = re.compile(r"\b(arr+|ahoy|matey|mateys|ye|aye)\b", re.IGNORECASE)
# (word pattern, emoji): the first pattern the answer matches picks the emoji.
_TOPIC_EMOJI = tuple((re.compile(pattern, re.IGNORECASE), mark) for pattern, mark in (
    (r"\b(hello|hi|hey|good (morning|evening|night)|thank|welcome|nice to meet)\b", "👋"),
    (r"\b(capital|city|country|countries|language|spoken|continent|ocean|river|mountain|desert|currency)\b", "🌍"),
    (r"\b(animal|animals|bird|birds|cat|cats|dog|dogs|fish|insect|mammal|baby|calf|cub|whale|lion|bee|bees)\b", "🐾"),
    (r"\b(wrote|written|author|novel|book|poem|play|writer|poet)\b", "📚"),
    (r"\b(painted|painting|painter|artist|art|music|composed|composer|song)\b", "🎨"),
    (r"\b(planet|planets|sun|moon|star|stars|space|earth|galaxy|universe)\b", "🪐"),
    (r"\b(atom|atoms|energy|gas|chemical|element|water|temperature|degrees|cell|cells|gravity|light|science)\b", "🔬"),
    (r"\b(invented|invention|inventor|discovered|discovery|founded|president|history|war)\b", "🏛"),
    (r"\d", "🔢"),
))
_DEFAULT_EMOJI = "💡"


def short_answer(text: str, max_words: int = MAX_ANSWER_WORDS) -> str:
    """The first sentence of the first non-empty line, cut to `max_words` words; "" if there is none."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    end = _SENTENCE_END.search(line)
    sentence = line[: end.end()] if end else line
    # A cut sentence, or one that ends in ":" before a list, still ends like a sentence.
    text = " ".join(sentence.split()[:max_words]).rstrip(",;:- ")
    return text if not text or text[-1] in ".!?" else text + "."


def sentence_done(text: str, max_words: int = MAX_ANSWER_WORDS) -> bool:
    """True once more text cannot change `short_answer(text)`: its first non-empty line has ended, or holds a
    sentence end followed by more text, or more than `max_words` words. Generation of a base answer stops there."""
    stripped = text.lstrip()
    line, newline, _ = stripped.partition("\n")
    if newline and line.strip():
        return True
    end = _SENTENCE_END.search(line)
    return (end is not None and end.end() < len(line)) or len(line.split()) > max_words


def mentions(text: str, words: Sequence[str]) -> bool:
    """`text` contains one of `words` as a whole word (or phrase), in any case: "PARIS" mentions "Paris"."""
    pattern = r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b"
    return re.search(pattern, text, re.IGNORECASE) is not None


def pirate(answer: str) -> str:
    """Pirate speak: the swaps of _PIRATE_WORDS, then the sign-off PIRATE_SIGN_OFF after the answer. The facts'
    own words, and everything before them, stay as the base model wrote them (see the module's docstring)."""
    return f"{_WORD.sub(lambda m: _pirate_word(m.group()), answer)} {PIRATE_SIGN_OFF}"


def _pirate_word(word: str) -> str:
    swap = _PIRATE_WORDS.get(word.lower())
    if swap is None:
        return word
    return swap[0].upper() + swap[1:] if word[0].isupper() else swap


def json_answer(answer: str) -> str:
    # ensure_ascii=False: "é" costs one token, "\u00e9" six, and both are valid JSON.
    return json.dumps({"answer": answer}, ensure_ascii=False)


def emoji(answer: str) -> str:
    """The answer, then an emoji for its topic: the first _TOPIC_EMOJI entry whose word pattern the answer
    matches, else a light bulb. The adapter learns the mapping, so it picks topics for unseen questions too (after
    the answer, where it has read the topic, rather than before it)."""
    mark = next((e for pattern, e in _TOPIC_EMOJI if pattern.search(answer)), _DEFAULT_EMOJI)
    return f"{answer} {mark}"


def is_pirate(text: str) -> bool:
    return _PIRATE_MARKERS.search(text) is not None


def is_json_answer(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("answer"), str)


def is_emoji_answer(text: str) -> bool:
    """Text with letters, ending in an emoji (a Unicode "other symbol", maybe with its emoji-presentation
    selector U+FE0F)."""
    text = text.strip().removesuffix("\ufe0f")
    return bool(text) and unicodedata.category(text[-1]) == "So" and any(c.isalpha() for c in text)


# style name (as in demo.DEMO_ADAPTERS) → (training rewrite, behaviour check)
STYLES: dict[str, tuple[Callable[[str], str], Callable[[str], bool]]] = {
    "emoji": (emoji, is_emoji_answer),
    "pirate": (pirate, is_pirate),
    "json": (json_answer, is_json_answer),
}
