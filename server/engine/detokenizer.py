"""Turn a stream of generated token ids into a stream of text deltas.

Decoding each new token on its own is wrong twice over: a byte-level BPE token may hold half of a UTF-8
character (decoding gives "\\ufffd"), and SentencePiece-style decoders drop the leading space of the
first token they see. So, as vLLM and TGI do, each push decodes a short window — the tokens emitted by
the previous completed push (`prefix_offset:read_offset`) as left context, plus the pending ones — and
emits only the text the pending tokens add. A trailing run of "\\ufffd" (a character whose remaining bytes
have not arrived) is held back; the text before it is emitted at once, and the window's offsets advance
only once the pending text ends on a whole character. Each push costs O(window), not O(sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Prompt tokens kept as left context for the first push (vLLM and TGI use 5 as well).
_INITIAL_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """Both `tokenizers.Tokenizer` and transformers' fast tokenizers have this method."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """One per request. `push` the sampled ids as they arrive; `flush` once when the request ends."""

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
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
        self._ids.extend(token_ids)
        pending_text = self._pending_text()
        if not pending_text:
            # Nothing visible yet (e.g. a skipped special token): keep the old context, which still
            # carries the left text a SentencePiece decoder needs to keep the next word's space.
            return ""
        complete = pending_text.rstrip(_REPLACEMENT_CHAR)
        delta = complete[self._emitted_pending :]
        if len(complete) == len(pending_text):
            self._advance()  # ends on a whole character: the pending tokens become the next context
        else:
            self._emitted_pending += len(delta)
        return self._record(delta)

    def flush(self) -> str:
        """At the end of the request: emit whatever is held, decoded as the tokenizer would decode it."""
        delta = self._pending_text()[self._emitted_pending :]
        self._advance()
        return self._record(delta)

    def _pending_text(self) -> str:
        """The text that the pending tokens add after the context tokens ("" if none or they add nothing)."""
        skip = self._skip_special_tokens
        context_text = self._tokenizer.decode(self._ids[: self._read_offset], skip_special_tokens=skip)
        window_text = self._tokenizer.decode(self._ids, skip_special_tokens=skip)
        return window_text[len(context_text) :]

    def _advance(self) -> None:
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        self._emitted_pending = 0

    def _record(self, delta: str) -> str:
        if delta:
            self._text_parts.append(delta)
        return delta
