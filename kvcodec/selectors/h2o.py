"""h2o: cumulative attention each context position receives from every prompt row."""

from dataclasses import dataclass

import torch

from kvwire.kvcodec.prompt import Prompt
from kvwire.kvcodec.selectors.base import ScoreInputs, Selector
from kvwire.kvcodec.selectors.registry import register_selector


@register_selector
@dataclass(frozen=True)
class H2OSelector(Selector):
    """Heavy-hitter oracle (Zhang et al. 2023): score = attention received from all rows, summed
    over rows and heads, averaged over layers. Costs O(prompt^2) compute (blocked, never the full
    matrix in memory); a baseline, not a default."""

    name = "h2o"

    def query_rows(self, prompt: Prompt) -> torch.Tensor:
        return torch.arange(0, prompt.stream_len)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.attention.mean(dim=0)
