"""snapkv: attention of an observation window of the last prompt rows, max-pooled over positions."""

import torch
import torch.nn.functional as F

from kvwire.kvcodec.prompt import Prompt
from kvwire.kvcodec.selectors.base import Selector


class SnapKVSelector(Selector):
    """SnapKV (Li et al. 2024): the last `window` prompt rows vote, then a max-pool of width `kernel`
    keeps neighbours of important positions together. One position set for all heads and layers
    (the wire carries one set), so votes are averaged over layers like q2c."""

    name = "snapkv"
    window = 32  # SnapKV's default observation window
    kernel = 7  # SnapKV's pooling width for long-context QA

    def query_rows(self, prompt: Prompt) -> torch.Tensor:
        return torch.arange(max(0, prompt.stream_len - self.window), prompt.stream_len)

    def score(self, prompt: Prompt, attention: torch.Tensor) -> torch.Tensor:
        votes = attention.mean(dim=0)[None, None, :]
        return F.max_pool1d(votes, kernel_size=self.kernel, stride=1, padding=self.kernel // 2)[0, 0]
