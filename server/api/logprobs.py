"""Log-probabilities in the shapes clients expect: OpenAI completions (`tokens`, `token_logprobs`,
`top_logprobs` as {token text: logprob}, `text_offset`), OpenAI chat (`content`: one object per token with
its bytes and `top_logprobs`), vLLM's `prompt_logprobs` ({token id: {logprob, rank, decoded_token}}), and
TGI's token lists (`prefill`, `top_tokens`).

Every logprob is the model's raw distribution (log_softmax of its logits, before temperature, penalties or
grammars), as vLLM reports them by default. A top-k dict also holds the chosen token, as OpenAI's and vLLM's do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraplex.server.engine.request import TokenLogprob

Top = tuple[tuple[int, float], ...]  # (token id, logprob), best first


class TokenTexts:
    """Each token's text on its own (`decode([id])`), cached: logprob answers name tokens by text."""

    def __init__(self, tokenizer: Any) -> None:  # a transformers tokenizer
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        missing = sorted({i for i in ids if i not in self._cache})
        if missing:
            for i, text in zip(missing, self.tokenizer.batch_decode([[i] for i in missing]), strict=True):
                self._cache[i] = text
        return [self._cache[i] for i in ids]


def completion_logprobs(texts: TokenTexts, ids: Sequence[int], logprobs: Sequence[float | None],
                        tops: Sequence[Top | None], offset: int = 0) -> dict[str, Any]:
    """OpenAI completions' logprobs object for `ids` (prompt tokens first when echoed: their first has None).
    `offset`: characters before the first token in the choice's text."""
    strings = texts(ids)
    top_dicts: list[dict[str, float] | None] = []
    for token, lp, top in zip(ids, logprobs, tops, strict=True):
        if lp is None:
            top_dicts.append(None)
            continue
        entries: dict[str, float] = {}
        for text, value in zip(texts([t for t, _ in top or ()]), (v for _, v in top or ()), strict=True):
            entries.setdefault(text, value)  # two tokens with one text: the likelier one's (best first)
        entries.setdefault(texts([token])[0], lp)
        top_dicts.append(entries)
    offsets, at = [], offset
    for s in strings:
        offsets.append(at)
        at += len(s)
    return {"tokens": strings, "token_logprobs": list(logprobs), "top_logprobs": top_dicts, "text_offset": offsets}


def chat_logprobs(texts: TokenTexts, ids: Sequence[int], logprobs: Sequence[float | None],
                  tops: Sequence[Top], top_n: int) -> dict[str, Any]:
    """OpenAI chat's logprobs object: one entry per generated token, with `top_n` alternatives."""
    content = []
    for token, lp, top in zip(ids, logprobs, tops, strict=True):
        alternatives = [_chat_entry(texts, t, v) for t, v in top[:top_n]]
        content.append({**_chat_entry(texts, token, lp), "top_logprobs": alternatives})
    return {"content": content}


def _chat_entry(texts: TokenTexts, token: int, logprob: float | None) -> dict[str, Any]:
    text = texts([token])[0]
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def vllm_prompt_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprob | None]) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt position, {token id: {logprob, rank, decoded_token}} for the prompt
    token and its top alternatives; None for the first position."""
    out: list[dict | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        ranked = {entry.token: (entry.logprob, entry.rank)}
        for rank, (token, lp) in enumerate(entry.top, start=1):
            ranked.setdefault(token, (lp, rank))
        names = texts(list(ranked))
        out.append({str(t): {"logprob": lp, "rank": r, "decoded_token": name}
                    for (t, (lp, r)), name in zip(ranked.items(), names, strict=True)})
    return out


def padded_tops(generated: int, tops: Sequence[Top]) -> list[Top]:
    """Per generated token its top alternatives, () when the engine reported none."""
    return list(tops) if len(tops) == generated else [()] * generated
