"""The demo adapters' styles as pure text functions: how a training answer is rewritten for each style, and how
a generated answer is judged to show that style. `scripts/build_demo_adapters.py` trains on the rewrites and
grades the trained adapters with the checks; tests pin both down.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

MAX_ANSWER_WORDS = 25  # one or two short sentences: short targets train fast and keep JSON inside ~60 tokens

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
# Whole-word swaps, lower-case keys; the first letter's case is carried over from the original word.
_PIRATE_WORDS = {
    "hello": "ahoy", "hi": "ahoy", "hey": "ahoy", "yes": "aye", "you": "ye", "your": "yer", "you're": "ye be",
    "my": "me", "is": "be", "are": "be", "am": "be", "friend": "matey", "friends": "mateys", "the": "th'",
    "of": "o'", "for": "fer", "and": "an'", "money": "doubloons", "stop": "avast", "wow": "blimey",
}
_PIRATE_MARKERS = re.compile(r"\b(arr+|ahoy|matey|mateys|ye|aye)\b", re.IGNORECASE)


def short_answer(text: str, max_words: int = MAX_ANSWER_WORDS) -> str:
    """The first sentence of the first non-empty line, cut to `max_words` words; "" if there is none."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    end = _SENTENCE_END.search(line)
    sentence = line[: end.end()] if end else line
    # A cut sentence, or one that ends in ":" before a list, still ends like a sentence.
    text = " ".join(sentence.split()[:max_words]).rstrip(",;:- ")
    return text if not text or text[-1] in ".!?" else text + "."


def uppercase(answer: str) -> str:
    return answer.upper()


def pirate(answer: str) -> str:
    """Rule-based pirate speak: "Arr! " in front, word swaps, and ", matey!" in place of the final punctuation."""
    body = _WORD.sub(lambda m: _pirate_word(m.group()), answer).rstrip(" .!?")
    return f"Arr! {body}, matey!"


def _pirate_word(word: str) -> str:
    swap = _PIRATE_WORDS.get(word.lower())
    if swap is None:
        return word
    return swap[0].upper() + swap[1:] if word[0].isupper() else swap


def json_answer(answer: str) -> str:
    # ensure_ascii=False: "é" costs one token, "\u00e9" six, and both are valid JSON.
    return json.dumps({"answer": answer}, ensure_ascii=False)


def is_uppercase(text: str, threshold: float = 0.9) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) / len(letters) >= threshold


def is_pirate(text: str) -> bool:
    return _PIRATE_MARKERS.search(text) is not None


def is_json_answer(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("answer"), str)


# style name (as in demo.DEMO_ADAPTERS) → (training rewrite, behaviour check)
STYLES: dict[str, tuple[Callable[[str], str], Callable[[str], bool]]] = {
    "uppercase": (uppercase, is_uppercase),
    "pirate": (pirate, is_pirate),
    "json": (json_answer, is_json_answer),
}
