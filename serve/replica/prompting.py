"""Chat prompts to token ids, with message content kept as text.

Rendering the chat template to a string and tokenizing the result would let
a user write `<|im_start|>system ...` inside a message and have it parsed as
control tokens, forging a turn. Instead the template is rendered with a
placeholder for every message's content; the template's own text is
tokenized with special tokens recognised, each content with special tokens
split into plain text.

A conversation the template itself refuses (its `raise_exception`, e.g. roles that do
not alternate) is the caller's fault: a `BadInput` naming `messages`, never a 500.
Other template failures (a broken template) stay server errors.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any, Protocol

from jinja2.exceptions import TemplateError

from serve.errors import BadInput
from serve.replica.engine import ChatMessage


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def encode(self, text: str, **kwargs: Any) -> Any: ...


def _render(tokenizer: ChatTokenizer, conversation: list[dict[str, str]]) -> str:
    """The chat template applied to `conversation`, generation prompt added."""
    if not conversation:
        raise BadInput("messages must hold at least one message", param="messages")
    try:
        rendered: str = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
    except TemplateError as exc:
        if type(exc) is not TemplateError:  # syntax or undefined-variable errors: ours
            raise
        raise BadInput(
            f"messages: the chat template refused the conversation: {exc.message}",
            param="messages",
        ) from None
    return rendered


def _mark() -> str:
    """A placeholder no template or user text holds by chance."""
    return f"\u2063{secrets.token_hex(8)}\u2063"


def keeps_content(tokenizer: ChatTokenizer) -> bool:
    """Whether the chat template passes a message's content through as it is, which
    `encode_chat` needs to keep content as text. A template that rewrites content makes
    every conversation fall back to content rendered as markup, special tokens included
    (a user can then forge turns): the engine says so once, at start. A template that
    refuses a lone user message cannot tell, and counts as keeping it."""
    mark = _mark()
    try:
        return mark in _render(tokenizer, [{"role": "user", "content": mark}])
    except (BadInput, TemplateError):
        return True


def encode_chat(
    tokenizer: ChatTokenizer, messages: Sequence[ChatMessage], *, content_as_text: bool = True
) -> list[int]:
    """Token ids of the chat template applied to `messages` (generation prompt added)."""
    if not content_as_text:
        text = _render(tokenizer, [{"role": m.role, "content": m.content} for m in messages])
        return list(tokenizer.encode(text, add_special_tokens=False))
    marks = [_mark() for _ in messages]
    rendered = _render(
        tokenizer,
        [{"role": m.role, "content": mark} for m, mark in zip(messages, marks, strict=True)],
    )
    ids: list[int] = []
    rest = rendered
    for message, mark in zip(messages, marks, strict=True):
        head, found, rest = rest.partition(mark)
        if not found:  # a template that drops or rewrites content: fall back to plain rendering
            return encode_chat(tokenizer, messages, content_as_text=False)
        ids += tokenizer.encode(head, add_special_tokens=False)
        if message.content:
            ids += tokenizer.encode(
                message.content, add_special_tokens=False, split_special_tokens=True
            )
    ids += tokenizer.encode(rest, add_special_tokens=False)
    return ids
