"""Prompt building: [template prefix][context][question + template suffix] with exact spans.

The three segments are tokenized separately and their ids concatenated, so the context span is
known exactly; it is never recovered by searching for delimiters in the token stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvwire.kvcodec.errors import ConfigError, PromptTooLongError

DEFAULT_INSTRUCTION = (
    "Answer the question using only the context. Reply with the shortest exact phrase from the context."
)
# Sentinels are rendered through the chat template as plain text and split off again: they only ever
# exist in the template string, never in a token sequence.
_CTX_MARK = "\x00KVWIRE_CONTEXT\x00"
_Q_MARK = "\x00KVWIRE_QUESTION\x00"


@dataclass(frozen=True)
class Prompt:
    """Token ids of a prompt and the exact span of its context.

    ids: all prompt ids; [0, context_start) is the template prefix, [context_start, context_end)
    the context, [context_end, len(ids)) the question and template suffix.
    """

    ids: tuple[int, ...]
    context_start: int
    context_end: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def context_len(self) -> int:
        return self.context_end - self.context_start

    @property
    def stream_len(self) -> int:
        """Positions whose KV travels: all but the last prompt token, which the receiver feeds itself."""
        return len(self.ids) - 1

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor([self.ids], dtype=torch.long, device=device)

    def fixed_positions(self) -> torch.Tensor:
        """Streamed positions that are never dropped: template prefix, question and suffix."""
        return torch.cat([torch.arange(0, self.context_start), torch.arange(self.context_end, self.stream_len)])


def _template_parts(tokenizer, instruction: str) -> tuple[str, str, str]:
    """Return (prefix, middle, suffix) text around the context and question slots."""
    user = f"{instruction}\n\nContext:\n{_CTX_MARK}\n\nQuestion: {_Q_MARK}"
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    else:
        rendered = user + "\nAnswer:"
    prefix, rest = rendered.split(_CTX_MARK)
    middle, suffix = rest.split(_Q_MARK)
    return prefix, middle, suffix


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    """Template text: its special-token strings (<|im_start|>, ...) become the control tokens they name."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def user_token_ids(tokenizer, text: str) -> list[int]:
    """User text (a context, a question) tokenized literally: a special-token string in it stays text.

    `add_special_tokens=False` only stops the tokenizer adding BOS/EOS; it still parses `<|im_end|>` in
    the text into the control token, which would let a passage close the user turn and forge others.
    """
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _has_special(tokenizer, text: str) -> bool:
    return any(tok and tok in text for tok in getattr(tokenizer, "all_special_tokens", ()))


def template_prefix_ids(tokenizer, instruction: str = DEFAULT_INSTRUCTION) -> list[int]:
    """The template prefix's ids (the tokens before the context): the same for every prompt of a
    tokenizer and instruction, so a receiver can compute its KV once (kvcodec/template_cache.py)."""
    prefix = _template_parts(tokenizer, instruction)[0]
    return _encode(tokenizer, prefix, special=not getattr(tokenizer, "chat_template", None))


def build_prompt(
    tokenizer,
    context: str,
    question: str,
    instruction: str = DEFAULT_INSTRUCTION,
    max_len: int | None = None,
) -> Prompt:
    """Tokenize a context and question into a Prompt with exact spans.

    With a chat template, the template supplies any BOS token; without one, the tokenizer's own
    special tokens are added to the prefix. Context and question are user text: special-token strings
    in them are tokenized literally (user_token_ids), never as control tokens. Raises ConfigError for an empty context or question and
    PromptTooLongError when the prompt exceeds max_len tokens.
    """
    if not context or not context.strip():
        raise ConfigError("context is empty: give the passage the question is about")
    if not question or not question.strip():
        raise ConfigError("question is empty")
    _, middle, suffix = _template_parts(tokenizer, instruction)
    prefix_ids = template_prefix_ids(tokenizer, instruction)
    context_ids = user_token_ids(tokenizer, context)
    if _has_special(tokenizer, middle):  # a template with control tokens between the slots: keep them real
        middle_ids, question_ids = _encode(tokenizer, middle, special=False), user_token_ids(tokenizer, question)
    else:  # plain text before the question: tokenized with it, so their boundary merges as usual
        middle_ids, question_ids = [], user_token_ids(tokenizer, middle + question)
    tail_ids = middle_ids + question_ids + _encode(tokenizer, suffix, special=False)
    if not context_ids:
        raise ConfigError("context tokenizes to nothing")
    ids = tuple(prefix_ids + context_ids + tail_ids)
    if max_len is not None and len(ids) > max_len:
        raise PromptTooLongError(
            f"prompt is {len(ids)} tokens ({len(context_ids)} of context); the model's window is {max_len} tokens"
        )
    start = len(prefix_ids)
    return Prompt(ids=ids, context_start=start, context_end=start + len(context_ids))


def reconstruction_ids(
    tokenizer, request: str, quoted: Sequence[int] = (), instruction: str = DEFAULT_INSTRUCTION
) -> list[int]:
    """The ids that close the user turn after a prompt's context with `request` instead of the question
    (e.g. "Repeat the previous context exactly."), then `quoted` ids (context ids the request refers to),
    up to the start of the model's reply: what a context-reconstruction pass (the kvzip selector) appends
    to [template prefix][context] before teacher-forcing the context's own ids as the reply. Built from
    build_prompt's template."""
    _, _, suffix = _template_parts(tokenizer, instruction)
    return user_token_ids(tokenizer, request) + list(quoted) + _encode(tokenizer, suffix, special=False)


def model_window(model) -> int | None:
    """The model's maximum number of positions, if its config says."""
    return getattr(model.config, "max_position_embeddings", None)
