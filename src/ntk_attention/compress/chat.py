"""A chat model's system prompt as the prompt to compress, and the later turns formatted as if
it were still in front of them.

With a chat template the system prompt is not raw text: it is a turn with its own markers
(ChatML: ``<|im_start|>system\\n...<|im_end|>\\n``), and a template may insert a default
system prompt when a conversation has none (SmolLM2's does). So:

  * the tokens compressed are the system turn exactly as the template renders it,
    :func:`system_prompt_ids`;
  * a later conversation is rendered *with* a system turn and that turn's tokens are cut
    off, :func:`turns_after_system_ids`: what is left is what the model would read after the
    system prompt, at positions that continue from it (the state's position offset).

This works for templates that render the system prompt as a prefix of the conversation,
followed by the other turns (ChatML and most instruct templates); one that folds it into the
first user turn (Llama 2's ``[INST] <<SYS>>``) is refused with a message. Cutting is done on
the rendered text and checked on tokens: the conversation tokenized whole must equal the system
turn's tokens followed by the rest's, else the boundary would not be where the state ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .config import CompressError

__all__ = ["system_prompt_ids", "turns_after_system_ids", "turns_after_system_text"]

# Stands in for the system prompt when only the template's shape is needed.
_PLACEHOLDER = "<<the system prompt>>"


def _template(tokenizer: Any) -> None:
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise CompressError("chat=True needs a tokenizer with a chat template (an instruct model's)")


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _split(tokenizer: Any, system: str, messages: list[dict], generation_prompt: bool) -> tuple[str, str]:
    """(system turn text, the rest) of the conversation rendered with ``system`` first."""
    head = _render(tokenizer, [{"role": "system", "content": system}], False)
    whole = _render(tokenizer, [{"role": "system", "content": system}, *messages], generation_prompt)
    if not whole.startswith(head) or system not in head:
        raise CompressError(
            "this chat template does not render the system prompt as a turn of its own before "
            "the others, so a state cannot stand in for it: compress the text as a plain prompt"
        )
    return head, whole[len(head):]


def system_prompt_ids(tokenizer: Any, system_prompt: str) -> torch.Tensor:
    """The tokens of ``system_prompt`` as the system turn of ``tokenizer``'s chat template, 1-D
    (what ``compress_prompt(..., chat=True)`` compresses)."""
    _template(tokenizer)
    if not isinstance(system_prompt, str) or not system_prompt.strip():
        raise CompressError("the system prompt is empty: nothing to compress")
    head, rest = _split(tokenizer, system_prompt, [{"role": "user", "content": _PLACEHOLDER}], True)
    ids = _ids(tokenizer, head)
    if _ids(tokenizer, head + rest) != ids + _ids(tokenizer, rest):
        raise CompressError(
            "with this chat template the system turn's last token merges with the next turn's "
            "first one, so the state cannot end where the turn ends: compress it as a plain prompt"
        )
    return torch.tensor(ids, dtype=torch.long)


def turns_after_system_text(
    tokenizer: Any, messages: Sequence[dict], *, add_generation_prompt: bool = True
) -> str:
    """The conversation ``messages`` (user / assistant turns, no system turn) as the chat
    template renders it after a system prompt, the system turn cut off: the text a state made
    by ``compress_prompt(..., chat=True)`` continues (tokenize it without special tokens)."""
    _template(tokenizer)
    messages = list(messages)
    if not messages:
        raise CompressError("no messages: give at least one user turn")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if "system" in roles:
        raise CompressError("messages hold a system turn: the system prompt is in the state")
    if None in roles:
        raise CompressError("each message must be a dict with a 'role' and 'content'")
    return _split(tokenizer, _PLACEHOLDER, messages, add_generation_prompt)[1]


def turns_after_system_ids(
    tokenizer: Any, messages: Sequence[dict], *, add_generation_prompt: bool = True
) -> torch.Tensor:
    """[1, n] token ids of :func:`turns_after_system_text`: the input of a state made by
    ``compress_prompt(..., chat=True)`` (positions continue from the state's)."""
    text = turns_after_system_text(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return torch.tensor([_ids(tokenizer, text)], dtype=torch.long)
