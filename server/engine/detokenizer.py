"""Turn a stream of generated token ids into a stream of text deltas.

Decoding each new token on its own is wrong twice over: a byte-level BPE token may hold half of a UTF-8
character (decoding gives "\\ufffd"), and SentencePiece-style decoders drop the leading space of the
first token they see. So, as vLLM and TGI do, each push decodes a short window — the tokens emitted by
the previous completed push (`prefix_offset:read_offset`) as left context, plus the pending ones — and
emits only the text the pending tokens add. A trailing run of "\\ufffd" (a character whose remaining bytes
have not arrived) is held back; the text before it is emitted at once, and the window's offsets advance
only once the pending text ends on a whole character.

Each push costs O(window), not O(sequence), because the pending part is bounded too. Special tokens that
`skip_special_tokens` skips never enter the window (the decoder would drop them anyway); other tokens
that add no text are dropped but for the last few; and a held run longer than any character (stray
bytes) is settled, as flush would. `tokenizers.decoders.DecodeStream` is not used: it re-decodes its
whole pending run on every step in both cases, which is the quadratic cost avoided here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

# Prompt tokens kept as left context for the first push (vLLM and TGI use 5 as well).
_INITIAL_CONTEXT_TOKENS = 5
# A UTF-8 character is at most 4 bytes, so it spans at most 4 tokens (each holds a byte or more). Older
# pending tokens cannot be completed by later ones any more.
_MAX_CHAR_TOKENS = 4
# Silent pending tokens kept when a run of them is dropped (see _drop_silent_pending).
_KEPT_SILENT_TOKENS = 4
_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """Both `tokenizers.Tokenizer` and transformers' fast tokenizers have this method."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """One per request. `push` the sampled ids as they arrive; `flush` once when the request ends."""

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._skipped = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        # Only the prompt's tail matters as context. Ids before the window are dropped as we go (see
        # _advance), so memory is O(window) too.
        self._ids: list[int] = list(prompt_ids[-_INITIAL_CONTEXT_TOKENS:]) if prompt_ids else []
        self._read_offset = len(self._ids)  # window = self._ids; context = self._ids[:read_offset]
        self._emitted_pending = 0  # chars of the pending tokens' text already emitted (before a held char)
        self._text_parts: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far (by `push` and `flush`)."""
        return "".join(self._text_parts)

    def push(self, token_ids: Sequence[int]) -> str:
        """Append new token ids; return the text they complete ("" while only a partial char is new)."""
        self._ids.extend(i for i in token_ids if i not in self._skipped)
        pending_text = self._pending_text()
        if not pending_text:
            # Nothing visible yet (e.g. a skipped special token): keep the old context, which still
            # carries the left text a SentencePiece decoder needs to keep the next word's space.
            self._drop_silent_pending()
            return ""
        complete = pending_text.rstrip(_REPLACEMENT_CHAR)
        delta = complete[self._emitted_pending :]
        if len(complete) == len(pending_text):
            self._advance()  # ends on a whole character: the pending tokens become the next context
            return self._record(delta)
        self._emitted_pending += len(delta)
        return self._record(delta + self._settle_stale())

    def flush(self) -> str:
        """At the end of the request: emit whatever is held, decoded as the tokenizer would decode it."""
        delta = self._pending_text()[self._emitted_pending :]
        self._advance()
        return self._record(delta)

    def _pending_text(self, end: int | None = None) -> str:
        """The text that the pending tokens (up to `end`) add after the context ("" if they add nothing)."""
        context_text = self._decode(self._ids[: self._read_offset])
        return self._decode(self._ids[:end])[len(context_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _drop_silent_pending(self) -> None:
        """Drop all but the last few pending tokens when they add no text, so that a long run of them
        costs O(1) per token. The last few stay: a decoder may fold one into the next token
        (SentencePiece's "▁" at the very start decodes to "" alone, yet gives the next word its space)."""
        del self._ids[self._read_offset : len(self._ids) - _KEPT_SILENT_TOKENS]

    def _settle_stale(self) -> str:
        """Bound a held window: the text of all but the last `_MAX_CHAR_TOKENS` pending tokens is final
        (replacement chars for bytes no later token can complete). Emit it; those tokens become the context."""
        cut = len(self._ids) - _MAX_CHAR_TOKENS
        if cut - self._read_offset <= _MAX_CHAR_TOKENS:
            return ""  # short enough: amortised, each settle moves more than _MAX_CHAR_TOKENS tokens
        settled = self._pending_text(cut)
        delta = settled[self._emitted_pending :]
        # What was emitted beyond `settled` belongs to the tokens that stay pending.
        self._emitted_pending = max(0, self._emitted_pending - len(settled))
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids) - _MAX_CHAR_TOKENS
        return delta

    def _advance(self) -> None:
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        self._emitted_pending = 0

    def _record(self, delta: str) -> str:
        if delta:
            self._text_parts.append(delta)
        return delta


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that `decode(..., skip_special_tokens=True)` drops: the `tokenizers` added tokens marked special
    (transformers' fast tokenizers decode through that same Rust tokenizer). Empty when unknown."""
    rust = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return _added_special_ids(rust) if hasattr(rust, "get_added_tokens_decoder") else frozenset()


@functools.lru_cache(maxsize=8)  # once per tokenizer, not per request: it lists every added token
def _added_special_ids(rust_tokenizer: Any) -> frozenset[int]:
    return frozenset(i for i, tok in rust_tokenizer.get_added_tokens_decoder().items() if tok.special)
