"""Score-then-select: a selector scores each context position from one ScoreInputs; the base keeps the top-k."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

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
    model: Any = None  # the model that prefilled: for a selector that runs passes of its own (kvzip)
    tokenizer: Any = None
    # where a selector keeps scores that depend on the context only (kvzip's), keyed by its name and
    # parameters: the prefix cache's entry (the document's, kept with its KV); None: this request only
    prefix_scores: dict | None = None


@dataclass(frozen=True)
class Selection:
    """The outcome of selection over the streamed positions [0, prompt.stream_len).

    kept: ascending kept positions. order: the same positions, most important first (template and
    question positions, then context positions by descending score) — the order chunks are sent in.
    scores: one score per context position (higher = more important), or [layers, kv_heads,
    context_len] for a per-head selection.
    heads: None for one set serving every layer and head (what the wire carries today); for a per-head
    selection, per layer and KV head the ascending positions that head keeps (template and question
    positions in every head). `kept` and `order` are then the union over heads, and `context_kept`
    the context positions one head keeps on average (ceil(r x context), as for one set).
    """

    kept: torch.Tensor
    order: torch.Tensor
    scores: torch.Tensor
    context_kept: int
    context_len: int
    heads: tuple[tuple[torch.Tensor, ...], ...] | None = None
    budget: str = ""  # a per-head selection's budget (HEAD_BUDGETS): how its entries rank across layers

    def entry_order(self, prompt: Prompt) -> torch.Tensor:
        """The context entries a per-head selection keeps, most important first: [entries, 3] rows of
        (layer, KV head, position). The order a per-head stream sends them in (anytime: a stream cut
        after any chunk holds the best entries that fit). budget "global": by score, so a cut leaves the
        global selection of a lower retention; "layer": by rank within the layer as a share of what the
        layer keeps, so every layer is cut at the same share (its scores need not compare across layers)."""
        if self.heads is None:
            raise ValueError("a one-set selection has no per-head entries")
        start, end = prompt.context_start, prompt.context_end
        keep = torch.zeros(self.scores.shape, dtype=torch.bool)
        for layer, sets in enumerate(self.heads):
            for head, pos in enumerate(sets):
                ctx = pos[(pos >= start) & (pos < end)]
                keep[layer, head, ctx - start] = True
        entries = keep.nonzero()  # [entries, 3]: layer, head, context index (row-major: deterministic ties)
        scores = self.scores[keep]
        if self.budget == "layer":
            key = torch.empty_like(scores)
            for layer in range(keep.shape[0]):
                rows = (entries[:, 0] == layer).nonzero()[:, 0]
                ranked = torch.sort(scores[rows], descending=True, stable=True).indices
                key[rows[ranked]] = -(torch.arange(len(rows), dtype=scores.dtype) + 1) / len(rows)
            scores = key
        order = torch.sort(scores, descending=True, stable=True).indices
        entries = entries[order]
        entries[:, 2] += start
        return entries

    def head_counts(self, prompt: Prompt) -> list[list[int]]:
        """Context positions each (layer, KV head) keeps, per layer (a per-head selection only)."""
        if self.heads is None:
            raise ValueError("a one-set selection has no per-head position sets")
        fixed = prompt.stream_len - prompt.context_len
        return [[len(p) - fixed for p in layer] for layer in self.heads]


HEAD_BUDGETS = ("global", "layer")  # how select_heads spreads the context budget; the default (measured best) first


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
        """One score per context position, [context_len], or per layer and KV head, [layers, kv_heads,
        context_len]; higher = more important."""
        raise NotImplementedError

    def context_scores(self, inputs: ScoreInputs) -> None:
        """Compute the scores that depend on the context only into `inputs.prefix_scores` (the edge does this
        when a document is prefilled, so its first question pays nothing for them); inputs.keys/values may hold
        the prefix [template][context] only. Most selectors have none: nothing to do."""

    def one_set(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-head scores [layers, kv_heads, context_len] reduced to one per context position, for the
        one-set selection (what today's wire carries): the largest over layers and heads by default."""
        return scores.amax(dim=(0, 1))

    def _checked_scores(self, inputs: ScoreInputs) -> torch.Tensor:
        n = inputs.prompt.context_len
        scores = self.score(inputs).float().cpu()
        heads = (len(inputs.keys), inputs.keys[0].shape[0]) if len(inputs.keys) else None
        if scores.shape != (n,) and (heads is None or scores.shape != (*heads, n)):
            want = f"({n},)" + (f" or ({heads[0]}, {heads[1]}, {n})" if heads else "")
            raise RuntimeError(f"{self.name} returned scores of shape {tuple(scores.shape)}, want {want}")
        return scores

    def select(self, inputs: ScoreInputs, retention: float) -> Selection:
        """Keep every template/question position and the top ceil(r x context) context positions: one set
        for all layers and heads (per-head scores are reduced by `one_set` first)."""
        scores = self._checked_scores(inputs)
        return top_k_selection(inputs.prompt, self.one_set(scores) if scores.dim() == 3 else scores, retention)

    def select_heads(self, inputs: ScoreInputs, retention: float, budget: str = "global") -> Selection:
        """A position set per (layer, KV head) (head_selection). A selector with one score per position
        gives every head the same set: its one-set selection."""
        check_budget(budget)  # before scoring, which may run passes of the model
        scores = self._checked_scores(inputs)
        if scores.dim() == 1:
            scores = scores.expand(len(inputs.keys), inputs.keys[0].shape[0], -1)
        return head_selection(inputs.prompt, scores, retention, budget)


def check_budget(budget: str) -> str:
    if budget not in HEAD_BUDGETS:
        raise ConfigError(f"per-head budget {budget!r}: use one of {', '.join(HEAD_BUDGETS)}")
    return budget


def top_k_selection(prompt: Prompt, scores: torch.Tensor, retention: float) -> Selection:
    """One set: every template/question position and the ceil(r x context) best-scored context positions
    (scores: [context_len])."""
    k = context_budget(retention, prompt.context_len)
    # stable sort: ties go to the earlier position, so selection is deterministic
    ranked = torch.sort(scores, descending=True, stable=True).indices
    top = ranked[:k] + prompt.context_start
    fixed = prompt.fixed_positions()
    kept = torch.sort(torch.cat([fixed, top])).values
    order = torch.cat([fixed, top])
    return Selection(kept=kept, order=order, scores=scores, context_kept=k, context_len=prompt.context_len)


def head_selection(
    prompt: Prompt, scores: torch.Tensor, retention: float, budget: str = "global", entries: int | None = None
) -> Selection:
    """A position set per (layer, KV head) from scores [layers, kv_heads, context_len]: template and
    question positions in every head, and the best-scored context entries under a budget of
    k = ceil(r x context) per head on average. budget "layer": each layer keeps kv_heads x k entries,
    split freely across its heads; "global": all layers together keep layers x kv_heads x k, split
    freely across layers and heads. entries (global only): keep this many context entries in all
    instead (e.g. fewer, so that a per-head stream's position bytes are paid for: bench/selection_bench.py)."""
    check_budget(budget)
    layers, kv_heads, _ = scores.shape
    k = context_budget(retention, prompt.context_len)
    if entries is not None and (budget != "global" or not 1 <= entries <= scores.numel()):
        raise ConfigError(f"entries={entries!r} needs budget 'global' and 1 <= entries <= {scores.numel()}")
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    if budget == "layer":
        for layer in range(layers):  # ties: the lower head, then the earlier position (stable)
            ranked = torch.sort(scores[layer].reshape(-1), descending=True, stable=True).indices
            keep[layer].view(-1)[ranked[: kv_heads * k]] = True
    else:
        ranked = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
        keep.view(-1)[ranked[: layers * kv_heads * k if entries is None else entries]] = True
    fixed, start = prompt.fixed_positions(), prompt.context_start
    heads = tuple(
        tuple(torch.sort(torch.cat([fixed, mask.nonzero()[:, 0] + start])).values for mask in layer_keep)
        for layer_keep in keep
    )
    # the union, most important first: by each position's best kept score over layers and heads
    best = torch.where(keep, scores, torch.full_like(scores, float("-inf"))).amax(dim=(0, 1))
    ranked = torch.sort(best, descending=True, stable=True).indices[: int(keep.any(dim=(0, 1)).sum())] + start
    return Selection(
        kept=torch.sort(torch.cat([fixed, ranked])).values,
        order=torch.cat([fixed, ranked]),
        scores=scores,
        context_kept=k,
        context_len=prompt.context_len,
        heads=heads,
        budget=budget,
    )


def full_selection(prompt: Prompt) -> Selection:
    """Keep every streamed position without scoring: template and question first, then the context in
    prompt order (the edge daemon scores even at retention 1.0, so its chunks arrive by importance)."""
    kept = torch.arange(prompt.stream_len)
    n = prompt.context_len
    order = torch.cat([prompt.fixed_positions(), torch.arange(prompt.context_start, prompt.context_end)])
    return Selection(kept=kept, order=order, scores=torch.zeros(n), context_kept=n, context_len=n)
