"""Score-then-select: a selector scores each context position from one ScoreInputs; the base keeps the top-k."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.prompt import Prompt


@dataclass(frozen=True)
class ScoreInputs:
    """Everything a selector may score from, computed once by the prefill.

    attention: [layers, context_len] fp32, the attention the selector's `query_rows` pay to each
    context position, summed over those rows and all query heads (softmax over each row's full
    causal span); None when the selector asked for no rows.
    keys, values: per layer [kv_heads, stream_len, head_dim], the prefilled cache (after RoPE).
    """

    prompt: Prompt
    attention: torch.Tensor | None
    keys: Sequence[torch.Tensor]
    values: Sequence[torch.Tensor]


@dataclass(frozen=True)
class Selection:
    """The outcome of selection over the streamed positions [0, prompt.stream_len).

    kept: ascending kept positions. order: the same positions, most important first (template and
    question positions, then context positions by descending score) — the order chunks are sent in.
    scores: one score per context position (higher = more important).
    """

    kept: torch.Tensor
    order: torch.Tensor
    scores: torch.Tensor
    context_kept: int
    context_len: int


def check_retention(retention: float) -> float:
    if not isinstance(retention, (int, float)) or not (0.0 < float(retention) <= 1.0):
        raise ConfigError(f"retention must be in (0, 1], got {retention!r}")
    return float(retention)


def context_budget(retention: float, context_len: int) -> int:
    """Number of context positions kept: ceil(retention x context_len), at least 1."""
    return max(1, min(context_len, math.ceil(check_retention(retention) * context_len - 1e-9)))


def check_int(selector: str, field: str, value, minimum: int) -> None:
    """ConfigError unless `value` is an int (not a bool) of at least `minimum`: for `__post_init__`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"selector {selector!r}: {field} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class Selector:
    """A selector is a frozen dataclass whose fields are its parameters, validated in `__post_init__`
    (raise ConfigError). Override `score` and, to get attention, `query_rows`.

    query_rows: the prompt rows whose attention to the context the prefill must capture (None: no
    attention needed); `score` then finds it in `inputs.attention`.
    """

    name: ClassVar[str] = ""

    def query_rows(self, prompt: Prompt) -> torch.Tensor | None:
        return None

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """One score per context position, [context_len]; higher = more important."""
        raise NotImplementedError

    def select(self, inputs: ScoreInputs, retention: float) -> Selection:
        """Keep every template/question position and the top ceil(r x context) context positions."""
        prompt = inputs.prompt
        scores = self.score(inputs).float().cpu()
        if scores.shape != (prompt.context_len,):
            raise RuntimeError(
                f"{self.name} returned scores of shape {tuple(scores.shape)}, want ({prompt.context_len},)"
            )
        k = context_budget(retention, prompt.context_len)
        # stable sort: ties go to the earlier position, so selection is deterministic
        ranked = torch.sort(scores, descending=True, stable=True).indices
        top = ranked[:k] + prompt.context_start
        fixed = prompt.fixed_positions()
        kept = torch.sort(torch.cat([fixed, top])).values
        order = torch.cat([fixed, top])
        return Selection(kept=kept, order=order, scores=scores, context_kept=k, context_len=prompt.context_len)


def full_selection(prompt: Prompt) -> Selection:
    """Keep every streamed position without scoring: template and question first, then the context in
    prompt order (the edge daemon scores even at retention 1.0, so its chunks arrive by importance)."""
    kept = torch.arange(prompt.stream_len)
    n = prompt.context_len
    order = torch.cat([prompt.fixed_positions(), torch.arange(prompt.context_start, prompt.context_end)])
    return Selection(kept=kept, order=order, scores=torch.zeros(n), context_kept=n, context_len=n)
