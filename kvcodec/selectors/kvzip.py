"""kvzip: query-agnostic scores per layer and KV head from the model reconstructing the context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.prefill import head_max_attention
from kvwire.kvcodec.prompt import Prompt, reconstruction_ids
from kvwire.kvcodec.selectors.base import ScoreInputs, Selector, check_int
from kvwire.kvcodec.selectors.registry import register_selector

REPEAT = "\n\nRepeat the previous context exactly."
# later chunks quote the end of the chunk before them, so the model knows where to resume
CONTINUE = "\n\nRepeat the part of the previous context exactly, starting with"
QUOTED = 8  # context tokens quoted from the previous chunk (KVzip's choice)
REDUCTIONS = ("max", "mean")


@register_selector
@dataclass(frozen=True)
class KVzipSelector(Selector):
    """KVzip (Kim et al. 2025): after [template prefix][context], ask the model to repeat the context
    and teacher-force the context as its reply; a context entry's score, per layer and KV head, is the
    largest attention any reconstruction query (any query head of the KV head's group) pays it. The
    scores do not depend on the question, so they can be computed once per document.

    The reconstruction runs in passes of `chunk` context tokens on top of the context's KV (each pass
    is dropped after scoring, so memory is bounded by one chunk); each row's softmax spans the first
    `sink` positions, the chunk's context positions and the pass's own rows. Costs about one more
    prefill of the context plus the repeat prompts.

    select() (one set, today's wire) reduces the per-head scores with `reduce` (max or mean over layers
    and heads); select_heads() keeps them per head. question_weight > 0 adds the question's q2c
    attention (per layer, scaled to a maximum of 1, the same for every head of the layer) times the
    weight, so the question can pull in what the reconstruction ranked low.
    """

    name = "kvzip"
    chunk: int = 1024  # context tokens per reconstruction pass: a [q_heads, chunk, ~2 chunk] fp32 score matrix
    sink: int = 4  # leading positions in every softmax (attention sinks; KVzip keeps 4)
    reduce: str = "max"
    question_weight: float = 0.0

    def __post_init__(self) -> None:
        check_int(self.name, "chunk", self.chunk, minimum=QUOTED + 1)
        check_int(self.name, "sink", self.sink, minimum=0)
        if self.reduce not in REDUCTIONS:
            raise ConfigError(f"selector 'kvzip': reduce must be one of {', '.join(REDUCTIONS)}, got {self.reduce!r}")
        w = self.question_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w < float("inf"):
            raise ConfigError(f"selector 'kvzip': question_weight must be a number >= 0, got {w!r}")

    def query_rows(self, prompt: Prompt) -> torch.Tensor | None:
        return torch.arange(prompt.context_end, prompt.stream_len) if self.question_weight > 0 else None

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return self.with_question(self.reconstruction_scores(inputs), inputs.attention)

    def with_question(self, scores: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        """Reconstruction scores [layers, kv_heads, context_len] plus question_weight x the question rows'
        attention [layers, context_len] scaled per layer to a maximum of 1 (unchanged at weight 0)."""
        if self.question_weight == 0:
            return scores
        q2c = attention / attention.amax(dim=1, keepdim=True).clamp_min(1e-30)
        return scores + self.question_weight * q2c[:, None, :].to(scores)

    def reconstruction_scores(self, inputs: ScoreInputs) -> torch.Tensor:
        """[layers, kv_heads, context_len]: the max attention each context entry receives while the
        model repeats the context, chunk by chunk. They depend on the context only: with a prefix cache
        (inputs.prefix_scores, the document's entry) they are computed once and reused by every question."""
        key = (self.name, self.chunk, self.sink)
        if inputs.prefix_scores is not None and key in inputs.prefix_scores:
            return inputs.prefix_scores[key]
        scores = self._reconstruct(inputs)
        if inputs.prefix_scores is not None:
            inputs.prefix_scores[key] = scores
        return scores

    def context_scores(self, inputs: ScoreInputs) -> None:
        self.reconstruction_scores(inputs)

    def _reconstruct(self, inputs: ScoreInputs) -> torch.Tensor:
        if inputs.model is None or inputs.tokenizer is None:
            raise ConfigError("selector 'kvzip' runs a reconstruction pass: its inputs need the model and tokenizer")
        prompt = inputs.prompt
        start, end = prompt.context_start, prompt.context_end
        prefix = ([k[:, :end] for k in inputs.keys], [v[:, :end] for v in inputs.values])
        context = list(prompt.ids[start:end])
        parts = []
        for lo in range(0, len(context), self.chunk):
            piece = context[lo : lo + self.chunk]
            if lo == 0:
                ids = reconstruction_ids(inputs.tokenizer, REPEAT)
            else:
                ids = reconstruction_ids(inputs.tokenizer, CONTINUE, context[lo - QUOTED : lo])
            span = (start + lo, start + lo + len(piece))
            parts.append(head_max_attention(inputs.model, prefix, ids + piece, span, self.sink))
        return torch.cat(parts, dim=-1)

    def one_set(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.amax(dim=(0, 1)) if self.reduce == "max" else scores.mean(dim=(0, 1))
