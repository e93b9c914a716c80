"""q2c: attention of the question rows to each context position."""

from dataclasses import dataclass

import torch

from kvwire.kvcodec.prompt import Prompt
from kvwire.kvcodec.selectors.base import ScoreInputs, Selector
from kvwire.kvcodec.selectors.registry import register_selector


@register_selector
@dataclass(frozen=True)
class Q2CSelector(Selector):
    """Score = attention paid by the question and template-suffix rows, summed over those rows and
    all query heads, averaged over layers (each layer's score has the same scale: the rows'
    probability mass, so a mean weights layers equally)."""

    name = "q2c"

    def query_rows(self, prompt: Prompt) -> torch.Tensor:
        return torch.arange(prompt.context_end, prompt.stream_len)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.attention.mean(dim=0)
