"""random: uniformly random context positions (a seeded baseline)."""

import torch

from kvwire.kvcodec.prompt import Prompt
from kvwire.kvcodec.selectors.base import Selector


class RandomSelector(Selector):
    """Random scores from a generator seeded per prompt length, so runs are reproducible."""

    name = "random"
    seed = 0

    def score(self, prompt: Prompt, attention: torch.Tensor | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + len(prompt))
        return torch.rand(prompt.context_len, generator=gen)
