"""Chat messages → one prompt string, with the tokenizer's own chat template when it has one.

The template is the model's contract for how turns are marked (ChatML, Llama's [INST], ...), so it is
used as is, with `add_generation_prompt` so the prompt ends where the assistant's reply begins. Its
output already contains the special tokens the model expects, so the caller encodes it with
`add_special_tokens=False` (as vLLM does) to avoid a doubled BOS.

Fallback, for tokenizers without a chat template (base models): a plain transcript, one turn per line,
ending with the assistant's cue, e.g.

    system: You are terse.
    user: Hi
    assistant:

No special tokens are involved, so the caller encodes the fallback like a completion prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from loraplex.server.api.errors import ApiError


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str
    name: str | None = None  # OpenAI's participant name: given to the template (which may show it)


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    templated: bool  # True: rendered by the tokenizer's template (encode without adding special tokens)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_chat_prompt(tokenizer: PreTrainedTokenizerBase, turns: Sequence[ChatTurn],
                      add_generation_prompt: bool = True, continue_final_message: bool = False) -> ChatPrompt:
    """Render `turns` as the model expects them; 400 if the template rejects the conversation.

    `continue_final_message` (vLLM's): the last message stays open (no end-of-turn marker), so the model goes
    on writing it, e.g. after a prefilled assistant answer."""
    if continue_final_message and add_generation_prompt:
        raise ApiError(400, "continue_final_message cannot be combined with add_generation_prompt (set it to "
                            "false)", param="continue_final_message")
    if not has_chat_template(tokenizer):
        return ChatPrompt(fallback_transcript(turns, add_generation_prompt), templated=False)
    messages = [{"role": t.role, "content": t.content, **({"name": t.name} if t.name else {})} for t in turns]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, tokenize=False)
    except (TemplateError, ValueError) as exc:  # roles out of order, nothing to continue: the caller's to fix
        raise ApiError(400, f"messages: the model's chat template rejected the conversation: {exc}",
                       param="messages") from exc
    return ChatPrompt(str(text), templated=True)


def fallback_transcript(turns: Sequence[ChatTurn], add_generation_prompt: bool = True) -> str:
    lines = [f"{t.role}: {t.content}" for t in turns]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)
