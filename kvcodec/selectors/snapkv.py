"""snapkv: attention of an observation window of the last prompt rows, max-pooled over positions."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.prompt import Prompt
from kvwire.kvcodec.selectors.base import ScoreInputs, Selector, check_int
from kvwire.kvcodec.selectors.registry import register_selector


@register_selector
@dataclass(frozen=True)
class SnapKVSelector(Selector):
    """SnapKV (Li et al. 2024): the last `window` prompt rows vote, then a max-pool of width `kernel`
    keeps neighbours of important positions together. One position set for all heads and layers
    (the wire carries one set), so votes are averaged over layers like q2c."""

    name = "snapkv"
    window: int = 32  # SnapKV's default observation window
    kernel: int = 7  # SnapKV's pooling width for long-context QA

    def __post_init__(self) -> None:
        check_int(self.name, "window", self.window, minimum=1)
        check_int(self.name, "kernel", self.kernel, minimum=1)
        if self.kernel % 2 == 0:  # a centred pool: padding kernel // 2 keeps one score per position only when odd
            raise ConfigError(f"selector 'snapkv': kernel must be odd, got {self.kernel}")

    def query_rows(self, prompt: Prompt) -> torch.Tensor:
        return torch.arange(max(0, prompt.stream_len - self.window), prompt.stream_len)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        votes = inputs.attention.mean(dim=0)[None, None, :]
        return F.max_pool1d(votes, kernel_size=self.kernel, stride=1, padding=self.kernel // 2)[0, 0]
