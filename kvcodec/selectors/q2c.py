"""q2c: attention of the question rows to each context position."""

import torch

from kvwire.kvcodec.prompt import Prompt
from kvwire.kvcodec.selectors.base import Selector


class Q2CSelector(Selector):
    """Score = attention paid by the question and template-suffix rows, summed over those rows and
    all query heads, averaged over layers (each layer's score has the same scale: the rows'
    probability mass, so a mean weights layers equally)."""

    name = "q2c"

    def query_rows(self, prompt: Prompt) -> torch.Tensor:
        return torch.arange(prompt.context_end, prompt.stream_len)

    def score(self, prompt: Prompt, attention: torch.Tensor) -> torch.Tensor:
        return attention.mean(dim=0)
