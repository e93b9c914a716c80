"""Score-then-select: a selector scores each context position; the base keeps the top-k."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.prompt import Prompt


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

    @property
    def achieved_retention(self) -> float:
        return self.context_kept / self.context_len if self.context_len else 1.0


def check_retention(retention: float) -> float:
    if not isinstance(retention, (int, float)) or not (0.0 < float(retention) <= 1.0):
        raise ConfigError(f"retention must be in (0, 1], got {retention!r}")
    return float(retention)


def context_budget(retention: float, context_len: int) -> int:
    """Number of context positions kept: ceil(retention x context_len), at least 1."""
    return max(1, min(context_len, math.ceil(check_retention(retention) * context_len - 1e-9)))


class Selector:
    """A selector computes one score per context position; override `score` (and `query_rows`).

    query_rows: the prompt rows whose attention to the context the prefill must capture
    (None: no attention needed). The prefill hands `score` a tensor attention[layer, context]
    holding, per layer, the attention those rows pay to each context position summed over rows
    and query heads (softmax over each row's full causal span).
    """

    name: ClassVar[str] = ""

    def query_rows(self, prompt: Prompt) -> torch.Tensor | None:
        return None

    def score(self, prompt: Prompt, attention: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def select(self, prompt: Prompt, attention: torch.Tensor | None, retention: float) -> Selection:
        """Keep every template/question position and the top ceil(r x context) context positions."""
        scores = self.score(prompt, attention).float().cpu()
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


def check_retention_and_name(selector: str, retention: float) -> None:
    """ConfigError for an unknown selector or a retention outside (0, 1]."""
    from kvwire.kvcodec.selectors.registry import get_selector

    get_selector(selector)
    check_retention(retention)
