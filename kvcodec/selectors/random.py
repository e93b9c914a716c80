"""random: uniformly random context positions (a seeded baseline)."""

from dataclasses import dataclass

import torch

from kvwire.kvcodec.selectors.base import ScoreInputs, Selector, check_int
from kvwire.kvcodec.selectors.registry import register_selector


@register_selector
@dataclass(frozen=True)
class RandomSelector(Selector):
    """Random scores from a generator seeded with `seed` + the prompt length, so runs are reproducible."""

    name = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self.name, "seed", self.seed, minimum=0)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + len(inputs.prompt))
        return torch.rand(inputs.prompt.context_len, generator=gen)
